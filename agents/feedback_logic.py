"""The feedback stage's logic: loss statistics, difficulty factors and hard examples.

Pure: given the stored ``LossEMA`` state and one ``Feedback`` record from the trainer, it
returns the new state, the difficulty factor per class (what the balance stage multiplies
its policy by) and the ids to replay. The agent stores the state (reassigning the table
value), publishes the difficulty and pushes the hard ids to the partition's replay queue
(``ClassBuffers.push_replay``; the partition is the first field of the batch id).

A record is checked first (``feedback_problem``: a batch id sluice made, a partition that
exists, labels that are valid class names); the classes are bounded (``max_classes``):
losses of a class beyond them are ignored and counted, so a foreign producer on the
feedback topic can grow neither the statistics nor the difficulty hash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agents.compose import ComposeError, label_problem, parse_batch_id
from agents.stats import LossEMA
from schemas.records import Feedback, SampleLoss

# Difficulty factors are clipped so one class can neither vanish from batches (loss near
# zero) nor take them over (one diverging class); γ then scales within these bounds.
DIFFICULTY_FLOOR = 0.1
DIFFICULTY_CEIL = 10.0


@dataclass(frozen=True)
class FeedbackOutcome:
    """What one feedback record changes."""

    state: dict[str, Any]
    """The new ``LossEMA`` state (a fresh dict: assign it to the table)."""
    difficulty: dict[str, float]
    """Loss factor per class: class loss / mean class loss, clipped."""
    hard_ids: list[str]
    """Ids whose loss exceeds ``threshold``, hardest first."""
    threshold: float
    """``mean + k·std`` of the running loss statistics (inf before any loss)."""
    ignored: int = 0
    """Losses left out: their class is new and the statistics hold ``max_classes``."""


def feedback_problem(record: Mapping[str, Any], partitions: int | None = None
                     ) -> tuple[str, str] | None:
    """``(reason, detail)`` when a Feedback record cannot be folded, else None.

    Reasons: ``invalid:batch_id`` (not ``<partition>-<sequence>-<12 hex>``),
    ``invalid:partition`` (not below ``partitions``), ``invalid:label`` (a loss whose label
    is not a valid class name, ``agents.compose.label_problem``).
    """
    try:
        partition, _ = parse_batch_id(record.get("batch_id"))
    except ComposeError as exc:
        return "invalid:batch_id", str(exc)
    if partitions is not None and partition >= partitions:
        return "invalid:partition", f"partition {partition} of {partitions}"
    for loss in record.get("losses") or ():
        problem = label_problem(loss.get("label"))
        if problem is not None:
            return "invalid:label", f"{problem}: {str(loss.get('label'))[:80]!r}"
    return None


def difficulty_factors(
    loss: LossEMA, *, floor: float = DIFFICULTY_FLOOR, ceil: float = DIFFICULTY_CEIL
) -> dict[str, float]:
    """Each class's EMA loss over the (unweighted) mean of the class EMA losses.

    Classes without feedback yet are absent (the policy counts them as 1); all ones when
    every class loss is zero.
    """
    means = loss.get()
    if not means:
        return {}
    avg = sum(means.values()) / len(means)
    if avg <= 0.0 or not math.isfinite(avg):
        return dict.fromkeys(means, 1.0)
    return {c: min(max(m / avg, floor), ceil) for c, m in means.items()}


def hard_examples(losses: list[SampleLoss], threshold: float) -> list[str]:
    """Ids with a loss strictly above ``threshold``, hardest first (ties by id), unique."""
    best: dict[str, float] = {}
    for item in losses:
        value = float(item["loss"])
        if math.isfinite(value) and value > threshold:
            best[item["id"]] = max(value, best.get(item["id"], value))
    return sorted(best, key=lambda i: (-best[i], i))


def process_feedback(
    state: Mapping[str, Any] | None,
    feedback: Feedback,
    *,
    alpha: float,
    hard_k: float,
    max_classes: int | None = None,
) -> FeedbackOutcome:
    """Fold one Feedback record into the loss statistics and pick its hard examples.

    The statistics are updated first, then the threshold ``mean + hard_k·std`` is taken
    from the overall running loss (so the very first record is judged against itself).
    ``alpha`` is the loss EMA decay (``BalanceSettings.loss_alpha``); a stored state with
    another α starts afresh. Losses of a class the statistics do not hold yet are ignored
    once they hold ``max_classes`` (None: no bound).
    """
    loss = LossEMA.restore(state, alpha)
    losses = list(feedback["losses"])
    if max_classes is not None:
        known = set(loss.classes)
        for label in dict.fromkeys(item["label"] for item in losses):
            if label not in known and len(known) < max_classes:
                known.add(label)
        losses = [item for item in losses if item["label"] in known]
    loss.update((item["label"], float(item["loss"])) for item in losses)
    overall = loss.overall
    threshold = overall.mean + hard_k * overall.std if overall.norm > 0.0 else math.inf
    return FeedbackOutcome(
        state=loss.to_dict(),
        difficulty=difficulty_factors(loss),
        hard_ids=hard_examples(losses, threshold),
        threshold=threshold,
        ignored=len(feedback["losses"]) - len(losses),
    )
