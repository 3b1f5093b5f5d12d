"""Batch composition: allocation properties, lineage digest, the CuratedBatch record, and
the class mix a simulated 80/15/5 stream gets under each policy."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from agents.batch_bytes import batch_overhead, fit_samples, sample_bytes, utf8_prefix
from agents.compose import (
    ComposeError,
    allocate,
    allocate_with_credit,
    assemble_batch,
    batch_id,
    batch_order,
    label_problem,
    lineage_digest,
    parse_batch_id,
    partition_of,
)
from agents.policy import target_shares
from agents.stats import ClassEMA
from agents.sustain import Flow, Supply, paced_shares, sustainable_caps, update_flow
from streams import serde

AMPLE = {"a": 10**6, "b": 10**6, "c": 10**6}


def test_allocate_rounds_by_largest_remainder() -> None:
    assert allocate(10, {"a": 0.55, "b": 0.3, "c": 0.15}, AMPLE) == {"a": 6, "b": 3, "c": 1}
    # Ties go by class name, deterministically.
    assert allocate(2, {"b": 1 / 3, "a": 1 / 3, "c": 1 / 3}, AMPLE) == {"a": 1, "b": 1, "c": 0}


def test_allocate_gives_a_missing_class_share_to_the_others_proportionally() -> None:
    out = allocate(30, {"a": 0.5, "b": 0.25, "c": 0.25}, {"a": 100, "b": 100, "c": 0})
    assert out == {"a": 20, "b": 10, "c": 0}
    # Partial availability: c takes what it has, the rest is spread by share.
    out = allocate(30, {"a": 0.5, "b": 0.25, "c": 0.25}, {"a": 100, "b": 100, "c": 3})
    assert out == {"a": 18, "b": 9, "c": 3}
    # Less available than a batch: everything there is.
    assert allocate(30, {"a": 0.5, "b": 0.5}, {"a": 4, "b": 7}) == {"a": 4, "b": 7}
    # A class with no share gets nothing even when it is the only one left.
    assert allocate(8, {"a": 1.0, "b": 0.0}, {"a": 0, "b": 50}) == {"a": 0, "b": 0}


def test_allocate_properties_on_random_inputs() -> None:
    rng = np.random.default_rng(1)
    for _ in range(2_000):
        k = int(rng.integers(1, 7))
        names = [f"c{i}" for i in range(k)]
        shares = dict(zip(names, rng.dirichlet(np.ones(k) * 0.7).tolist(), strict=True))
        if rng.random() < 0.2:
            shares[names[0]] = 0.0
        available = dict(zip(names, rng.integers(0, 40, k).tolist(), strict=True))
        batch = int(rng.integers(0, 65))
        out = allocate(batch, shares, available)
        assert out == allocate(batch, dict(reversed(shares.items())), available)
        usable = sum(available[c] for c in names if shares[c] > 0)
        assert sum(out.values()) == min(batch, usable)
        for c in names:
            assert 0 <= out[c] <= available[c]
            if shares[c] == 0:
                assert out[c] == 0
        total = sum(shares.values())
        if total > 0 and all(available[c] >= batch for c in names):
            for c in names:  # uncapped: within one of the exact quota
                assert abs(out[c] - batch * shares[c] / total) < 1.0


def test_credit_keeps_the_long_run_mix_on_target() -> None:
    shares = {"a": 0.52, "b": 0.31, "c": 0.17}
    credit: dict[str, float] = {}
    total = dict.fromkeys(shares, 0)
    for _ in range(100):
        counts, credit = allocate_with_credit(7, shares, AMPLE, credit)
        assert sum(counts.values()) == 7
        for c, n in counts.items():
            total[c] += n
        assert all(abs(v) <= 1.0 for v in credit.values())
    for c, s in shares.items():
        assert abs(total[c] - 700 * s) <= 1.0
    # Without credit the same rounding repeats every batch: 4/2/1 → 400/200/100.
    assert allocate(7, shares, AMPLE) == {"a": 4, "b": 2, "c": 1}


# -- pacing by what each class can sustain ----------------------------------------------------


def test_sustainable_caps_are_fresh_plus_arrivals_plus_paced_reuse() -> None:
    """cap_c = fresh_c / draws + k·ρ·ν_c + max(0, 1 − k·ρ)·(uses_c − fresh_c) / U."""
    supply = {"big": Supply(100, 400, 100), "rare": Supply(4, 6, 0), "gone": Supply(0, 0, 0)}
    natural = {"big": 0.9, "rare": 0.05, "gone": 0.05}
    # No arrivals: fresh samples are free, repeated uses keep pace with the pool's.
    caps = sustainable_caps(8, supply, natural, 0.0, 4)
    assert caps == pytest.approx({"big": 100 / 8 + 300 / 406, "rare": 6 / 406, "gone": 0.0})
    # Arrivals at ρ = 0.1 per draw: k·ρ = 0.4 of a batch is sustained for good, and the
    # stock is spread over a pool that now drains at 0.6 per draw.
    caps = sustainable_caps(8, supply, natural, 0.1, 4)
    assert caps["rare"] == pytest.approx(4 * 0.1 * 0.05 + 0.6 * 6 / 406)
    # Arrivals alone sustain the pool (k·ρ ≥ 1): the stock needs no pacing.
    caps = sustainable_caps(8, supply, natural, 0.5, 4)
    assert caps["rare"] == pytest.approx(4 * 0.5 * 0.05)
    assert caps["gone"] == 0.0  # nothing waiting: nothing to draw, whatever arrives
    assert sustainable_caps(0, supply, natural, 1.0, 4) == dict.fromkeys(supply, 0.0)


def test_paced_shares_follow_the_targets_when_the_caps_do_not_bind() -> None:
    targets = {"a": 0.5, "b": 0.3, "c": 0.2}
    paced = paced_shares(targets, {"a": 1.0, "b": 0.3, "c": 5.0})
    assert paced.shares == pytest.approx(targets) and paced.short == {}
    # A class with no target gets no share, even with a cap.
    assert set(paced_shares({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 1.0}).shares) == {"a"}
    assert paced_shares({}, {"a": 1.0}).shares == {}


def test_paced_shares_hold_a_class_to_its_cap_and_give_the_rest_by_target() -> None:
    paced = paced_shares({"a": 0.5, "b": 0.25, "c": 0.25}, {"a": 1.0, "b": 1.0, "c": 0.05})
    assert paced.shares == pytest.approx({"a": 0.5 + 0.2 * 2 / 3, "b": 0.25 + 0.2 / 3,
                                          "c": 0.05})
    assert paced.short == pytest.approx({"c": 0.2})
    # Water filling: b then cannot take its part of c's rest either.
    paced = paced_shares({"a": 0.5, "b": 0.25, "c": 0.25}, {"a": 1.0, "b": 0.26, "c": 0.05})
    assert paced.shares == pytest.approx({"a": 0.69, "b": 0.26, "c": 0.05})
    # All caps together short of a batch: the batch is still full, the rest by target to
    # the classes that have something waiting, and short says the targets were not met.
    paced = paced_shares({"a": 0.5, "b": 0.5, "gone": 0.2}, {"a": 0.2, "b": 0.1, "gone": 0.0})
    assert sum(paced.shares.values()) == pytest.approx(1.0)
    assert paced.shares["gone"] == 0.0
    assert paced.shares["a"] == pytest.approx(0.2 + 0.7 / 2)
    assert set(paced.short) == {"gone"}


def test_paced_shares_properties_on_random_inputs() -> None:
    rng = np.random.default_rng(4)
    for _ in range(2_000):
        k = int(rng.integers(1, 7))
        names = [f"c{i}" for i in range(k)]
        targets = dict(zip(names, rng.dirichlet(np.ones(k)).tolist(), strict=True))
        caps = dict(zip(names, (rng.random(k) * rng.choice([0.3, 1.0, 3.0])).tolist(),
                        strict=True))
        paced = paced_shares(targets, caps)
        assert paced == paced_shares(dict(reversed(targets.items())), caps)
        assert sum(paced.shares.values()) == pytest.approx(1.0)
        if sum(caps.values()) >= 1.0:
            assert all(paced.shares[c] <= caps[c] + 1e-9 for c in names)
        else:
            assert all(paced.shares[c] >= min(caps[c], targets[c]) - 1e-9 for c in names)
        for c in names:  # short exactly when a class got less than its target
            assert (c in paced.short) == (paced.shares[c] < targets[c] - 1e-6)


def test_update_flow_is_the_bias_corrected_ema_per_drawn_sample() -> None:
    """Against a direct weighted mean: each drawn sample weighs ``decay^age``."""
    rng = np.random.default_rng(2)
    alpha, window = 0.9, 64
    decay = alpha ** (1 / window)
    flow = Flow()
    assert flow.get() == 0.0
    rates: list[float] = []  # one per drawn sample, oldest first
    for _ in range(50):
        drawn, arrived = int(rng.integers(1, 9)), int(rng.integers(0, 30))
        flow = update_flow(flow, arrived, drawn, alpha, window)
        rates += [arrived / drawn] * drawn
    ages = np.arange(len(rates))[::-1]
    weights = (1 - decay) * decay ** ages
    assert flow.get() == pytest.approx(float(np.dot(weights, rates) / weights.sum()))
    # The first observation counts in full (bias correction), a batch drawing nothing
    # changes nothing.
    first = update_flow(Flow(), 24, 8, alpha, window)
    assert first.get() == pytest.approx(3.0)
    assert update_flow(first, 99, 0, alpha, window) == first


def _simulate(policy: str, n: int = 40_000, seed: int = 0, **params: Any) -> dict[str, float]:
    """Feed an 80/15/5 stream through ClassEMA → target_shares → allocate_with_credit.

    BalanceSettings defaults: α = 0.9, window = 64, batch of 32, ample availability; a
    batch every 32 samples after the first 10 windows.
    """
    rng = np.random.default_rng(seed)
    labels = rng.choice(["a", "b", "c"], size=n, p=[0.8, 0.15, 0.05]).tolist()
    ema = ClassEMA(0.9, 64)
    credit: dict[str, float] = {}
    composed = dict.fromkeys("abc", 0)
    for i, label in enumerate(labels, start=1):
        ema.update(label)
        if i % 32 == 0 and i > 640:
            targets = target_shares(ema.get(), policy, horizon=10.0, **params)
            counts, credit = allocate_with_credit(32, targets.shares, AMPLE, credit)
            for c, k in counts.items():
                composed[c] += k
    total = sum(composed.values())
    return {c: k / total for c, k in composed.items()}


def _expected(policy: str, **params: Any) -> dict[str, float]:
    return target_shares({"a": 51.2, "b": 9.6, "c": 3.2}, policy, horizon=10.0, **params).shares


def test_natural_policy_keeps_80_15_5() -> None:
    mix = _simulate("natural")
    assert mix == pytest.approx({"a": 0.8, "b": 0.15, "c": 0.05}, abs=0.01)


def test_inverse_policy_comes_out_near_uniform() -> None:
    # ε = 1 sample per window damps the 5 % class (3.2 per window): ≈ 0.37/0.34/0.29.
    mix = _simulate("inverse", epsilon=1.0)
    assert max(abs(v - 1 / 3) for v in mix.values()) < 0.05
    assert mix == pytest.approx(_expected("inverse", epsilon=1.0), abs=0.01)
    # With ε small against the rarest class's count the mix is uniform within 0.01.
    mix = _simulate("inverse", epsilon=0.1)
    assert max(abs(v - 1 / 3) for v in mix.values()) < 0.01


def test_power_policy_sits_between_natural_and_uniform() -> None:
    mix = _simulate("power", tau=0.5)
    assert mix == pytest.approx(_expected("power", tau=0.5), abs=0.01)  # ≈ 0.59/0.26/0.15
    assert 1 / 3 < mix["a"] < 0.8
    assert 0.15 < mix["b"] < 1 / 3
    assert 0.05 < mix["c"] < 1 / 3


def test_effective_number_policy_matches_its_target() -> None:
    mix = _simulate("effective_number", beta=0.999)
    assert mix == pytest.approx(_expected("effective_number", beta=0.999), abs=0.01)


def test_content_digest_and_batch_id() -> None:
    digests = [hashlib.sha256(s.encode()).hexdigest() for s in ("x", "y")]
    expected = hashlib.sha256((digests[0] + "\n" + digests[1] + "\n").encode()).hexdigest()
    assert lineage_digest(digests) == expected
    assert lineage_digest(digests[::-1]) != expected  # the order is part of the lineage
    assert batch_id(3, 17, expected) == f"3-17-{expected[:12]}"
    assert partition_of(batch_id(3, 17, expected)) == 3
    with pytest.raises(ComposeError):
        partition_of("nope")


def _drawn(i: int, label: str, replay: bool = False) -> dict[str, object]:
    content = f"sample {i}"
    return {
        "id": f"id{i}", "label": label, "kind": "TEXT", "source": "test", "content": content,
        "digest": hashlib.sha256(content.encode()).hexdigest(),
        "embedding": np.arange(4, dtype="<f2").tobytes(), "embedding_dim": 4, "uses": 1,
        "replay": replay,
    }


def test_assemble_batch_builds_a_valid_curated_batch() -> None:
    drawn = [_drawn(0, "a"), _drawn(1, "a"), _drawn(2, "b"), _drawn(3, "b", replay=True)]
    ordered = batch_order(drawn, seed=0, partition=2, sequence=5)
    assert ordered == batch_order(drawn, seed=0, partition=2, sequence=5)
    assert sorted(s["id"] for s in ordered) == [f"id{i}" for i in range(4)]
    batch = assemble_batch(
        partition=2, sequence=5, samples=ordered, policy="inverse(epsilon=1.0,gamma=1.0)",
        class_shares={"a": 0.8, "b": 0.2}, target_shares={"a": 0.5, "b": 0.5},
        weights={"a": 0.625, "b": 2.5}, difficulty={"a": 1.0}, created_at=1_700_000_000_000,
    )
    assert batch["content_digest"] == lineage_digest([str(s["digest"]) for s in ordered])
    assert batch["batch_id"] == f"2-5-{batch['content_digest'][:12]}"
    assert [s["id"] for s in batch["samples"]] == [s["id"] for s in ordered]
    assert {s["label"]: s["weight"] for s in batch["samples"]} == {"a": 0.625, "b": 2.5}
    assert [s["replay"] for s in batch["samples"] if s["id"] == "id3"] == [True]
    # The record fits the schema exactly and survives the wire format.
    assert serde.decode(serde.encode("CuratedBatch", batch), "CuratedBatch") == batch
    with pytest.raises(ComposeError):
        assemble_batch(partition=0, sequence=0, samples=[], policy="natural", class_shares={},
                       target_shares={}, weights={}, difficulty=None, created_at=0)
    with pytest.raises(ComposeError):
        bad = {k: v for k, v in _drawn(9, "a").items() if k != "digest"}
        assemble_batch(partition=0, sequence=0, samples=[bad], policy="natural",
                       class_shares={}, target_shares={}, weights={}, difficulty=None,
                       created_at=0)


# -- bounds (issue 10) -------------------------------------------------------------------------


def _sample(i: int, content: str, *, ident: str | None = None, dim: int = 8) -> dict[str, Any]:
    return {"id": ident or f"id-{i}", "label": "python", "kind": "CODE", "source": "repo",
            "content": content, "digest": hashlib.sha256(content.encode()).hexdigest(),
            "embedding": bytes(2 * dim), "embedding_dim": dim, "replay": False}


def _encoded(samples: list[dict[str, Any]], **meta: Any) -> int:
    batch = assemble_batch(partition=meta.get("partition", 3), sequence=meta.get("sequence", 7),
                           samples=samples, policy="inverse(epsilon=0.1,gamma=1.0)",
                           class_shares=meta.get("shares", {"python": 1.0}),
                           target_shares=meta.get("shares", {"python": 1.0}),
                           weights={"python": 1.5}, difficulty=meta.get("difficulty"),
                           created_at=1_700_000_000_000)
    return len(serde.encode("CuratedBatch", batch))


def test_avro_sizes_are_exact() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 63, 64, 200):
        samples = [_sample(i, "é✓x" * int(rng.integers(0, 3000)), dim=int(rng.integers(1, 400)))
                   for i in range(n)]
        shares = {f"c{k}": 1.0 / (k + 1) for k in range(int(rng.integers(0, 70)))}
        fixed = batch_overhead(partition=3, sequence=7 * n, created_at=1_700_000_000_000,
                               policy="inverse(epsilon=0.1,gamma=1.0)", class_shares=shares,
                               target_shares=shares, difficulty=None, samples=n)
        total = fixed + sum(sample_bytes(s) for s in samples)
        assert total == _encoded(samples, sequence=7 * n, shares=shares)


def test_fit_samples_cuts_only_the_longest_to_one_level_and_fits() -> None:
    samples = [_sample(0, "a" * 100), _sample(1, "b" * 5000), _sample(2, "c" * 9000)]
    sizes = [sample_bytes(s) for s in samples]
    assert fit_samples(samples, sum(sizes)).samples == samples  # fits: unchanged
    fitted = fit_samples(samples, 6000)
    assert fitted.samples[0] == samples[0]
    after = [sample_bytes(s) for s in fitted.samples]
    assert sum(after) <= 6000 and abs(after[1] - after[2]) <= 2
    assert [s["id"] for s in fitted.truncated] == ["id-1", "id-2"] and fitted.dropped == []
    assert all(s["content"] == o["content"][:len(s["content"])]
               for s, o in zip(fitted.samples, samples, strict=True))


def test_fit_samples_cuts_at_a_utf8_boundary_and_drops_what_cannot_fit() -> None:
    fitted = fit_samples([_sample(0, "✓" * 1000)], 1001)
    assert sample_bytes(fitted.samples[0]) <= 1001
    assert set(fitted.samples[0]["content"]) == {"✓"}
    huge_id = _sample(1, "x", ident="i" * 5000)
    fitted = fit_samples([_sample(0, "y" * 3000), huge_id], 4000)
    assert [s["id"] for s in fitted.samples] == ["id-0"]
    assert fitted.dropped == [huge_id]
    assert sum(sample_bytes(s) for s in fitted.samples) <= 4000
    assert utf8_prefix("aé", 2) == "a" and utf8_prefix("aé", 3) == "aé"


def test_fit_samples_on_random_inputs_always_fits() -> None:
    rng = np.random.default_rng(11)
    for _ in range(200):
        samples = [_sample(i, "wörd " * int(rng.integers(0, 2000)))
                   for i in range(int(rng.integers(1, 20)))]
        budget = int(rng.integers(0, 40_000))
        fitted = fit_samples(samples, budget)
        assert sum(sample_bytes(s) for s in fitted.samples) <= budget
        assert len(fitted.samples) + len(fitted.dropped) == len(samples)
        # Never cut more than needed: a level one byte higher would not fit.
        if fitted.truncated and not fitted.dropped:
            assert sum(sample_bytes(s) for s in fitted.samples) > budget - 4 * len(samples)


@pytest.mark.parametrize(("label", "problem"), [
    ("python", None), ("c++", None), ("objective-c", None), ("text/markdown", None),
    ("C#", None), ("français", None), ("x" * 64, None),
    (None, "label_not_text"), ("", "label_empty"), ("x" * 65, "label_too_long"),
    ("two words", "label_characters"), ("_private", "label_characters"),
    ("a:b", "label_characters"), ("{tag}", "label_characters"), ("tab\t", "label_characters"),
])
def test_label_problem(label: object, problem: str | None) -> None:
    assert label_problem(label) == problem


def test_parse_batch_id_accepts_only_what_batch_id_makes() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    assert parse_batch_id(batch_id(12, 345, digest)) == (12, 345)
    for bad in ("not-a-batch", "3-7", "3-7-ABCDEF012345", "-1-0-abcdef012345",
                "3-7-abcdef0123456", "３-7-abcdef012345", 17, None):
        with pytest.raises(ComposeError):
            parse_batch_id(bad)
