"""Pacing by what each class can sustain (issue 13), at the composition level: the
``Balance`` step over in-memory buffers, asked for batches as a trainer sets the pace.

Data-limited: a long-tailed pool is buffered, then the trainer asks for twice what was
offered (each sample may enter ``reuse_cap`` batches). Drawing every class at its inverse
target used up the scarce classes' reuse in the first batches; every later batch lacked
them and a trainer forgot them. Paced, each class is in every stretch of the run.

Compute-limited: arrivals outrun the trainer; the caps do not bind and each batch follows
the policy's targets, as before.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agents.balance import Balance
from agents.sustain import Flow
from schemas.records import CuratedBatch
from tests.agents.sink_util import as_items, balance, labels, sample

#: A long tail, as in bench.curated_vs_raw: counts per class in the pool.
TAIL = {"python": 240, "c": 80, "docs": 40, "shell": 16, "css": 8}
BATCH = 8
REUSE = 4


def long_tail(counts: dict[str, int], seed: int = 0, start: int = 0) -> list[object]:
    """Samples with exactly these class counts, in a seeded order, ids from ``start``."""
    names = [c for c, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(names)
    return [sample(start + i, name) for i, name in enumerate(names)]


def ask(step: Balance, batches: int, ahead: int = 16) -> tuple[list[CuratedBatch], bool]:
    """``batches`` batches, ``ahead`` at a time as the agent asks, each confirmed; whether
    any call found the pool unable to meet the targets."""
    out: list[CuratedBatch] = []
    starved = False
    while len(out) < batches:
        got = step.paced(min(ahead, batches - len(out)))
        for batch in got:
            step.confirm(batch)
        out += got
        starved = starved or step.starved
        if len(got) < min(ahead, batches - len(out) + len(got)):
            break  # short of a full batch
    return out, starved


def mix(batches: list[CuratedBatch]) -> Counter[str]:
    return sum((labels(b) for b in batches), Counter())


def data_limited() -> tuple[list[CuratedBatch], bool, Balance]:
    step, _ = balance(batch_size=BATCH, reuse_cap=REUSE, pace="trainer", policy="inverse")
    samples = long_tail(TAIL)
    assert step.run(as_items(samples)) == []  # trainer pace: arrivals compose nothing
    # The trainer takes twice what the stream offered.
    batches, starved = ask(step, 2 * len(samples) // BATCH)
    return batches, starved, step


def test_a_scarce_class_is_not_used_up_in_the_first_batches() -> None:
    """The forgetting of issue 13: under inverse, css (8 samples, 32 uses) and shell (16,
    64 uses) were drawn at a fifth of every batch and gone after ~20 and ~40 of the 96
    batches. Paced, every class is in every quarter of the run, and the last quarter has
    every class at least a third as often as the natural mix would put it there."""
    batches, _, _ = data_limited()
    assert len(batches) == 2 * sum(TAIL.values()) // BATCH
    quarter = len(batches) // 4
    quarters = [mix(batches[q * quarter:(q + 1) * quarter]) for q in range(4)]
    natural = {c: n / sum(TAIL.values()) for c, n in TAIL.items()}
    for c in TAIL:
        assert all(q[c] > 0 for q in quarters), (c, quarters)
        assert quarters[-1][c] >= natural[c] * quarter * BATCH / 3, (c, quarters[-1])
    uses = Counter(s["id"] for b in batches for s in b["samples"])
    assert max(uses.values()) <= REUSE


def test_a_scarce_class_is_spread_over_the_run_not_burst_then_gone() -> None:
    """No stretch of an eighth of the run lacks a class, and the last batch that draws a
    class is in the final eighth."""
    batches, _, _ = data_limited()
    eighth = len(batches) // 8
    last = {s["label"]: n for n, b in enumerate(batches) for s in b["samples"]}
    assert all(n >= len(batches) - eighth for n in last.values()), last
    for start in range(0, len(batches) - eighth + 1, eighth):
        present = mix(batches[start:start + eighth])
        assert set(present) == set(TAIL), (start, present)


def test_the_starved_flag_says_when_the_pool_cannot_meet_the_targets() -> None:
    """Full batches keep coming, yet the targets (near uniform) cannot be met by a pool in
    which css is 2 %: ``starved`` says so and ``short`` names the classes held back."""
    batches, starved, step = data_limited()
    assert all(len(b["samples"]) == BATCH for b in batches)
    assert starved and step.starved
    assert "css" in step.short and all(v > 0 for v in step.short.values())


def test_the_first_batches_still_follow_the_targets() -> None:
    """A fresh sample is spent by the targets: while every class has unseen samples the
    batches are the inverse mix (a fifth each, within one sample), starved or not."""
    batches, _, _ = data_limited()
    for batch in batches[:5]:
        counts = labels(batch)
        target = batch["target_shares"]
        assert all(abs(counts[c] - BATCH * target[c]) <= 1 for c in TAIL), counts


def test_compute_limited_arrivals_keep_the_inverse_mix() -> None:
    """Arrivals outrun the trainer (three per sample drawn): each scarce class's arrivals
    sustain more than its target, so nothing is held back and every batch after the first
    few is within one sample of the inverse target, never starved."""
    step, _ = balance(batch_size=BATCH, reuse_cap=REUSE, pace="trainer", policy="inverse")
    stream = long_tail({c: n * 3 for c, n in TAIL.items()}, seed=3)
    per_batch = 3 * BATCH
    drawn: list[CuratedBatch] = []
    for start in range(0, len(stream), per_batch):
        step.run(as_items(stream[start:start + per_batch]))
        got = step.paced(1)
        for batch in got:
            step.confirm(batch)
        drawn += got
        if len(drawn) > 8:
            assert not step.starved and step.short == {}
    assert len(drawn) == len(stream) // per_batch
    assert Flow(*step.state["flow"]).get() == pytest.approx(3.0, rel=0.1)
    for batch in drawn[8:]:
        counts, target = labels(batch), batch["target_shares"]
        assert all(abs(counts[c] - BATCH * target[c]) <= 1 for c in TAIL), counts


def test_what_was_buffered_before_the_first_batch_is_stock_not_flow() -> None:
    """Under trainer pace the backlog found by the first batch is not taken for arrivals
    (it would let the scarce classes burn their reuse as if more were coming)."""
    _, _, step = data_limited()
    assert Flow(*step.state["flow"]).get() == 0.0


def test_the_importance_weight_is_the_share_the_draw_had() -> None:
    """A class held below its target is drawn less often than the target says; its
    samples' weight (what ``trainer.loss_weights`` divides by) is the share it was drawn
    at over its natural share, not the target's, so undoing the oversampling does not
    also push the class below its natural weight."""
    batches, _, _ = data_limited()
    late = [(b, s) for b in batches[len(batches) // 2:] for s in b["samples"]
            if s["label"] == "css"]
    assert late
    for batch, s in late:
        natural, target = batch["class_shares"]["css"], batch["target_shares"]["css"]
        assert 0.0 < s["weight"] < 0.5 * target / natural
    first = batches[0]
    for s in first["samples"]:  # not held back yet: the policy's own weight
        label = s["label"]
        assert s["weight"] == pytest.approx(
            first["target_shares"][label] / first["class_shares"][label], rel=1e-6)
