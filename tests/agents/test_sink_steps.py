"""The sink steps' decisions without services: ``Balance`` over in-memory class buffers and
``Feedback`` over an in-memory loss store that folds with the pure
``agents.feedback_logic.process_feedback`` (both in ``tests.agents.sink_util``; the Redis
ones are tested on the real Redis by ``test_buffers``, ``test_balance_step`` and
``test_feedback_store``). The bounds (message size, labels) are in ``test_balance_bounds``.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import pytest

from agents.balance import Balance
from agents.buffers import BufferStoreError
from agents.compose import partition_of
from agents.config import BalanceSettings
from agents.feedback import Feedback
from agents.feedback_logic import process_feedback
from agents.policy import label_for
from agents.step import Coords, Item
from streams.metrics import RESENT, class_in, rejected
from streams.serde import encode
from tests.agents.sink_util import (
    MemoryBuffers,
    MemoryLosses,
    as_items,
    balance,
    batches_of,
    feedback,
    labels,
    stream,
)

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
    assert step.counters == Counter({"in": 10, "out": 2, class_in("python"): 8,
                                     class_in("docs"): 2})


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
    for batch in before:
        first.confirm(batch)  # sent: the agent confirms each batch after its send
    second = Balance(first.settings, buffers, first.losses)
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


# -- Balance across failures -----------------------------------------------------------------


def test_a_sample_of_a_run_whose_draw_failed_is_counted_on_the_retry() -> None:
    """Bug A: the 4th sample is buffered, then the draw raises; the agent retries with the
    table's state. The retry must count the sample (it is not a replay: this very message
    buffered it) and compose the batch."""
    step, buffers = balance()
    items = as_items(stream(4), step.partition)
    for item in items[:3]:
        step.run([item])
    state = dict(step.state)
    buffers.fail_composes = 1
    with pytest.raises(BufferStoreError):
        step.run([items[3]])
    assert step.state == state  # nothing of the failed run reached the state
    step.state = dict(state)
    [batch] = step.run([items[3]])
    assert len(batch.record["samples"]) == 4
    assert (step.state["pending"], step.state["sequence"]) == (0, 1)
    assert step.counters["replayed"] == 0


def test_a_sample_buffered_by_a_run_that_never_reached_the_table_is_counted_again() -> None:
    """Bug A after a crash between the Redis add and the table write: a new step with the
    table's (older) state sees the same message again and counts it; a second delivery
    of a counted message stays a replay."""
    samples = stream(8)
    first, buffers = balance()
    batches_of(first, samples[:2], one_at_a_time=True)
    saved = dict(first.state)
    first.run(as_items([samples[2]], first.partition))  # buffered; its state is lost
    second = Balance(first.settings, buffers, first.losses)
    second.state = saved
    assert second.run(as_items([samples[2]], first.partition)) == []
    assert (second.state["pending"], second.counters["replayed"]) == (3, 0)
    assert second.run(as_items([samples[2]], first.partition)) == []
    assert (second.state["pending"], second.counters["replayed"]) == (3, 1)
    [batch] = batches_of(second, samples[3:4])
    assert {s["id"] for s in batch["samples"]} == {s["id"] for s in samples[:4]}


def test_a_batch_drawn_but_never_sent_is_sent_again_by_the_next_worker() -> None:
    """Finding 3: the worker drew a batch and died before the send and the table write. A
    new step (new worker, the table's older state, the same message redelivered) re-sends
    that very batch, takes the state after it, and goes on: no use lost, no sample
    counted twice, no sequence reused."""
    samples = stream(12)
    first, buffers = balance(reuse_cap=1)
    batches_of(first, samples[:3])
    saved = dict(first.state)
    [lost] = batches_of(first, samples[3:4])  # drawn and recorded, never sent
    second = Balance(first.settings, buffers, first.losses)
    second.state = saved
    [again] = batches_of(second, samples[3:4])
    assert again == lost
    assert encode("CuratedBatch", again) == encode("CuratedBatch", lost)
    assert second.state == first.state and second.counters[RESENT] == 1
    second.confirm(again)
    more = batches_of(second, samples[4:])
    assert [b["sequence"] for b in more] == [1, 2]
    uses = Counter(s["id"] for b in [again, *more] for s in b["samples"])
    assert uses == Counter(s["id"] for s in samples)
    assert [r.sequence for r in buffers.unsent()] == [1, 2]  # handed out, not yet confirmed


def test_a_batch_whose_send_failed_is_sent_by_the_next_run_and_a_confirmed_one_never() -> None:
    step, buffers = balance()
    samples = stream(8)
    [first] = batches_of(step, samples[:4])
    step.confirm(first)
    [second] = batches_of(step, samples[4:5] + samples[5:8])
    step.release()  # the send failed: the agent hands it back
    [resent] = batches_of(step, stream(9)[8:])
    assert resent == second and step.counters[RESENT] == 1
    step.confirm(resent)
    assert buffers.unsent() == []
    assert batches_of(step, stream(10)[9:]) == []


def test_a_lost_table_never_reuses_a_batch_id() -> None:
    """The table's state is gone (its changelog lost), the buffers remember the next free
    sequence: the next batch takes it, so no batch id is ever given twice."""
    first, buffers = balance()
    batches = batches_of(first, stream(8))
    for b in batches:
        first.confirm(b)
    second = Balance(first.settings, buffers, first.losses)
    [batch] = batches_of(second, stream(12)[8:])
    assert batch["sequence"] == 2
    assert batch["batch_id"] not in {b["batch_id"] for b in batches}


# -- Feedback --------------------------------------------------------------------------------


def feedback_step(buffers: dict[int, MemoryBuffers], losses: MemoryLosses | None = None,
                  partitions: int | None = None, **extra: Any) -> tuple[Feedback, list[int]]:
    asked: list[int] = []

    def buffers_of(partition: int) -> MemoryBuffers:
        asked.append(partition)
        return buffers[partition]

    settings = BalanceSettings(**{"hard_k": 2.0, "loss_alpha": 0.9, **extra})
    step = Feedback(settings, losses or MemoryLosses(), buffers_of,  # type: ignore[arg-type]
                    partitions=partitions)
    return step, asked


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


def test_a_malformed_batch_id_is_a_counted_skip_logged_where_it_was_read(
        caplog: pytest.LogCaptureFixture) -> None:
    """Bug B: "not-a-batch" with a hard example among its losses crashed the agent. It is
    a rejection with a reason, counted, logged with topic/partition/offset, and nothing of
    it is folded."""
    buffers = {0: MemoryBuffers(0, reuse_cap=4)}
    losses = MemoryLosses()
    step, asked = feedback_step(buffers, losses)
    bad = feedback("not-a-batch", [(f"s{i}", "python", 0.1) for i in range(7)]
                   + [("s7", "python", 9.0)])
    with caplog.at_level(logging.WARNING, logger="agents.feedback"):
        [out] = step.run([Item(bad, Coords("training-feedback", 1, 42))])
    assert out.rejected and out.reason == "invalid:batch_id"
    assert asked == [] and losses.state is None
    assert step.counters[rejected("invalid:batch_id")] == 1
    assert "training-feedback[1]@42" in caplog.text and "not-a-batch" in caplog.text


@pytest.mark.parametrize(("batch_id", "label", "reason"), [
    ("7-0-abcdef012345", "python", "invalid:partition"),
    ("0-0-abcdef012345", "bad label", "invalid:label"),
    ("0-0-ABCDEF012345", "python", "invalid:batch_id"),
])
def test_a_feedback_record_naming_what_cannot_be_is_skipped(batch_id: str, label: str,
                                                            reason: str) -> None:
    buffers = {0: MemoryBuffers(0, reuse_cap=4)}
    losses = MemoryLosses()
    step, _ = feedback_step(buffers, losses, partitions=4)
    [out] = step.run([Item(feedback(batch_id, [("s1", label, 0.5)]),
                           Coords("training-feedback", 0, 0))])
    assert out.rejected and out.reason == reason and losses.state is None


def test_the_same_feedback_record_twice_is_folded_once() -> None:
    """Finding 7 at the step: the store says (batch id, step) was folded; the step counts
    a replay and queues nothing."""
    buffers = {0: MemoryBuffers(0, reuse_cap=4)}
    for s in stream(8):
        buffers[0].add(s)
    losses = MemoryLosses()
    step, _ = feedback_step(buffers, losses)
    record = feedback("0-1-abcdef012345", [(f"s{i:04d}", "python", 0.1) for i in range(7)]
                      + [("s0007", "python", 9.0)])
    [first] = step.run([Item(record, Coords("training-feedback", 0, 0))])
    state = losses.state
    [second] = step.run([Item(record, Coords("training-feedback", 0, 0))])
    assert first.record["queued"] == 1 and not first.record["replayed"]
    assert second.record["replayed"] and second.record["queued"] == 0
    assert losses.state == state and step.counters["replayed"] == 1
    # Another step of the same batch is new feedback.
    [third] = step.run([Item(feedback("0-1-abcdef012345", [("s0001", "python", 0.2)], step=2),
                             Coords("training-feedback", 0, 1))])
    assert not third.record["replayed"] and losses.state != state


def test_the_state_the_timer_composed_ahead_keeps_its_measured_flow() -> None:
    from agents.sink_agents import _newest

    table = {"sequence": 3, "credit": {"a": 0.5}, "pending": 5, "flow": [1.0, 0.5], "ema": {}}
    timer = {"sequence": 5, "credit": {"a": -0.2}, "pending": 0, "flow": [2.0, 0.75]}
    assert _newest(table, timer) == {"sequence": 5, "credit": {"a": -0.2}, "pending": 0,
                                     "flow": [2.0, 0.75], "ema": {}}
    assert _newest(table, {"sequence": 2}) is table  # the table is ahead: it wins
