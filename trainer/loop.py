"""The training loop behind ``sluice train``, top to bottom (the shape of nanoGPT's train.py).

``train(config)`` runs what ``config.trainer`` (``TrainerSettings``) says. Setup: process
group, device and precision; the model plugin and its optimizer, resumed from the newest
checkpoint (``trainer.run_state``); the batch source with its prefetch thread (which
prepares each batch: ``trainer.batches``); the feedback and metrics producer. Then one
flat loop: fetch ``grad_accum`` batches, adopt new labels, forward/backward each, average
gradients across ranks, clip, step, send feedback, count, evaluate, checkpoint, report. It
stops at ``max_steps``, when ``stop`` is set (SIGTERM, Ctrl-C), or when the stream runs dry
for ``idle_timeout_s``, and writes a final checkpoint on every clean stop. The setup's and
the loop's parts are plain functions below it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from kafka import KafkaProducer

from schemas.records import BatchSample
from streams.connections import kafka_client_options
from streams.serde import encode
from trainer import distributed
from trainer.batches import Prepared, per_sample, prepare, send_feedback
from trainer.checkpoint import CheckpointStore, StartRecord
from trainer.config import TrainerConfig, TrainerSettings
from trainer.errors import TrainerError
from trainer.evaluate import EvalSet, evaluate, load_eval_jsonl
from trainer.loss import batch_loss
from trainer.metrics import TrainerMetrics
from trainer.models import ModelPlugin, TrainBatch
from trainer.prefetch import Prefetcher
from trainer.run_state import Learner, build_model, resume, save_checkpoint
from trainer.source import KafkaBatchSource, SourcedBatch

log = logging.getLogger("sluice.trainer")


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
    startup_s: float = 0.0
    """Of ``wait_s``, the wait for the first batch (the source connecting and seeking)."""
    loss: float | None = None
    eval: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        """Trained samples per second of loop wall time."""
        return self.samples / self.wall_s if self.wall_s else 0.0

    @property
    def data_wait_share(self) -> float:
        """Share of loop wall time spent waiting for the next batch, once the first came
        (the start-up wait says how fast the source connects, not whether it keeps up)."""
        running = self.wall_s - self.startup_s
        return (self.wait_s - self.startup_s) / running if running > 0 else 0.0


def train(config: TrainerConfig, stop: threading.Event | None = None) -> TrainResult:
    """Run the trainer until ``max_steps``, ``stop``, or an idle stream; see the module doc."""
    cfg = config.trainer
    stop = stop or threading.Event()
    world = distributed.setup(pick_device(cfg.device).type)  # nccl for CUDA, else gloo
    with ExitStack() as cleanup:  # closes what the run opens, last opened first
        cleanup.callback(distributed.teardown, world)

        # -- setup: device, precision ------------------------------------------------------
        device = pick_device(cfg.device, world.local_rank)  # this rank's GPU under torchrun
        amp_dtype = setup_torch(device, world, cfg.seed)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        # -- the model, resumed with its optimizer and offsets from the newest checkpoint --
        store = CheckpointStore(cfg.checkpoint_dir or Path("checkpoints"), cfg.keep_checkpoints)
        ckpt = store.load_latest(map_location=device)
        plugin, spec = build_model(ckpt, cfg)
        plugin.module.to(device)
        optimizer = configure_optimizer(plugin.module, cfg, device)
        learner = Learner(plugin, spec, optimizer, scaler)
        source = KafkaBatchSource(
            config, rank=world.rank, world_size=world.world_size, start=cfg.start,
            start_record=StartRecord(store.directory, world.rank),
            idle_timeout_s=cfg.idle_timeout_s, commit_every_s=cfg.commit_every_s,
        )
        run = resume(ckpt, learner, source)
        if cfg.compile:
            plugin.compile()

        # -- data: decoded, split and collated ahead of the step by the prefetch thread ----
        fixed_eval = load_eval_jsonl(cfg.eval_file) if cfg.eval_file else None
        holdout = 0.0 if fixed_eval is not None else cfg.holdout_fraction
        eval_set = EvalSet(cfg.eval_samples)
        prefetch = Prefetcher(source, partial(prepare, plugin, holdout,
                                              weighted=cfg.loss_weights), depth=cfg.prefetch)
        prefetch.start()
        cleanup.callback(prefetch.close)

        # -- reporting: feedback and metrics snapshots go out on one producer --------------
        producer = KafkaProducer(**kafka_client_options(config.kafka), linger_ms=20)
        cleanup.callback(close_producer, producer)
        metrics = TrainerMetrics(
            {"model": plugin.name, "device": str(device), "rank": str(world.rank)}
        )
        cleanup.callback(metrics.close)
        if world.main:
            metrics.serve(config.metrics.trainer_port, cfg.metrics_host)
        next_report = time.monotonic() + config.metrics.interval_s

        # -- the loop ----------------------------------------------------------------------
        result = TrainResult(run.step, run.step, ckpt.path if ckpt else None, None, "max_steps")
        loop_started = time.perf_counter()
        while True:
            if cfg.max_steps is not None and run.step >= cfg.max_steps:
                result.stopped = "max_steps"
                break
            lr = get_lr(run.step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Fetch every micro-batch of this step first: ranks must agree that all have
            # data before any of them enters a collective.
            prepared, exhausted = fetch_step(prefetch, stop, cfg.grad_accum)
            stopping, exhausted = distributed.any_flag([stop.is_set(), exhausted], world, device)
            if exhausted:
                # A partial step is dropped: its batches come again after a restart.
                result.stopped = "stopped" if stop.is_set() else "end of stream"
                break
            trainable = [p.train for p in prepared if p.train is not None]
            adopt_labels(plugin, optimizer, trainable, world)

            outcomes = []
            step_loss = torch.zeros((), device=device)
            for batch in trainable:
                with autocast(device, amp_dtype):
                    out = plugin.forward(batch, device)
                    # batch.weights is None when trainer.loss_weights is off (see prepare)
                    loss = batch_loss(out, batch.weights, cfg.label_smoothing)
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
            run.step += 1

            # Bookkeeping of the step just taken (one device-to-host copy per step).
            consumed = [(p.sourced.batch["batch_id"], p.sourced.batch["content_digest"])
                        for p in prepared]
            if world.distributed:
                consumed = [c for part in distributed.gather(consumed, world) for c in part]
            run.lineage.extend(consumed)
            run.trained = prefetch.state_dict()
            if cfg.commit_every_s is not None:
                # Advisory, between checkpoints: the balance stage paces its batches by this
                # position (balance.pace = trainer), and Kafka's lag tools show it. The
                # source sends it at most every commit_every_s, and at once when idle.
                source.commit(run.trained["offsets"], rate_limited=True)
            loss_value = float(step_loss)
            correct = positions = samples = 0
            for batch, (losses, right, count) in zip(trainable, outcomes, strict=True):
                correct += int((right * count).sum())
                positions += int(count.sum())
                samples += len(batch)
                send_feedback(producer, config.topics.feedback, plugin, batch, run.step,
                              losses.tolist(), right.tolist())
            for p in prepared:
                eval_set.add(p.heldout)
                metrics.count("heldout", len(p.heldout))
                if p.skipped:
                    metrics.count(f"skipped.{p.skipped}")
                if p.heldout_dropped:
                    metrics.count("dropped.unusable_heldout", p.heldout_dropped)
            metrics.count("batches", len(prepared))
            metrics.trained(samples, loss_value, correct, positions)
            metrics.gauge("step", run.step)
            metrics.gauge("lr", lr)
            metrics.gauge("lag", prepared[-1].sourced.lag)
            result.samples += samples
            result.batches += len(prepared)
            result.loss = loss_value
            if not math.isfinite(loss_value):
                raise TrainerError(f"loss is {loss_value} at step {run.step}: stopping before "
                                   "a checkpoint saves diverged weights")

            if run.step % cfg.eval_every == 0:
                samples_to_eval = fixed_eval if fixed_eval is not None else eval_set.samples()
                result.eval = run_eval(plugin, samples_to_eval, device, amp_dtype, metrics,
                                       run.step)
                run.evaluated_at = run.step
            if run.step % cfg.checkpoint_every == 0:
                saved = save_checkpoint(store, learner, run, cfg, source, world, metrics)
                result.checkpoint = saved or result.checkpoint
            if time.monotonic() >= next_report:
                report(metrics, source, prefetch.wait_s, producer, config.topics.metrics,
                       run.step)
                next_report = time.monotonic() + config.metrics.interval_s
            if stopping:
                result.stopped = "stopped"
                break

        # -- a clean stop: the final checkpoint, evaluation and report ---------------------
        result.wall_s = time.perf_counter() - loop_started
        result.wait_s = prefetch.wait_s
        result.startup_s = prefetch.startup_s
        result.step = run.step
        if run.step > run.last_saved:
            saved = save_checkpoint(store, learner, run, cfg, source, world, metrics)
            result.checkpoint = saved or result.checkpoint
        if run.evaluated_at != run.step:
            samples_to_eval = fixed_eval if fixed_eval is not None else eval_set.samples()
            result.eval = run_eval(plugin, samples_to_eval, device, amp_dtype, metrics, run.step)
        report(metrics, source, prefetch.wait_s, producer, config.topics.metrics, run.step)
        return result


# -- setup ------------------------------------------------------------------------------------


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's CUDA device when there is one, else Apple's MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_torch(device: torch.device, world: distributed.World, seed: int) -> torch.dtype | None:
    """Set torch up for ``device`` and seed it; the autocast dtype (``None``: float32)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave one core to the prefetch thread and Kafka's I/O thread: on models this
        # small, intra-op threads fighting them for cores cost more than they give.
        torch.set_num_threads(max(1, _cores() // world.world_size - 1))
    torch.manual_seed(seed + world.rank)
    # bf16 where the GPU has it (no loss scaling needed); fp16 + GradScaler otherwise.
    # On the CPU, full float32: CPU autocast is slower than it saves on small models.
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Mixed precision in ``dtype`` on ``device``; nothing when ``dtype`` is ``None``."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


def close_producer(producer: KafkaProducer) -> None:
    """Send what is buffered (the last feedback and snapshot), then close."""
    producer.flush(timeout=10)
    producer.close(timeout=10)


# -- the loop's parts, in the order it calls them ---------------------------------------------


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


def fetch_step(
    prefetch: Prefetcher[SourcedBatch, Prepared], stop: threading.Event, grad_accum: int
) -> tuple[list[Prepared], bool]:
    """The batches of one step: read until ``grad_accum`` of them are trainable (skipped
    ones are kept for their counts and held-out samples); and whether the stream ended or
    ``stop`` was set first."""
    prepared: list[Prepared] = []
    while len([p for p in prepared if p.train is not None]) < grad_accum:
        item = prefetch.get(stop)
        if item is None:
            return prepared, True
        prepared.append(item)
    return prepared, False


def adopt_labels(
    plugin: ModelPlugin, optimizer: torch.optim.Optimizer, batches: list[TrainBatch],
    world: distributed.World,
) -> None:
    """Grow the model by the labels first seen in ``batches`` (on any rank, in one order)."""
    new_labels = [lb for b in batches for lb in plugin.unseen_labels(b)]
    if world.distributed:
        new_labels = distributed.union_in_order(distributed.gather(new_labels, world))
    if new_labels:
        plugin.add_labels(new_labels, optimizer)
        log.info("new labels %s: %d classes", new_labels, len(plugin.labels))


def run_eval(
    plugin: ModelPlugin, samples: list[BatchSample], device: torch.device,
    amp_dtype: torch.dtype | None, metrics: TrainerMetrics, step: int,
) -> dict[str, float]:
    """Evaluate on ``samples`` (none: an empty dict); the scores become ``eval.*`` gauges."""
    result = evaluate(plugin, samples, device, autocast(device, amp_dtype)) if samples else {}
    for name, value in result.items():
        metrics.gauge(f"eval.{name}", value)
    if result:
        metrics.count("evals")
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return result


def report(
    metrics: TrainerMetrics, source: KafkaBatchSource, wait_s: float, producer: KafkaProducer,
    topic: str, step: int,
) -> None:
    """Send a metrics snapshot to ``topic`` and log the progress line."""
    metrics.set_counter("records", source.counters.records)
    for reason, n in source.counters.dropped.items():
        metrics.set_counter(f"dropped.{reason}", n)
    snap = metrics.snapshot(wait_s)
    producer.send(topic, key=b"trainer", value=encode("MetricSnapshot", snap))
    g = snap["gauges"]
    log.info(
        "step %d loss %.4f acc %.3f %.0f samples/s data-wait %.0f%% lag %d",
        step, g.get("loss", float("nan")), g.get("accuracy", float("nan")),
        g.get("samples_per_s", 0.0), 100 * g.get("data_wait_share", 0.0), g.get("lag", 0),
    )


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
