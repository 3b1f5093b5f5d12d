"""ClassEMA and LossEMA against numpy on the same data, half-life, serialization."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agents.stats import (
    ClassEMA,
    EWMoments,
    LossEMA,
    StatsStateError,
    half_life_samples,
)

CLASSES = ["a", "b", "c"]


def _stream(n: int, probs: list[float], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [CLASSES[i] for i in rng.choice(len(CLASSES), size=n, p=probs)]


def _numpy_ema(labels: list[str], alpha: float, window: int) -> tuple[np.ndarray, float]:
    """The DESIGN.md recursion over full windows, vectorized by class."""
    idx = np.array([CLASSES.index(x) for x in labels])
    full = len(idx) // window
    counts = np.stack(
        [np.bincount(idx[w * window:(w + 1) * window], minlength=len(CLASSES))
         for w in range(full)]
    ).astype(float)
    ema, norm = np.zeros(len(CLASSES)), 0.0
    for row in counts:
        ema = alpha * ema + (1 - alpha) * row
        norm = alpha * norm + (1 - alpha)
    return ema, norm


def test_class_ema_matches_numpy_recursion() -> None:
    alpha, window = 0.8, 50
    labels = _stream(50 * 37 + 13, [0.6, 0.3, 0.1])
    ema = ClassEMA(alpha, window).update_many(labels)
    expected, norm = _numpy_ema(labels, alpha, window)
    np.testing.assert_allclose([ema.ema[c] for c in CLASSES], expected, rtol=1e-12)
    assert ema.windows == 37 and ema.seen == 13 and ema.total == len(labels)
    np.testing.assert_allclose([ema.get()[c] for c in CLASSES], expected / norm, rtol=1e-12)
    np.testing.assert_allclose(
        [ema.shares()[c] for c in CLASSES], expected / expected.sum(), rtol=1e-12
    )


def test_class_ema_estimates_the_mix_of_a_stationary_stream() -> None:
    labels = _stream(20_000, [0.8, 0.15, 0.05], seed=3)
    shares = ClassEMA(0.95, 64).update_many(labels).shares()
    np.testing.assert_allclose([shares[c] for c in CLASSES], [0.8, 0.15, 0.05], atol=0.03)


def test_absent_class_decays_and_before_first_window_uses_current_counts() -> None:
    ema = ClassEMA(0.5, 4)
    ema.update_many(["a", "a", "b"])
    assert ema.windows == 0
    assert ema.get() == pytest.approx({"a": 4 * 2 / 3, "b": 4 * 1 / 3})
    assert ema.shares() == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    ema.update("a")  # closes window 1: a=3, b=1
    ema.update_many(["a"] * 4)  # window 2: b absent, decays
    assert ema.ema["b"] == pytest.approx(0.5 * 0.5 * 1)
    assert ema.get()["b"] == pytest.approx(0.25 / 0.75)
    assert ClassEMA(0.5, 4).get() == {} and ClassEMA(0.5, 4).shares() == {}


@pytest.mark.parametrize(("alpha", "window"), [(0.5 ** (1 / 4), 32), (0.9, 64), (0.5, 10)])
def test_step_change_is_half_absorbed_after_the_half_life(alpha: float, window: int) -> None:
    # Exact mixes per window (no sampling noise): 80/20 for a long time, then 20/80.
    before = (["a"] * (window * 4 // 5) + ["b"] * (window - window * 4 // 5))
    after = (["a"] * (window - window * 4 // 5) + ["b"] * (window * 4 // 5))
    ema = ClassEMA(alpha, window)
    for _ in range(400):
        ema.update_many(before)
    old = ema.shares()["a"]
    new = len([x for x in after if x == "a"]) / window
    half = half_life_samples(alpha, window)
    assert half == pytest.approx(window * math.log(2) / -math.log(alpha))
    # The EMA only moves at window ends: half-way is crossed between the window ends
    # around the half-life (exactly at it when the half-life is a whole number of windows).
    progress = []
    for _ in range(math.ceil(half / window) + 1):
        ema.update_many(after)
        progress.append((ema.shares()["a"] - old) / (new - old))
    whole = half / window
    if abs(whole - round(whole)) < 1e-9:
        assert progress[round(whole) - 1] == pytest.approx(0.5, abs=1e-9)
    else:
        assert progress[math.floor(whole) - 1] < 0.5 < progress[math.ceil(whole) - 1]
    # And in general: after m windows the step is (1 − α^m) absorbed.
    for m, p in enumerate(progress, start=1):
        assert p == pytest.approx(1 - alpha**m, abs=1e-9)


def test_class_ema_round_trips_through_json_and_keeps_updating_identically() -> None:
    labels = _stream(1_000, [0.5, 0.3, 0.2], seed=1)
    one = ClassEMA(0.9, 16).update_many(labels[:517])
    state = json.loads(json.dumps(one.to_dict()))
    two = ClassEMA.from_dict(state)
    one.update_many(labels[517:])
    two.update_many(labels[517:])
    assert one.to_dict() == two.to_dict()
    assert one.to_dict() is not one.to_dict()  # a fresh dict every time: reassignable


def test_class_ema_restore_and_malformed_state() -> None:
    state = ClassEMA(0.9, 16).update_many(["a"] * 40).to_dict()
    assert ClassEMA.restore(state, 0.9, 16).total == 40
    assert ClassEMA.restore(state, 0.8, 16).total == 0  # parameters changed: afresh
    assert ClassEMA.restore(None, 0.9, 16).total == 0
    with pytest.raises(StatsStateError):
        ClassEMA.from_dict({"alpha": 0.9})
    with pytest.raises(StatsStateError):
        ClassEMA(1.0, 16)


def test_class_ema_merge_adds_corrected_counts() -> None:
    left = ClassEMA(0.9, 16).update_many(_stream(16 * 3, [0.9, 0.05, 0.05], seed=4))
    right = ClassEMA(0.9, 16).update_many(_stream(16 * 40 + 5, [0.1, 0.1, 0.8], seed=5))
    merged = left.merge(right)
    for c in CLASSES:
        assert merged.get().get(c, 0.0) == pytest.approx(
            left.get().get(c, 0.0) + right.get().get(c, 0.0)
        )
    assert merged.total == left.total + right.total
    with pytest.raises(StatsStateError):
        left.merge(ClassEMA(0.8, 16))


def _numpy_ew(groups: list[np.ndarray], alpha: float) -> tuple[float, float]:
    mean = sq = norm = 0.0
    for g in groups:
        mean = alpha * mean + (1 - alpha) * g.mean()
        sq = alpha * sq + (1 - alpha) * (g**2).mean()
        norm = alpha * norm + (1 - alpha)
    return mean / norm, math.sqrt(sq / norm - (mean / norm) ** 2)


def test_loss_ema_matches_numpy_per_class_and_overall() -> None:
    rng = np.random.default_rng(7)
    alpha = 0.8
    loss = LossEMA(alpha)
    records = []
    for _ in range(30):
        labels = rng.choice(["x", "y"], size=32, p=[0.7, 0.3])
        values = np.where(labels == "x", rng.gamma(2.0, 0.5, 32), rng.gamma(5.0, 0.5, 32))
        records.append((labels, values))
        loss.update(zip(labels.tolist(), values.tolist(), strict=True))
    for c in ("x", "y"):
        mean, std = _numpy_ew([v[lab == c] for lab, v in records if (lab == c).any()], alpha)
        assert loss.get()[c] == pytest.approx(mean, rel=1e-9)
        assert loss.std()[c] == pytest.approx(std, rel=1e-9)
    mean, std = _numpy_ew([v for _, v in records], alpha)
    assert loss.overall.mean == pytest.approx(mean, rel=1e-9)
    assert loss.overall.std == pytest.approx(std, rel=1e-9)


def test_ew_moments_of_a_stationary_stream_approach_numpy_mean_and_std() -> None:
    rng = np.random.default_rng(11)
    data = rng.normal(3.0, 0.5, size=(400, 64))
    stat = EWMoments(0.95)
    for row in data:
        stat.update_values(row.tolist())
    assert stat.mean == pytest.approx(data.mean(), abs=0.03)
    assert stat.std == pytest.approx(data.std(), abs=0.03)
    assert stat.count == data.size


def test_loss_ema_single_record_is_its_own_mean_and_std_and_skips_non_finite() -> None:
    loss = LossEMA(0.9).update([("a", 1.0), ("a", 3.0), ("b", 2.0), ("b", math.nan)])
    assert loss.get() == pytest.approx({"a": 2.0, "b": 2.0})
    assert loss.std()["a"] == pytest.approx(1.0)
    assert loss.overall.mean == pytest.approx(2.0)
    assert loss.overall.std == pytest.approx(np.std([1.0, 3.0, 2.0]))
    # An absent class keeps its value.
    loss.update([("a", 10.0)])
    assert loss.get()["b"] == pytest.approx(2.0)


def test_loss_ema_round_trips_through_json() -> None:
    loss = LossEMA(0.7).update([("a", 1.0), ("b", 4.0)]).update([("a", 2.0)])
    back = LossEMA.from_dict(json.loads(json.dumps(loss.to_dict())))
    assert back.to_dict() == loss.to_dict()
    assert LossEMA.restore(loss.to_dict(), 0.5).classes == {}
    with pytest.raises(StatsStateError):
        LossEMA.from_dict({"alpha": 0.7, "classes": {"a": {}}, "overall": {}})
