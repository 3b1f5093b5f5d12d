"""Feedback logic: loss state, difficulty factors, hard-example selection."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from agents.feedback_logic import (
    DIFFICULTY_CEIL,
    DIFFICULTY_FLOOR,
    difficulty_factors,
    feedback_problem,
    hard_examples,
    process_feedback,
)
from agents.stats import LossEMA
from schemas.records import Feedback, SampleLoss


def _feedback(pairs: list[tuple[str, str, float]], step: int = 0) -> Feedback:
    return Feedback(
        batch_id=f"0-{step}-abcdef012345", step=step, model="embedding-classifier",
        created_at=1_700_000_000_000,
        losses=[SampleLoss(id=i, label=c, loss=v, correct=None) for i, c, v in pairs],
    )


def test_first_record_is_judged_against_its_own_mean_and_std() -> None:
    values = [1.0] * 19 + [9.0]
    out = process_feedback(
        None, _feedback([(f"s{i}", "a", v) for i, v in enumerate(values)]), alpha=0.9,
        hard_k=2.0,
    )
    assert out.threshold == pytest.approx(np.mean(values) + 2.0 * np.std(values))
    assert out.hard_ids == ["s19"]
    assert out.difficulty == {"a": 1.0}
    json.dumps(out.state)  # storable as a table value


def test_threshold_uses_the_running_statistics_and_state_carries_over() -> None:
    rng = np.random.default_rng(2)
    state: dict[str, Any] | None = None
    for step in range(50):
        losses = rng.normal(2.0, 0.2, 32)
        out = process_feedback(
            state, _feedback([(f"{step}-{i}", "a", float(v)) for i, v in enumerate(losses)],
                             step), alpha=0.9, hard_k=2.0,
        )
        state = out.state
    assert state is not None
    loss = LossEMA.from_dict(state)
    assert loss.overall.mean == pytest.approx(2.0, abs=0.05)
    assert loss.overall.std == pytest.approx(0.2, abs=0.03)
    # One outlier among ordinary losses stands out; the ordinary ones do not.
    out = process_feedback(
        state, _feedback([("x", "a", 2.0), ("y", "a", 2.1), ("z", "a", 5.0)], 99), alpha=0.9,
        hard_k=2.0,
    )
    assert out.hard_ids == ["z"]
    assert out.threshold == pytest.approx(
        LossEMA.from_dict(out.state).overall.mean + 2 * LossEMA.from_dict(out.state).overall.std
    )


def test_difficulty_is_class_loss_over_mean_class_loss() -> None:
    out = process_feedback(
        None,
        _feedback([("1", "easy", 0.5), ("2", "easy", 0.5), ("3", "hard", 1.5), ("4", "mid", 1.0)]),
        alpha=0.9, hard_k=3.0,
    )
    assert out.difficulty == pytest.approx({"easy": 0.5, "hard": 1.5, "mid": 1.0})
    assert np.mean(list(out.difficulty.values())) == pytest.approx(1.0)


def test_difficulty_is_clipped_and_degenerate_cases() -> None:
    loss = LossEMA(0.9).update([("a", 0.0), ("b", 100.0)])
    assert difficulty_factors(loss) == {"a": DIFFICULTY_FLOOR, "b": 2.0}
    loss = LossEMA(0.9).update([("a", 1e-9)] + [(f"c{i}", 10.0) for i in range(30)])
    assert difficulty_factors(loss)["a"] == DIFFICULTY_FLOOR
    loss = LossEMA(0.9).update([("a", 1000.0)] + [(f"c{i}", 0.0) for i in range(30)])
    assert difficulty_factors(loss)["a"] == DIFFICULTY_CEIL
    assert difficulty_factors(LossEMA(0.9)) == {}
    assert difficulty_factors(LossEMA(0.9).update([("a", 0.0), ("b", 0.0)])) == {
        "a": 1.0, "b": 1.0}


def test_hard_examples_are_unique_hardest_first_and_skip_non_finite() -> None:
    losses = [
        SampleLoss(id="a", label="x", loss=3.0, correct=False),
        SampleLoss(id="b", label="x", loss=5.0, correct=False),
        SampleLoss(id="a", label="x", loss=4.0, correct=False),
        SampleLoss(id="c", label="x", loss=math.nan, correct=None),
        SampleLoss(id="d", label="x", loss=1.0, correct=True),
    ]
    assert hard_examples(losses, 2.0) == ["b", "a"]
    assert hard_examples(losses, math.inf) == []


def test_empty_feedback_and_changed_alpha() -> None:
    out = process_feedback(None, _feedback([]), alpha=0.9, hard_k=2.0)
    assert out.hard_ids == [] and out.threshold == math.inf and out.difficulty == {}
    state = process_feedback(None, _feedback([("1", "a", 1.0)]), alpha=0.9, hard_k=2.0).state
    fresh = process_feedback(state, _feedback([("2", "b", 1.0)]), alpha=0.5, hard_k=2.0)
    assert set(LossEMA.from_dict(fresh.state).classes) == {"b"}


def test_the_classes_are_bounded_and_the_rest_is_ignored() -> None:
    """A foreign producer's labels cannot grow the statistics: past ``max_classes`` the
    losses of new classes are left out (counted) and never chosen as hard examples."""
    first = process_feedback(None, _feedback([("a1", "a", 0.5), ("b1", "b", 0.5)]),
                             alpha=0.9, hard_k=2.0, max_classes=2)
    assert first.ignored == 0
    spray = _feedback([(f"x{i}", f"label{i}", 50.0) for i in range(100)] + [("a2", "a", 0.4)],
                      step=1)
    out = process_feedback(first.state, spray, alpha=0.9, hard_k=2.0, max_classes=2)
    assert out.ignored == 100
    assert set(out.state["classes"]) == {"a", "b"} and set(out.difficulty) == {"a", "b"}
    assert out.hard_ids == []
    unbounded = process_feedback(first.state, spray, alpha=0.9, hard_k=2.0)
    assert len(unbounded.state["classes"]) == 102


def test_feedback_problem_names_what_cannot_be_folded() -> None:
    good = _feedback([("a1", "python", 0.5)])
    assert feedback_problem(good) is None and feedback_problem(good, partitions=1) is None
    assert feedback_problem(dict(good, batch_id="not-a-batch"))[0] == "invalid:batch_id"  # type: ignore[index]
    assert feedback_problem(dict(good, batch_id="4-0-abcdef012345"), partitions=4)[0] == (  # type: ignore[index]
        "invalid:partition")
    bad_label = _feedback([("a1", "python", 0.5), ("a2", "no spaces", 0.5)])
    assert feedback_problem(bad_label)[0] == "invalid:label"  # type: ignore[index]
