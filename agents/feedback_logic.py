"""The feedback stage's logic: loss statistics, difficulty factors and hard examples.

Pure: given the stored ``LossEMA`` state and one ``Feedback`` record from the trainer, it
returns the new state, the difficulty factor per class (what the balance stage multiplies
its policy by) and the ids to replay. The agent stores the state (reassigning the table
value), publishes the difficulty and pushes the hard ids to the partition's replay queue
(``ClassBuffers.push_replay``; the partition is the first field of the batch id).

Two named replay policies pick the hard examples (``balance.replay_policy``):

- ``hard_k``: a sample's loss above ``mean + k·std`` of the running loss statistics. It
  rewards mislabeled and unlearnable samples, whose loss stays high (Mindermann et al.
  2022, "Prioritized training on points that are learnable, worth learning, and not yet
  learnt": RHO-LOSS);
- ``reducible``: the trainer's loss minus the sample's *irreducible* loss, the loss of a
  small reference model (``ReferenceModel``, softmax regression on the curated embeddings)
  trained on a held-out slice of the curated stream. It replays as many samples as
  ``hard_k`` would (the same budget), the ones with the highest positive value: a
  mislabeled sample is as hard for the reference model, so its value stays low.

A record is checked first (``feedback_problem``: a batch id sluice made, a partition that
exists, labels that are valid class names); the classes are bounded (``max_classes``):
losses of a class beyond them are ignored and counted, so a foreign producer on the
feedback topic can grow neither the statistics nor the difficulty hash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from agents.compose import ComposeError, label_problem, parse_batch_id
from agents.stats import LossEMA
from schemas.records import Feedback, SampleLoss

# Difficulty factors are clipped so one class can neither vanish from batches (loss near
# zero) nor take them over (one diverging class); γ then scales within these bounds.
DIFFICULTY_FLOOR = 0.1
DIFFICULTY_CEIL = 10.0

ReplayPolicy = Literal["hard_k", "reducible"]
REPLAY_POLICIES: tuple[str, ...] = get_args(ReplayPolicy)


@dataclass(frozen=True)
class FeedbackOutcome:
    """What one feedback record changes."""

    state: dict[str, Any]
    """The new ``LossEMA`` state (a fresh dict: assign it to the table)."""
    difficulty: dict[str, float]
    """Loss factor per class: class loss / mean class loss, clipped."""
    hard_ids: list[str]
    """Ids whose loss (or reducible loss) exceeds ``threshold``, hardest first."""
    threshold: float
    """``mean + k·std`` of the running loss statistics (inf before any loss); under the
    ``reducible`` policy it sets how many are replayed, not which."""
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


class ReferenceModel:
    """The reference model of RHO-LOSS: softmax regression on embeddings, small enough to
    fit in a worker in well under a second on a few thousand held-out samples.

    ``weights`` is (dim, classes), ``bias`` (classes,); ``labels`` names the columns.
    ``losses`` is the cross-entropy ``−log softmax(x·W + b)[label]``, as the trainer
    reports it (no label smoothing); a label the model never saw has no loss (NaN).
    """

    def __init__(self, labels: Sequence[str], weights: np.ndarray, bias: np.ndarray) -> None:
        self.labels = list(labels)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        self._column = {label: k for k, label in enumerate(self.labels)}

    @classmethod
    def fit(cls, x: np.ndarray, labels: Sequence[str], *, l2: float = 1e-3,
            steps: int = 200, lr: float = 1.0) -> ReferenceModel:
        """Full-batch gradient descent on the mean cross-entropy plus ``l2·|W|²/2``, from
        zero weights: deterministic, the same model on every worker for the same data."""
        names = sorted(set(labels))
        column = {label: k for k, label in enumerate(names)}
        x = np.asarray(x, dtype=np.float64).reshape(len(labels), -1)
        onehot = np.zeros((len(labels), len(names)))
        onehot[np.arange(len(labels)), [column[label] for label in labels]] = 1.0
        weights = np.zeros((x.shape[1], len(names)))
        bias = np.zeros(len(names))
        for _ in range(steps):
            err = (_softmax(x @ weights + bias) - onehot) / max(len(labels), 1)
            weights -= lr * (x.T @ err + l2 * weights)
            bias -= lr * err.sum(axis=0)
        return cls(names, weights, bias)

    def losses(self, x: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """Cross-entropy of each (embedding, label); NaN for a label it does not know."""
        x = np.asarray(x, dtype=np.float64).reshape(len(labels), -1)
        if not len(labels):
            return np.empty(0)
        logits = x @ self.weights + self.bias
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        out = np.full(len(labels), np.nan)
        for i, label in enumerate(labels):
            k = self._column.get(label)
            if k is not None:
                out[i] = log_norm[i] - logits[i, k]
        return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def reducible_losses(losses: Sequence[SampleLoss], irreducible: Mapping[str, float]
                     ) -> dict[str, float]:
    """Each sample's value for selection: the trainer's loss minus its irreducible loss
    (samples without a finite irreducible loss are left out; the highest loss of an id)."""
    out: dict[str, float] = {}
    for item in losses:
        ref = irreducible.get(item["id"])
        value = float(item["loss"]) - ref if ref is not None else math.nan
        if math.isfinite(value):
            out[item["id"]] = max(value, out.get(item["id"], value))
    return out


def reducible_examples(values: Mapping[str, float], n: int) -> list[str]:
    """The ``n`` ids of highest reducible loss, highest first (ties by id), among those
    above zero (a sample the reference model finds as hard holds nothing left to learn)."""
    positive = sorted((i for i, v in values.items() if v > 0.0),
                      key=lambda i: (-values[i], i))
    return positive[:max(n, 0)]


def process_feedback(
    state: Mapping[str, Any] | None,
    feedback: Feedback,
    *,
    alpha: float,
    hard_k: float,
    max_classes: int | None = None,
    policy: str = "hard_k",
    irreducible: Mapping[str, float] | None = None,
) -> FeedbackOutcome:
    """Fold one Feedback record into the loss statistics and pick its hard examples.

    The statistics are updated first, then the threshold ``mean + hard_k·std`` is taken
    from the overall running loss (so the very first record is judged against itself).
    ``alpha`` is the loss EMA decay (``BalanceSettings.loss_alpha``); a stored state with
    another α starts afresh. Losses of a class the statistics do not hold yet are ignored
    once they hold ``max_classes`` (None: no bound). Under ``policy`` ``reducible`` as
    many are picked by ``reducible_examples`` over the losses minus ``irreducible`` (by
    id) instead.
    """
    if policy not in REPLAY_POLICIES:
        raise ValueError(f"unknown replay policy {policy!r}; expected one of "
                         f"{', '.join(REPLAY_POLICIES)}")
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
    hard = hard_examples(losses, threshold)
    if policy == "reducible":  # the same budget, spent on what is learnable
        hard = reducible_examples(reducible_losses(losses, irreducible or {}), len(hard))
    return FeedbackOutcome(
        state=loss.to_dict(),
        difficulty=difficulty_factors(loss),
        hard_ids=hard,
        threshold=threshold,
        ignored=len(feedback["losses"]) - len(losses),
    )
