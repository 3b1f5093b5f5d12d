"""The sink steps' decisions without services: ``Balance`` over in-memory class buffers and
``Feedback`` over an in-memory loss store that folds with the pure
``agents.feedback_logic.process_feedback``.

``MemoryBuffers`` keeps ``ClassBuffers``' contract (idempotent ``add``, per-class FIFO with a
reuse cap, ``exclude``, a replay queue of ids whose payload is still there); the Redis one is
tested on the real Redis by ``test_buffers`` and ``test_balance_step``.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest

from agents.balance import Balance
from agents.buffers import SAMPLE_FIELDS
from agents.compose import partition_of
from agents.config import BalanceSettings
from agents.feedback import Feedback
from agents.feedback_logic import FeedbackOutcome, process_feedback
from agents.normalize import content_digest, normalize
from agents.policy import label_for
from agents.step import Coords, Item
from schemas.records import CuratedBatch, CuratedSample
from schemas.records import Feedback as FeedbackRecord
from streams.serde import decode, encode
from tests.agents.pipeline_util import corpus

SNIPPETS = corpus(12)
DOCS = [
    "The scheduler keeps a priority queue of pending events and runs each one when due.",
    "Use a context manager so that the file is closed even when the parser raises.",
    "Tokens are read lazily: the lexer only advances when the parser asks for more.",
    "Configuration is validated once at start-up, and errors name the bad setting.",
]


# -- in-memory stores ------------------------------------------------------------------------


class MemoryBuffers:
    """The class buffers of one partition, in memory (payloads are kept for good)."""

    def __init__(self, partition: int, reuse_cap: int) -> None:
        self.partition = partition
        self.reuse_cap = reuse_cap
        self.samples: dict[str, dict[str, Any]] = {}
        self.uses: Counter[str] = Counter()
        self.queues: dict[str, deque[str]] = {}
        self.replay: list[str] = []

    def add(self, sample: Mapping[str, Any]) -> bool:
        if sample["id"] in self.samples:
            return False
        self.samples[sample["id"]] = {name: sample[name] for name in SAMPLE_FIELDS}
        self.queues.setdefault(sample["label"], deque()).append(sample["id"])
        return True

    def draw(self, counts: Mapping[str, int], exclude: Iterable[str] = ()
             ) -> list[dict[str, Any]]:
        excluded, out = set(exclude), []
        for label, n in counts.items():
            queue = self.queues.get(label, deque())
            budget, got = len(queue), 0
            while got < n and budget > 0:
                ident = queue.popleft()
                budget -= 1
                if ident in excluded:
                    queue.append(ident)
                    continue
                self.uses[ident] += 1
                out.append({**self.samples[ident], "replay": False})
                got += 1
                if self.uses[ident] < self.reuse_cap:
                    queue.append(ident)
        return out

    def push_replay(self, ids: Iterable[str]) -> int:
        queued = 0
        for ident in ids:
            if ident in self.samples and ident not in self.replay:
                self.replay.append(ident)
                queued += 1
        return queued

    def pop_replay(self, n: int) -> list[dict[str, Any]]:
        taken, self.replay = self.replay[:max(n, 0)], self.replay[max(n, 0):]
        return [{**self.samples[ident], "replay": True} for ident in taken]

    def sizes(self) -> dict[str, int]:
        return {label: len(q) for label, q in sorted(self.queues.items())}


class MemoryLosses:
    """The shared loss statistics and difficulty factors, in memory."""

    def __init__(self, factors: dict[str, float] | None = None) -> None:
        self.state: dict[str, Any] | None = None
        self.factors = dict(factors or {})

    def fold(self, feedback: FeedbackRecord, alpha: float, hard_k: float) -> FeedbackOutcome:
        outcome = process_feedback(self.state, feedback, alpha=alpha, hard_k=hard_k)
        self.state = outcome.state
        self.factors.update(outcome.difficulty)
        return outcome

    def difficulty(self) -> dict[str, float]:
        return dict(self.factors)


# -- helpers ---------------------------------------------------------------------------------


def sample(i: int, label: str) -> CuratedSample:
    """A CuratedSample of real content with a small unit embedding (8 × float16)."""
    text = SNIPPETS[i % len(SNIPPETS)].text if label == "python" else DOCS[i % len(DOCS)]
    content = normalize(f"{text}\n# {i}")
    vector = np.random.default_rng(i).standard_normal(8).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return CuratedSample(
        id=f"s{i:04d}", source="test", kind="CODE" if label == "python" else "TEXT",
        language=None, label=label, content=content, timestamp=1_700_000_000_000 + i,
        attributes={}, digest=content_digest(content), quality_score=0.9,
        embedding=vector.astype("<f2").tobytes(), embedding_dim=8, model="test",
        nearest_similarity=None, admitted_at=1_700_000_000_000 + i)


def stream(n: int, pattern: tuple[str, ...] = ("python", "python", "python", "docs")
           ) -> list[CuratedSample]:
    """``n`` samples whose labels cycle through ``pattern``."""
    return [sample(i, pattern[i % len(pattern)]) for i in range(n)]


def as_items(samples: Iterable[CuratedSample], partition: int = 3) -> list[Item]:
    return [Item(s, Coords("sluice.samples", partition, i)) for i, s in enumerate(samples)]


def balance(partition: int = 3, losses: MemoryLosses | None = None, **extra: Any
            ) -> tuple[Balance, MemoryBuffers]:
    settings = BalanceSettings(**{"batch_size": 4, "replay_fraction": 0.0, "policy": "natural",
                                  "reuse_cap": 8, **extra})
    buffers = MemoryBuffers(partition, settings.reuse_cap)
    return Balance(settings, buffers, losses or MemoryLosses()), buffers  # type: ignore[arg-type]


def batches_of(step: Balance, samples: Iterable[CuratedSample], one_at_a_time: bool = False
               ) -> list[CuratedBatch]:
    items = as_items(samples, step.partition)
    runs = [[i] for i in items] if one_at_a_time else [items]
    out = []
    for run in runs:
        for outcome in step.run(run):
            assert not outcome.rejected
            assert decode(encode("CuratedBatch", outcome.record), "CuratedBatch") == (
                outcome.record)
            out.append(outcome.record)
    return out


def feedback(batch_id: str, losses: Iterable[tuple[str, str, float]]) -> FeedbackRecord:
    record = FeedbackRecord(batch_id=batch_id, step=1, model="bow", created_at=0,
                            losses=[{"id": i, "label": lab, "loss": loss, "correct": None}
                                    for i, lab, loss in losses])
    encode("Feedback", record)
    return record


def labels(batch: CuratedBatch) -> Counter[str]:
    return Counter(s["label"] for s in batch["samples"])


# -- Balance ---------------------------------------------------------------------------------


def test_a_batch_every_batch_size_new_samples_numbered_in_its_partition() -> None:
    step, _ = balance(partition=3)
    samples = stream(10)
    batches = batches_of(step, samples)
    assert [(b["partition"], b["sequence"]) for b in batches] == [(3, 0), (3, 1)]
    assert [b["batch_id"].split("-")[:2] for b in batches] == [["3", "0"], ["3", "1"]]
    assert all(partition_of(b["batch_id"]) == 3 for b in batches)
    assert [len(b["samples"]) for b in batches] == [4, 4]
    # The first batch is composed when the 4th sample arrives, from what has arrived.
    assert {s["id"] for s in batches[0]["samples"]} <= {s["id"] for s in samples[:4]}
    assert batches[0]["policy"] == label_for(step.settings)
    assert (step.state["pending"], step.state["sequence"]) == (2, 2)
    assert step.counters == Counter({"in": 10, "out": 2})


def test_batches_are_the_same_whether_samples_come_one_by_one_or_together() -> None:
    samples = stream(23)
    together, _ = balance()
    single, _ = balance()
    a = batches_of(together, samples)
    b = batches_of(single, samples, one_at_a_time=True)
    assert [x["batch_id"] for x in a] == [x["batch_id"] for x in b]
    assert len(a) == 5
    assert together.state == single.state


def test_a_replayed_sample_changes_nothing() -> None:
    step, buffers = balance()
    samples = stream(6)
    batches_of(step, samples)
    state, sizes = step.state, buffers.sizes()
    assert batches_of(step, samples) == []
    assert step.state == state
    assert buffers.sizes() == sizes
    assert step.counters["replayed"] == 6
    # Replays between new samples do not count towards the next batch: it comes with the
    # second new sample (6 + 2 = 8), not earlier.
    more = stream(8)[6:]
    outcomes = step.run(as_items([samples[0], more[0], samples[1], samples[2]]))
    assert outcomes == []
    assert len(step.run(as_items([more[1]]))) == 1
    assert step.counters["replayed"] == 9


def test_a_new_step_given_the_stored_state_continues_where_the_last_one_stopped() -> None:
    samples = stream(14)
    reference, _ = balance()
    expected = [b["batch_id"] for b in batches_of(reference, samples)]
    # A worker restarts after 6 samples: new step, same buffers, the table's state.
    first, buffers = balance()
    before = batches_of(first, samples[:6])
    second = Balance(first.settings, buffers, first.losses)  # type: ignore[arg-type]
    second.state = dict(first.state)
    after = batches_of(second, samples[6:])
    assert [b["batch_id"] for b in before + after] == expected
    assert [b["sequence"] for b in after] == [1, 2]


def test_natural_follows_the_stream_and_inverse_evens_it_out() -> None:
    samples = stream(48)  # 3 python : 1 docs
    natural, _ = balance(batch_size=8, policy="natural")
    inverse, _ = balance(batch_size=8, policy="inverse", epsilon=0.1)
    nat, inv = batches_of(natural, samples), batches_of(inverse, samples)
    assert len(nat) == len(inv) == 6
    assert [labels(b) for b in nat] == [Counter(python=6, docs=2)] * 6
    # Inverse wants half and half: the first batch has only 2 docs to give, later ones
    # have enough. The shortfall is carried as credit, clipped to one sample, and repaid
    # once; every later batch is within one sample of 4 : 4.
    assert labels(inv[0]) == Counter(python=6, docs=2)
    assert all(abs(labels(b)["docs"] - 4) <= 1 for b in inv[1:])
    assert sum(labels(b)["docs"] for b in inv[1:]) == 4 * 5 + 1
    assert nat[-1]["class_shares"] == pytest.approx({"python": 0.75, "docs": 0.25})
    assert inv[-1]["target_shares"] == pytest.approx({"python": 0.5, "docs": 0.5}, abs=0.01)
    # The importance weight is target share / natural share.
    assert {s["weight"] for s in nat[-1]["samples"]} == {1.0}
    weights = {s["label"]: s["weight"] for s in inv[-1]["samples"]}
    assert weights == pytest.approx({"python": 2 / 3, "docs": 2.0}, rel=0.02)


def test_difficulty_from_feedback_tilts_the_targets_and_is_recorded() -> None:
    losses = MemoryLosses({"python": 2.0, "docs": 0.5})
    step, _ = balance(batch_size=8, losses=losses)
    [batch] = batches_of(step, stream(8))
    assert batch["difficulty"] == {"python": 2.0, "docs": 0.5}
    # natural × difficulty^γ (γ = 1): 0.75·2 : 0.25·0.5.
    assert batch["target_shares"] == pytest.approx({"python": 1.5 / 1.625, "docs": 0.125 / 1.625})
    assert labels(batch) == Counter(python=6, docs=2)  # only 2 docs were there to draw


def test_queued_hard_examples_fill_up_to_the_replay_fraction_of_a_batch() -> None:
    step, buffers = balance(batch_size=8, replay_fraction=0.25)
    samples = stream(24)
    batches_of(step, samples[:8])
    assert buffers.push_replay(["s0001", "s0003", "s0005"]) == 3
    [second] = batches_of(step, samples[8:16])
    replayed = [s["id"] for s in second["samples"] if s["replay"]]
    assert sorted(replayed) == ["s0001", "s0003"]  # 8 × 0.25: two, oldest first
    assert len(second["samples"]) == 8
    assert len({s["id"] for s in second["samples"]}) == 8  # a replay is not drawn again
    [third] = batches_of(step, samples[16:])
    assert [s["id"] for s in third["samples"] if s["replay"]] == ["s0005"]
    assert len(third["samples"]) == 8


# -- Feedback --------------------------------------------------------------------------------


def feedback_step(buffers: dict[int, MemoryBuffers], losses: MemoryLosses | None = None,
                  **extra: Any) -> tuple[Feedback, list[int]]:
    asked: list[int] = []

    def buffers_of(partition: int) -> MemoryBuffers:
        asked.append(partition)
        return buffers[partition]

    settings = BalanceSettings(**{"hard_k": 2.0, "loss_alpha": 0.9, **extra})
    return Feedback(settings, losses or MemoryLosses(), buffers_of), asked  # type: ignore[arg-type]


def test_hard_examples_are_queued_on_the_partition_the_batch_id_names() -> None:
    buffers = {p: MemoryBuffers(p, reuse_cap=4) for p in (0, 3)}
    for s in stream(8):
        buffers[0].add(s)
        buffers[3].add(s)
    step, asked = feedback_step(buffers)
    losses = [(f"s{i:04d}", "python" if i % 4 else "docs", 0.1) for i in range(8)]
    losses[5] = ("s0005", "python", 5.0)
    [out] = step.run([Item(feedback("3-7-abcdef012345", losses), Coords("sluice.feedback", 0, 0))])
    assert not out.rejected
    assert (out.record["hard"], out.record["queued"]) == (1, 1)
    assert asked == [3]
    assert buffers[3].replay == ["s0005"] and buffers[0].replay == []
    expected = process_feedback(None, feedback("3-7-abcdef012345", losses), alpha=0.9, hard_k=2.0)
    assert out.record["threshold"] == pytest.approx(expected.threshold)
    assert out.record["difficulty"] == pytest.approx(expected.difficulty)
    assert out.record["difficulty"]["python"] > 1.0 > out.record["difficulty"]["docs"]
    assert step.counters == Counter({"in": 1, "out": 1})


def test_no_hard_example_asks_no_buffers_and_a_gone_one_is_not_queued() -> None:
    buffers = {1: MemoryBuffers(1, reuse_cap=4)}
    step, asked = feedback_step(buffers)
    flat = feedback("1-0-000000000000", [(f"s{i}", "python", 0.5) for i in range(6)])
    [out] = step.run([Item(flat, Coords("sluice.feedback", 0, 0))])
    assert (out.record["hard"], out.record["queued"]) == (0, 0) and asked == []
    # A hard id whose payload left the buffers counts as hard, but nothing is queued.
    spike = feedback("1-1-000000000000", [(f"s{i}", "python", 0.5) for i in range(7)]
                     + [("gone", "python", 50.0)])
    [out] = step.run([Item(spike, Coords("sluice.feedback", 0, 1))])
    assert (out.record["hard"], out.record["queued"]) == (1, 0) and asked == [1]
    assert buffers[1].replay == []


def test_records_of_one_run_are_folded_in_order_one_outcome_each() -> None:
    rng = random.Random(5)
    records = [feedback(f"0-{n}-000000000000",
                        [(f"s{n}-{i}", rng.choice(["python", "docs"]), rng.expovariate(1.0))
                         for i in range(16)]) for n in range(4)]
    losses = MemoryLosses()
    step, _ = feedback_step({0: MemoryBuffers(0, reuse_cap=4)}, losses)
    outcomes = step.run([Item(r, Coords("sluice.feedback", 0, n)) for n, r in enumerate(records)])
    state = None
    for record, out in zip(records, outcomes, strict=True):
        expected = process_feedback(state, record, alpha=0.9, hard_k=2.0)
        state = expected.state
        assert out.record["threshold"] == pytest.approx(expected.threshold)
        assert out.record["hard"] == len(expected.hard_ids)
    assert losses.state == state
    assert step.counters == Counter({"in": 4, "out": 4})


def test_feedback_on_a_batch_brings_its_hard_example_back_in_the_next_batch() -> None:
    losses = MemoryLosses()
    balancer, buffers = balance(partition=2, losses=losses, batch_size=8, replay_fraction=0.25)
    step, asked = feedback_step({2: buffers}, losses)
    samples = stream(16)
    [first] = batches_of(balancer, samples[:8])
    hard = first["samples"][3]
    per_sample = [(s["id"], s["label"], 4.0 if s["id"] == hard["id"] else 0.2)
                  for s in first["samples"]]
    [out] = step.run([Item(feedback(first["batch_id"], per_sample),
                           Coords("sluice.feedback", 0, 0))])
    assert (out.record["queued"], asked) == (1, [2])
    [second] = batches_of(balancer, samples[8:])
    assert [s["id"] for s in second["samples"] if s["replay"]] == [hard["id"]]
    # The difficulty feedback published is what the next batch was composed with.
    assert second["difficulty"] == pytest.approx(losses.difficulty())
    assert second["difficulty"][hard["label"]] > 1.0
