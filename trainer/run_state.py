"""What a run carries from step to step, and what a checkpoint keeps of it.

The resume state is small and explicit: the model (plugin spec, config, weights), the
optimizer, the gradient scaler, the step, torch's RNG, the lineage of the batches trained,
and the next offset of every partition consumed. ``resume`` puts a run back exactly there,
so the first batch read is the one after the last batch trained; ``save_checkpoint``
writes it (rank 0, after gathering every rank's offsets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from trainer import distributed
from trainer.checkpoint import CheckpointStore, Lineage, Loaded
from trainer.config import TrainerSettings
from trainer.errors import CheckpointError
from trainer.metrics import TrainerMetrics
from trainer.models import BUILTIN, ModelPlugin, load_plugin
from trainer.source import KafkaBatchSource

log = logging.getLogger("sluice.trainer")

#: The plugin of a fresh run when ``trainer.model`` is unset.
DEFAULT_MODEL = "embedding-classifier"


@dataclass(frozen=True)
class Learner:
    """The model plugin and what updates it: what a checkpoint restores besides the data."""

    plugin: ModelPlugin
    spec: str
    """The plugin as named (built-in name or ``module:factory``); saved to rebuild it."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


@dataclass
class RunState:
    """Where a run stands; the next checkpoint saves it."""

    step: int
    """Optimizer steps done, resumed ones included."""
    lineage: Lineage
    trained: dict[str, Any]
    """The source's state after the last batch of the last optimizer step: what a
    checkpoint records (batches fetched for a step that never happened come again)."""
    last_saved: int
    evaluated_at: int = -1


def build_model(ckpt: Loaded | None, cfg: TrainerSettings) -> tuple[ModelPlugin, str]:
    """The plugin to train and its spec, rebuilt from the checkpoint when there is one.

    Only the configured model is ever imported: ``trainer.model``, or when it is unset a
    built-in one. A checkpoint is data anyone with write access to its folder can forge
    (its SHA-256 sits in a manifest they rewrite too), and its spec is a ``module:factory``
    that ``load_plugin`` would import and call (``os:system``): so the checkpoint's spec
    is only compared with the configured one, and a different one is refused.
    """
    if ckpt is None:
        spec = cfg.model or DEFAULT_MODEL
        return load_plugin(spec, cfg.model_options), spec
    saved = ckpt.state["model"]
    saved_spec = str(saved["spec"])
    if cfg.model is None:
        if _target(saved_spec) not in BUILTIN.values():
            raise CheckpointError(
                f"{ckpt.path} holds a model {saved_spec!r}, which is not built in "
                f"({', '.join(BUILTIN)}): a plugin is only loaded when trainer.model "
                "(--model) names it"
            )
        spec = saved_spec
    elif _target(cfg.model) == _target(saved_spec):
        spec = cfg.model
    else:
        raise CheckpointError(
            f"{ckpt.path} holds a model {saved_spec!r}, not the configured {cfg.model!r}: "
            "use another --checkpoint-dir for another model"
        )
    plugin = load_plugin(spec, dict(saved["config"]))
    plugin.load_state_dict(saved)
    return plugin, spec


def _target(spec: str) -> str:
    """The ``module:factory`` a spec names (a built-in name stands for its target)."""
    return BUILTIN.get(spec, spec)


def resume(ckpt: Loaded | None, learner: Learner, source: KafkaBatchSource) -> RunState:
    """Load the optimizer, scaler, RNG and offsets of ``ckpt`` (the model is loaded by
    ``build_model``); a fresh run's state without one."""
    if ckpt is None:
        return RunState(0, Lineage(), source.state_dict(), last_saved=0)
    learner.optimizer.load_state_dict(ckpt.state["optimizer"])
    learner.scaler.load_state_dict(ckpt.state["scaler"])
    lineage = Lineage(ckpt.state["lineage"]["chain"], ckpt.state["lineage"]["count"])
    if "rng" in ckpt.state:
        torch.set_rng_state(ckpt.state["rng"].cpu())
    log.info(
        "resumed from %s, step %d, offsets %s", ckpt.path, ckpt.step,
        ckpt.state["source"]["offsets"],
    )
    source.load_state_dict(ckpt.state["source"])
    return RunState(ckpt.step, lineage, source.state_dict(), last_saved=ckpt.step)


def save_checkpoint(
    store: CheckpointStore, learner: Learner, run: RunState, cfg: TrainerSettings,
    source: KafkaBatchSource, world: distributed.World, metrics: TrainerMetrics,
) -> Path | None:
    """Write the checkpoint of ``run`` (rank 0; every rank joins the gather of offsets)
    and commit its offsets to the consumer group; its folder, ``None`` on other ranks."""
    offsets: dict[int, int] = {}
    for part in distributed.gather(run.trained["offsets"], world):
        offsets.update(part)
    run.last_saved = run.step
    if not world.main:
        run.lineage.saved()
        return None
    plugin, lineage = learner.plugin, run.lineage
    state = {
        "step": run.step,
        "model": {"spec": learner.spec, "name": plugin.name, "config": plugin.config(),
                  **plugin.state_dict()},
        "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict(),
        "schedule": {"kind": cfg.schedule, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                     "total_steps": cfg.total_steps, "min_lr": cfg.lr / 10},
        "source": {"topic": source.topic, "offsets": offsets},
        "lineage": lineage.state(),
        "rng": torch.get_rng_state(),
    }
    manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "model": learner.spec, "model_name": plugin.name, "labels": plugin.labels,
        "topic": source.topic, "offsets": {str(p): o for p, o in sorted(offsets.items())},
        "batches": lineage.since_save, "batch_count": lineage.count, "chain": lineage.chain,
        "world_size": world.world_size,
    }
    path = store.save(run.step, state, manifest)
    lineage.saved()
    source.commit(offsets)
    metrics.count("checkpoints")
    log.info("checkpoint %s (step %d, %d batches)", path, run.step, lineage.count)
    return path
