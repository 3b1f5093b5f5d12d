"""Sampling policies: formulas against numpy, limits, difficulty, importance weights."""

from __future__ import annotations

import numpy as np
import pytest

from agents.config import BalanceSettings
from agents.policy import (
    POLICIES,
    PolicyError,
    class_weights,
    label_for,
    policy_label,
    target_shares,
    targets_for,
)

EMA = {"a": 51.2, "b": 9.6, "c": 3.2}  # 80/15/5 of a 64-sample window


def _vec(d: dict[str, float]) -> np.ndarray:
    return np.array([d[c] for c in sorted(EMA)])


def test_every_policy_returns_shares_summing_to_one_and_consistent_weights() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        ema = {f"c{i}": float(v) for i, v in enumerate(rng.gamma(0.5, 20.0, n))}
        difficulty = {c: float(v) for c, v in zip(ema, rng.uniform(0.2, 3.0, n), strict=True)}
        for policy in POLICIES:
            t = target_shares(ema, policy, epsilon=float(rng.uniform(0.1, 5)),
                              tau=float(rng.uniform(0, 2)), difficulty=difficulty,
                              gamma=float(rng.uniform(0, 2)), horizon=10.0)
            assert sum(t.shares.values()) == pytest.approx(1.0)
            assert all(v >= 0 for v in t.shares.values())
            for c, w in t.weights.items():
                assert w * t.natural[c] == pytest.approx(t.shares[c])


def test_natural_is_the_ema_mix() -> None:
    t = target_shares(EMA, "natural")
    np.testing.assert_allclose(_vec(t.shares), [0.8, 0.15, 0.05])
    assert t.weights == pytest.approx(dict.fromkeys(EMA, 1.0))


def test_inverse_is_ema_over_ema_plus_epsilon() -> None:
    ema = _vec(EMA)
    for eps in (0.01, 1.0, 10.0):
        expected = ema / (ema + eps)
        t = target_shares(EMA, "inverse", epsilon=eps)
        np.testing.assert_allclose(_vec(t.shares), expected / expected.sum())
    near_uniform = target_shares(EMA, "inverse", epsilon=1e-6).shares
    np.testing.assert_allclose(_vec(near_uniform), [1 / 3] * 3, atol=1e-6)


def test_power_interpolates_natural_to_uniform() -> None:
    share = _vec(EMA) / _vec(EMA).sum()
    np.testing.assert_allclose(_vec(target_shares(EMA, "power", tau=0.0).shares), share)
    np.testing.assert_allclose(_vec(target_shares(EMA, "power", tau=1.0).shares), [1 / 3] * 3)
    half = _vec(target_shares(EMA, "power", tau=0.5).shares)
    np.testing.assert_allclose(half, np.sqrt(share) / np.sqrt(share).sum())
    # Rare classes rise monotonically with τ.
    prev = 0.0
    for tau in np.linspace(0, 1, 11):
        rare = target_shares(EMA, "power", tau=float(tau)).shares["c"]
        assert rare >= prev
        prev = rare


def test_effective_number_follows_cui_et_al() -> None:
    beta, horizon = 0.999, 10.0
    n = _vec(EMA) * horizon
    weight = (1 - beta) / (1 - beta**n)
    share = n / n.sum()
    expected = share * weight
    t = target_shares(EMA, "effective_number", beta=beta, horizon=horizon)
    np.testing.assert_allclose(_vec(t.shares), expected / expected.sum())
    # β → 0: every class weighs 1 (natural); β → 1: weight ∝ 1/n (uniform).
    np.testing.assert_allclose(
        _vec(target_shares(EMA, "effective_number", beta=1e-9).shares), share, atol=1e-6
    )
    np.testing.assert_allclose(
        _vec(target_shares(EMA, "effective_number", beta=1 - 1e-9).shares), [1 / 3] * 3,
        atol=1e-4,
    )


def test_difficulty_multiplies_the_target_by_its_power() -> None:
    difficulty = {"a": 2.0, "b": 0.5}  # c missing: factor 1
    base = target_shares(EMA, "natural").shares
    t = target_shares(EMA, "natural", difficulty=difficulty, gamma=2.0)
    raw = {"a": base["a"] * 4.0, "b": base["b"] * 0.25, "c": base["c"]}
    total = sum(raw.values())
    assert t.shares == pytest.approx({c: v / total for c, v in raw.items()})
    assert target_shares(EMA, "natural", difficulty=difficulty, gamma=0.0).shares == (
        pytest.approx(base)
    )
    # Difficulty that zeroes every class is ignored rather than dividing by zero.
    zero = target_shares(EMA, "inverse", difficulty=dict.fromkeys(EMA, 0.0))
    assert zero.shares == pytest.approx(target_shares(EMA, "inverse").shares)


def test_zero_and_empty_counts() -> None:
    t = target_shares({"a": 10.0, "b": 0.0}, "power", tau=1.5)
    assert t.shares == {"a": 1.0}
    assert target_shares({}, "inverse") == ({}, {}, {})
    assert class_weights({"a": 0.0}, "inverse") == {}


def test_invalid_policy_and_parameters() -> None:
    with pytest.raises(PolicyError):
        target_shares(EMA, "uniform")
    with pytest.raises(PolicyError):
        target_shares(EMA, "inverse", epsilon=0.0)
    with pytest.raises(PolicyError):
        target_shares(EMA, "effective_number", beta=1.0)


def test_policy_label_names_the_parameter() -> None:
    assert policy_label("power", tau=0.5, gamma=1.0) == "power(tau=0.5,gamma=1.0)"
    assert policy_label("natural", gamma=0.0) == "natural(gamma=0.0)"
    assert "beta=0.99" in policy_label("effective_number", beta=0.99)
    assert all(policy_label(p).startswith(p + "(") for p in POLICIES)


def test_settings_helpers_pass_every_parameter() -> None:
    settings = BalanceSettings.model_validate(
        {"policy": "effective_number", "alpha": 0.8, "beta": 0.99, "difficulty_gamma": 0.5}
    )
    t = targets_for(EMA, settings, {"a": 2.0})
    assert t == target_shares(EMA, "effective_number", beta=0.99, difficulty={"a": 2.0},
                              gamma=0.5, horizon=1 / (1 - 0.8))
    assert label_for(settings) == "effective_number(beta=0.99,gamma=0.5)"
