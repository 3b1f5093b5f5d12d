"""The training loop behind ``sluice train``, top to bottom (the shape of nanoGPT's train.py).

Setup (process group, device, precision), resume from the newest checkpoint, the model
plugin and its optimizer, the batch source with its prefetch thread, then one flat loop:
fetch ``grad_accum`` batches, adopt new labels, forward/backward each, average gradients
across ranks, clip, step, send feedback, report, evaluate, checkpoint. It stops at
``max_steps``, when ``stop`` is set (SIGTERM, Ctrl-C), or when the stream runs dry for
``idle_timeout_s``, and writes a final checkpoint on every clean stop.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kafka import KafkaProducer

from schemas.records import BatchSample, Feedback, SampleLoss
from streams.connections import kafka_client_options
from streams.serde import encode
from trainer import distributed
from trainer.checkpoint import CheckpointStore, Lineage, Loaded
from trainer.config import TrainerConfig, TrainerSettings
from trainer.errors import CheckpointError, TrainerError
from trainer.evaluate import EvalSet, evaluate, is_heldout, load_eval_jsonl
from trainer.metrics import TrainerMetrics
from trainer.models import BUILTIN, IGNORE, BatchError, ModelPlugin, TrainBatch, load_plugin
from trainer.prefetch import Prefetcher
from trainer.source import KafkaBatchSource, SourcedBatch

log = logging.getLogger("sluice.trainer")


@dataclass(frozen=True)
class RunOptions:
    """What one run adds to ``TrainerSettings`` (the command line's options)."""

    model: str | None = None
    """Plugin: built-in name or ``module:factory``; ``None``: the checkpoint's, else the setting."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """Factory keywords for a fresh model (a resumed one is rebuilt from its checkpoint)."""
    max_steps: int | None = None
    """Stop once this many optimizer steps are done in total (resumed steps count)."""
    checkpoint_dir: Path | None = None
    from_beginning: bool = False
    """Partitions without a checkpointed offset start at the earliest batch."""
    device: str | None = None
    holdout_fraction: float = 0.05
    """Share of sample ids (by hash) never trained on and evaluated instead."""
    eval_file: Path | None = None
    """A fixed JSONL evaluation set instead of the hash-held-out slice."""
    eval_samples: int = 1024
    idle_timeout_s: float | None = None
    """Stop when no batch arrives for this long (``None``: wait for ever)."""
    seed: int = 0


@dataclass
class TrainResult:
    """How a run ended."""

    step: int
    start_step: int
    resumed_from: Path | None
    checkpoint: Path | None
    stopped: str
    samples: int = 0
    batches: int = 0
    wall_s: float = 0.0
    wait_s: float = 0.0
    loss: float | None = None
    eval: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        """Trained samples per second of loop wall time."""
        return self.samples / self.wall_s if self.wall_s else 0.0

    @property
    def data_wait_share(self) -> float:
        """Share of loop wall time spent waiting for the next batch."""
        return self.wait_s / self.wall_s if self.wall_s else 0.0


@dataclass(frozen=True, slots=True)
class Prepared:
    """A sourced batch split into trainable tensors and held-out samples."""

    sourced: SourcedBatch
    train: TrainBatch | None
    heldout: list[BatchSample]
    skipped: str | None = None


def get_lr(step: int, cfg: TrainerSettings) -> float:
    """Linear warmup, then constant or cosine decay to a tenth of ``lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    min_lr = cfg.lr / 10
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's CUDA device when there is one, else Apple's MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def configure_optimizer(
    module: torch.nn.Module, cfg: TrainerSettings, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms), as nanoGPT does."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def per_sample(
    logits: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean loss (no smoothing), per-sample share correct, positions per sample."""
    valid = targets != IGNORE
    tok = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE)
    hits = ((logits.argmax(-1) == targets) & valid).float()
    count = torch.zeros(n, device=logits.device).index_add_(0, owner, valid.float())
    loss = torch.zeros(n, device=logits.device).index_add_(0, owner, tok) / count.clamp_min(1)
    right = torch.zeros(n, device=logits.device).index_add_(0, owner, hits) / count.clamp_min(1)
    return loss, right, count


def train(
    settings: TrainerConfig, options: RunOptions, stop: threading.Event | None = None
) -> TrainResult:
    """Run the trainer until ``max_steps``, ``stop``, or an idle stream; see the module doc."""
    device = pick_device(options.device or settings.trainer.device)
    world = distributed.setup(device.type)
    with ExitStack() as cleanup:  # closes what _train opened, last opened first
        cleanup.callback(distributed.teardown, world)
        return _train(settings, options, stop or threading.Event(), world, device, cleanup)


def _train(
    settings: TrainerConfig, options: RunOptions, stop: threading.Event, world: distributed.World,
    device: torch.device, cleanup: ExitStack,
) -> TrainResult:
    """``train``'s body, top to bottom; what it opens is registered on ``cleanup``."""
    cfg = settings.trainer

    # -- setup: device, precision ------------------------------------------------------------
    if world.distributed:
        device = pick_device(options.device or cfg.device, world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave one core to the prefetch thread and Kafka's I/O thread: on models this
        # small, intra-op threads fighting them for cores cost more than they give.
        torch.set_num_threads(max(1, _cores() // world.world_size - 1))
    torch.manual_seed(options.seed + world.rank)
    # bf16 where the GPU has it (no loss scaling needed); fp16 + GradScaler otherwise.
    # On the CPU, full float32: CPU autocast is slower than it saves on small models.
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def amp() -> AbstractContextManager[Any]:
        if amp_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # -- resume ---------------------------------------------------------------------------
    store = CheckpointStore(options.checkpoint_dir or cfg.checkpoint_dir or Path('checkpoints'),
                            cfg.keep_checkpoints)
    ckpt = store.load_latest(map_location=device)
    plugin, spec = _build_model(ckpt, options, cfg.model)
    plugin.module.to(device)
    optimizer = configure_optimizer(plugin.module, cfg, device)
    step, lineage = 0, Lineage()
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scaler.load_state_dict(ckpt.state["scaler"])
        step = ckpt.step
        lineage = Lineage(ckpt.state["lineage"]["chain"], ckpt.state["lineage"]["count"])
        if "rng" in ckpt.state:
            torch.set_rng_state(ckpt.state["rng"].cpu())
        log.info(
            "resumed from %s, step %d, offsets %s", ckpt.path, step,
            ckpt.state["source"]["offsets"],
        )
    if cfg.compile:
        plugin.compile()
    start_step, last_saved = step, step

    # -- data ------------------------------------------------------------------------------
    source = KafkaBatchSource(
        settings, rank=world.rank, world_size=world.world_size,
        from_beginning=options.from_beginning, idle_timeout_s=options.idle_timeout_s,
    )
    if ckpt is not None:
        source.load_state_dict(ckpt.state["source"])
    fixed_eval = load_eval_jsonl(options.eval_file) if options.eval_file else None
    holdout = 0.0 if fixed_eval is not None else options.holdout_fraction
    eval_set = EvalSet(options.eval_samples)
    prefetch = Prefetcher(source, _preparer(plugin, holdout), depth=cfg.prefetch).start()
    cleanup.callback(prefetch.close)
    # The source's offsets after the last batch of the last optimizer step: what a
    # checkpoint records (batches fetched for a step that never happened come again).
    trained_state = prefetch.state_dict()

    # -- reporting -------------------------------------------------------------------------
    producer = KafkaProducer(**kafka_client_options(settings.kafka), linger_ms=20)
    cleanup.callback(_close_producer, producer)
    metrics = TrainerMetrics(
        {"model": plugin.name, "device": str(device), "rank": str(world.rank)}
    )
    cleanup.callback(metrics.close)
    if world.main:
        metrics.serve(settings.metrics.trainer_port)
    next_report = time.monotonic() + settings.metrics.interval_s

    def report() -> None:
        metrics.set_counter("records", source.counters.records)
        for reason, n in source.counters.dropped.items():
            metrics.set_counter(f"dropped.{reason}", n)
        snap = metrics.snapshot(prefetch.wait_s)
        producer.send(settings.topics.metrics, key=b"trainer", value=encode("MetricSnapshot", snap))
        g = snap["gauges"]
        log.info(
            "step %d loss %.4f acc %.3f %.0f samples/s data-wait %.0f%% lag %d",
            step, g.get("loss", float("nan")), g.get("accuracy", float("nan")),
            g.get("samples_per_s", 0.0), 100 * g.get("data_wait_share", 0.0), g.get("lag", 0),
        )

    def run_eval() -> dict[str, float]:
        samples = fixed_eval if fixed_eval is not None else eval_set.samples()
        result = evaluate(plugin, samples, device, amp()) if samples else {}
        for name, value in result.items():
            metrics.gauge(f"eval.{name}", value)
        if result:
            metrics.count("evals")
            log.info("eval at step %d: %s", step, _fmt(result))
        return result

    def save() -> Path | None:
        offsets: dict[int, int] = {}
        for part in distributed.gather(trained_state["offsets"], world):
            offsets.update(part)
        if not world.main:
            lineage.saved()
            return None
        state = {
            "step": step,
            "model": {"spec": spec, "name": plugin.name, "config": plugin.config(),
                      **plugin.state_dict()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "schedule": {"kind": cfg.schedule, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                         "total_steps": cfg.total_steps, "min_lr": cfg.lr / 10},
            "source": {"topic": source.topic, "offsets": offsets},
            "lineage": lineage.state(),
            "rng": torch.get_rng_state(),
        }
        manifest = {
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "model": spec, "model_name": plugin.name, "labels": plugin.labels,
            "topic": source.topic, "offsets": {str(p): o for p, o in sorted(offsets.items())},
            "batches": lineage.since_save, "batch_count": lineage.count, "chain": lineage.chain,
            "world_size": world.world_size,
        }
        path = store.save(step, state, manifest)
        lineage.saved()
        source.commit(offsets)
        metrics.count("checkpoints")
        log.info("checkpoint %s (step %d, %d batches)", path, step, lineage.count)
        return path

    # -- the loop ----------------------------------------------------------------------------
    result = TrainResult(step, start_step, ckpt.path if ckpt else None, None, "max_steps")
    evaluated_at = -1
    loop_started = time.perf_counter()
    while True:
        if options.max_steps is not None and step >= options.max_steps:
            result.stopped = "max_steps"
            break
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Fetch every micro-batch of this step first: ranks must agree that all have
        # data before any of them enters a collective.
        prepared: list[Prepared] = []
        exhausted = False
        while len([p for p in prepared if p.train is not None]) < cfg.grad_accum:
            item = prefetch.get(stop)
            if item is None:
                exhausted = True
                break
            prepared.append(item)
        stopping, exhausted = distributed.any_flag([stop.is_set(), exhausted], world, device)
        if exhausted:
            # A partial step is dropped: its batches come again after a restart.
            result.stopped = "stopped" if stop.is_set() else "end of stream"
            break
        trainable = [p.train for p in prepared if p.train is not None]

        new_labels = [lb for b in trainable for lb in plugin.unseen_labels(b)]
        if world.distributed:
            new_labels = distributed.union_in_order(distributed.gather(new_labels, world))
        if new_labels:
            plugin.add_labels(new_labels, optimizer)
            log.info("new labels %s: %d classes", new_labels, len(plugin.labels))

        outcomes = []
        step_loss = torch.zeros((), device=device)
        for batch in trainable:
            with amp():
                out = plugin.forward(batch, device)
                loss = F.cross_entropy(
                    out.logits, out.targets, ignore_index=IGNORE,
                    label_smoothing=cfg.label_smoothing,
                )
            scaler.scale(loss / cfg.grad_accum).backward()
            with torch.no_grad():
                outcomes.append(per_sample(out.logits.float(), out.targets, out.owner,
                                           len(batch)))
            step_loss += loss.detach().float() / len(trainable)

        distributed.average_gradients(plugin.module, world)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(plugin.module.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # Bookkeeping of the step just taken (one device-to-host copy per step).
        consumed = [(p.sourced.batch["batch_id"], p.sourced.batch["content_digest"])
                    for p in prepared]
        if world.distributed:
            consumed = [c for part in distributed.gather(consumed, world) for c in part]
        lineage.extend(consumed)
        trained_state = prefetch.state_dict()
        loss_value = float(step_loss)
        correct = positions = samples = 0
        for batch, (losses, right, count) in zip(trainable, outcomes, strict=True):
            losses_l, right_l = losses.tolist(), right.tolist()
            correct += int((right * count).sum())
            positions += int(count.sum())
            samples += len(batch)
            _send_feedback(producer, settings.topics.feedback, plugin, batch, step,
                           losses_l, right_l)
        for p in prepared:
            eval_set.add(p.heldout)
            metrics.count("heldout", len(p.heldout))
            if p.skipped:
                metrics.count(f"skipped.{p.skipped}")
        metrics.count("batches", len(prepared))
        metrics.trained(samples, loss_value, correct, positions)
        metrics.gauge("step", step)
        metrics.gauge("lr", lr)
        metrics.gauge("lag", prepared[-1].sourced.lag)
        result.samples += samples
        result.batches += len(prepared)
        result.loss = loss_value
        if not math.isfinite(loss_value):
            raise TrainerError(f"loss is {loss_value} at step {step}: stopping before "
                               "a checkpoint saves diverged weights")

        if step % cfg.eval_every == 0:
            result.eval, evaluated_at = run_eval(), step
        if step % cfg.checkpoint_every == 0:
            result.checkpoint = save() or result.checkpoint
            last_saved = step
        if time.monotonic() >= next_report:
            report()
            next_report = time.monotonic() + settings.metrics.interval_s
        if stopping:
            result.stopped = "stopped"
            break

    result.wall_s = time.perf_counter() - loop_started
    result.wait_s = prefetch.wait_s
    result.step = step
    if step > last_saved:
        result.checkpoint = save() or result.checkpoint
    if evaluated_at != step:
        result.eval = run_eval()
    report()
    return result


def _close_producer(producer: KafkaProducer) -> None:
    producer.flush(timeout=10)
    producer.close(timeout=10)


def _build_model(
    ckpt: Loaded | None, options: RunOptions, default: str
) -> tuple[ModelPlugin, str]:
    """The plugin to train, rebuilt from the checkpoint when there is one."""
    if ckpt is None:
        spec = options.model or default
        return load_plugin(spec, options.model_options), spec
    saved = ckpt.state["model"]
    if options.model and BUILTIN.get(options.model, options.model) != BUILTIN.get(
        saved["spec"], saved["spec"]
    ):
        raise CheckpointError(
            f"{ckpt.path} holds a {saved['spec']} model, not {options.model}: "
            "use another --checkpoint-dir for another model"
        )
    plugin = load_plugin(saved["spec"], dict(saved["config"]))
    plugin.load_state_dict(saved)
    return plugin, saved["spec"]


def _preparer(plugin: ModelPlugin, holdout: float) -> Callable[[SourcedBatch], Prepared]:
    """The prefetch thread's transform: split off held-out samples, collate the rest."""

    def prepare(item: SourcedBatch) -> Prepared:
        samples = item.batch["samples"]
        heldout = [s for s in samples if is_heldout(s["id"], holdout)]
        kept = [s for s in samples if not is_heldout(s["id"], holdout)]
        if not kept:
            return Prepared(item, None, heldout, "all_heldout")
        try:
            return Prepared(item, plugin.collate(item.batch["batch_id"], kept), heldout)
        except BatchError as exc:
            log.warning("skipping batch %s (%s[%d]@%d): %s", item.batch["batch_id"],
                        item.topic, item.partition, item.offset, exc)
            return Prepared(item, None, heldout, "unusable")

    return prepare


def _send_feedback(
    producer: KafkaProducer, topic: str, plugin: ModelPlugin, batch: TrainBatch, step: int,
    losses: list[float], right: list[float],
) -> None:
    classify = plugin.task == "classify"
    record = Feedback(
        batch_id=batch.batch_id, step=step, model=plugin.name,
        created_at=int(time.time() * 1000),
        losses=[
            SampleLoss(
                id=i, label=lb, loss=float(loss), correct=bool(r > 0.5) if classify else None
            )
            for i, lb, loss, r in zip(batch.ids, batch.labels, losses, right, strict=True)
        ],
    )
    producer.send(topic, key=batch.batch_id.encode(), value=encode("Feedback", record))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())
