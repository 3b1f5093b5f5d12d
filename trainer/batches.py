"""What one batch becomes around a training step.

Before it, in the prefetch thread: ``prepare`` splits a sourced batch into the samples held
out for evaluation (by a hash of their id) and the rest, collated into tensors. After it:
``per_sample`` turns the logits into per-sample losses and hits, and ``send_feedback``
sends them to ``training-feedback`` as one ``Feedback`` record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from kafka import KafkaProducer

from schemas.records import BatchSample, Feedback, SampleLoss
from streams.serde import encode
from trainer.evaluate import is_heldout
from trainer.loss import WeightError, normalized_weights
from trainer.models import IGNORE, BatchError, ModelPlugin, TrainBatch
from trainer.source import SourcedBatch

log = logging.getLogger("sluice.trainer")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A sourced batch split into trainable tensors and held-out samples."""

    sourced: SourcedBatch
    train: TrainBatch | None
    heldout: list[BatchSample]
    skipped: str | None = None
    """Why ``train`` is ``None``: ``empty`` (no samples), ``all_heldout``, or ``unusable``
    (the model cannot collate it: wrong embedding size, non-finite values, ...)."""
    heldout_dropped: int = 0
    """Held-out samples the model cannot collate, kept out of the evaluation set."""


def prepare(plugin: ModelPlugin, holdout: float, item: SourcedBatch, *,
            weighted: bool = True) -> Prepared:
    """The prefetch thread's transform: split off held-out samples, collate the rest, and
    (``weighted``) attach each trained sample's importance weight.

    A batch the model cannot collate is skipped (never raised: the trainer would stop at
    the same batch after every restart); held-out samples it cannot collate are dropped,
    or evaluation would later skip the whole chunk they land in.
    """
    samples = item.batch["samples"]
    if not samples:
        return _skip(item, "empty", "no samples")
    batch_id = item.batch["batch_id"]
    heldout = [s for s in samples if is_heldout(s["id"], holdout)]
    kept = [s for s in samples if not is_heldout(s["id"], holdout)]
    dropped = 0
    if heldout and _collate_error(plugin, batch_id, heldout) is not None:
        usable = [s for s in heldout if _collate_error(plugin, batch_id, [s]) is None]
        dropped = len(heldout) - len(usable)
        log.warning("batch %s (%s[%d]@%d): %d held-out samples the model cannot collate "
                    "are left out of evaluation", batch_id, item.topic, item.partition,
                    item.offset, dropped)
        heldout = usable
    if not kept:
        return Prepared(item, None, heldout, "all_heldout", dropped)
    try:
        train = plugin.collate(batch_id, kept)
        if weighted:
            train = _with_weights(train, kept)
        return Prepared(item, train, heldout, None, dropped)
    except BatchError as exc:
        return _skip(item, "unusable", str(exc))
    except Exception as exc:  # a plugin's collate failing on this batch's content: skipping
        # it beats stopping the trainer at the same batch on every restart
        return _skip(item, "unusable", f"{type(exc).__name__} in collate: {exc}")


def _with_weights(train: TrainBatch, kept: list[BatchSample]) -> TrainBatch:
    """``train`` with the loss weight of each of its rows (by id: a plugin may reorder
    rows): the inverse of the sample's importance weight. A batch carries ``target share /
    natural share`` per sample (how much more often the balancer drew its class than the
    stream offers it, ``agents.policy``); weighting the loss by the inverse gives the
    natural mix's risk back. ``BatchError`` when they cannot weight a loss (a NaN, zero or
    negative importance weight)."""
    by_id = {s["id"]: s["weight"] for s in kept}
    try:
        importance = torch.tensor([float(by_id[i]) for i in train.ids], dtype=torch.float32)
        if not (torch.isfinite(importance).all() and (importance > 0).all()):
            raise WeightError(f"importance weights must be finite and positive: "
                              f"{importance.tolist()}")
        weights = 1.0 / importance
        normalized_weights(weights)
    except (KeyError, WeightError) as exc:
        raise BatchError(f"batch {train.batch_id}: weights: {exc}") from exc
    return replace(train, weights=weights)


def _collate_error(plugin: ModelPlugin, batch_id: str, samples: list[BatchSample]) -> str | None:
    """Why ``plugin`` cannot collate ``samples``; ``None`` when it can."""
    try:
        plugin.collate(batch_id, samples)
    except Exception as exc:  # any failure makes the samples unusable, see prepare
        return f"{type(exc).__name__}: {exc}"
    return None


def _skip(item: SourcedBatch, reason: str, why: str) -> Prepared:
    log.warning("skipping batch %s (%s[%d]@%d): %s: %s", item.batch["batch_id"], item.topic,
                item.partition, item.offset, reason, why)
    return Prepared(item, None, [], reason)


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


def send_feedback(
    producer: KafkaProducer, topic: str, plugin: ModelPlugin, batch: TrainBatch, step: int,
    losses: list[float], right: list[float],
) -> None:
    """One ``Feedback`` record: the per-sample losses of ``batch`` at ``step``."""
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

