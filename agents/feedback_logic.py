"""The feedback stage's logic: loss statistics, difficulty factors and hard examples.

Pure: given the stored ``LossEMA`` state and one ``Feedback`` record from the trainer, it
returns the new state, the difficulty factor per class (what the balance stage multiplies
its policy by) and the ids to replay. The agent stores the state (reassigning the table
value), publishes the difficulty and pushes the hard ids to the partition's replay queue
(``ClassBuffers.push_replay``; the partition is the first field of the batch id).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
) -> FeedbackOutcome:
    """Fold one Feedback record into the loss statistics and pick its hard examples.

    The statistics are updated first, then the threshold ``mean + hard_k·std`` is taken
    from the overall running loss (so the very first record is judged against itself).
    ``alpha`` is the loss EMA decay (``BalanceSettings.loss_alpha``); a stored state with
    another α starts afresh.
    """
    loss = LossEMA.restore(state, alpha)
    pairs = [(item["label"], float(item["loss"])) for item in feedback["losses"]]
    loss.update(pairs)
    overall = loss.overall
    threshold = overall.mean + hard_k * overall.std if overall.norm > 0.0 else math.inf
    return FeedbackOutcome(
        state=loss.to_dict(),
        difficulty=difficulty_factors(loss),
        hard_ids=hard_examples(feedback["losses"], threshold),
        threshold=threshold,
    )
