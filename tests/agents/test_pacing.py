"""Trainer-paced batches (``balance.pace = "trainer"``).

Pure parts first: the ``Pacer``'s budget, and ``Balance.paced`` over in-memory buffers
(composition from the whole pool by the policy's targets, capped reuse and starvation when
the trainer outruns the stream, the re-send of a batch nobody confirmed). Then the real
stack: a ``sluice worker`` running the balance agent alone, with a slow and a fast
consumer in the trainer's group on ``curated-batches``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from agents.pacing import Pacer
from schemas.records import CuratedBatch
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.lag import unconsumed
from streams.metrics import RESENT
from streams.serde import decode, encode
from tests.agents.pipeline_util import WorkerProcess, isolated
from tests.agents.sink_util import balance, batches_of, labels, stream

# -- the pacer --------------------------------------------------------------------------------


def test_nothing_is_composed_before_the_trainers_position_is_known() -> None:
    pacer = Pacer(ahead_batches=3)
    assert pacer.ahead is None and pacer.budget() == 0
    pacer.observe(1, pacer.mark())
    assert (pacer.ahead, pacer.budget()) == (1, 2)
    pacer.sent(2)
    assert (pacer.ahead, pacer.budget()) == (3, 0)
    pacer.observe(0, pacer.mark())  # the trainer committed everything
    assert pacer.budget() == 3


def test_a_batch_sent_while_a_probe_is_in_flight_is_counted_not_forgotten() -> None:
    pacer = Pacer(ahead_batches=2)
    pacer.observe(0, pacer.mark())
    mark = pacer.mark()
    pacer.sent()  # lands while the probe asks the broker; the probe may not have seen it
    pacer.observe(0, mark)
    assert pacer.ahead == 1 and pacer.budget() == 1
    pacer.observe(-4, pacer.mark())  # never below zero
    assert pacer.ahead == 0


# -- the step ---------------------------------------------------------------------------------


def test_trainer_paced_batches_come_when_asked_from_the_whole_pool() -> None:
    step, buffers = balance(batch_size=8, reuse_cap=1, pace="trainer")
    samples = stream(44)
    assert batches_of(step, samples) == []  # arrivals alone compose nothing
    first = step.paced(3)
    assert [b["sequence"] for b in first] == [0, 1, 2] and not step.starved
    for batch in first:
        step.confirm(batch)
    rest = step.paced(100)  # the trainer is far behind: all the pool allows, then starved
    assert [b["sequence"] for b in rest] == [3, 4] and step.starved
    assert sum(buffers.sizes().values()) == 4  # short of a batch: kept for the next one
    uses = Counter(s["id"] for b in first + rest for s in b["samples"])
    assert len(uses) == 40 and set(uses.values()) == {1}
    assert step.state["sequence"] == 5


def test_the_pool_picks_by_the_policy_targets_within_one_sample_per_class() -> None:
    """Compute-limited: 400 samples (3 python : 1 docs) wait, the trainer takes 20 batches
    of 8. Inverse wants 4 : 4; every batch is within one sample of it (the rounding credit
    moves by at most one), and over the 20 the total is exact to one sample."""
    step, _ = balance(batch_size=8, reuse_cap=1, pace="trainer", policy="inverse")
    batches_of(step, stream(400))
    drawn = step.paced(20)
    assert len(drawn) == 20
    target = drawn[-1]["target_shares"]
    assert target == pytest.approx({"python": 0.5, "docs": 0.5}, abs=0.01)
    assert all(abs(labels(b)["docs"] - 8 * target["docs"]) <= 1 for b in drawn)
    total = sum((labels(b) for b in drawn), Counter())
    assert abs(total["docs"] - 160 * target["docs"]) <= 1


def test_a_trainer_faster_than_the_stream_gets_reuse_up_to_the_cap_then_starves() -> None:
    step, _ = balance(batch_size=8, reuse_cap=2, pace="trainer")
    batches_of(step, stream(16))
    drawn = step.paced(100)
    assert len(drawn) == 4 and step.starved
    uses = Counter(s["id"] for b in drawn for s in b["samples"])
    assert set(uses.values()) == {2} and len(uses) == 16
    for batch in drawn:
        step.confirm(batch)
    assert step.paced(1) == [] and step.starved
    batches_of(step, stream(24)[16:])  # the stream catches up: served at once
    assert len(step.paced(1)) == 1 and not step.starved


def test_a_paced_batch_nobody_confirmed_is_sent_again_first_byte_for_byte() -> None:
    step, buffers = balance(batch_size=4, reuse_cap=1, pace="trainer")
    batches_of(step, stream(12))
    [lost] = step.paced(1)
    step.release()  # its send failed
    again, fresh = step.paced(2)
    assert encode("CuratedBatch", again) == encode("CuratedBatch", lost)
    assert fresh["sequence"] == 1 and step.counters[RESENT] == 1
    assert [r.sequence for r in buffers.unsent()] == [0, 1]


# -- the real stack ---------------------------------------------------------------------------

WAIT_S = 120.0  # deadlines for failures only
BATCH = 8


def _worker(stack: Settings, tmp_path: Path, group: str, ahead: int) -> Settings:
    settings = isolated(stack, partitions=2, balance={
        "batch_size": BATCH, "reuse_cap": 1, "policy": "natural", "replay_fraction": 0.0,
        "pace": "trainer", "ahead_batches": ahead, "pace_interval_s": 0.2,
        "trainer_group": group})
    return settings.model_copy(update={"state_dir": tmp_path / "state"})


def _produce(settings: Settings, n: int) -> None:
    from tests.agents.test_balance_recovery import curated, produce_samples
    produce_samples(settings, (curated(i) for i in range(n)))


class TrainerStandIn:
    """A consumer in the trainer's group that reads ``curated-batches`` one batch at a time,
    takes ``step_s`` per batch, and commits after each (as the trainer commits its trained
    position); a sampler thread records the unconsumed batches the broker reports."""

    def __init__(self, settings: Settings, group: str, step_s: float) -> None:
        self.settings, self.group, self.step_s = settings, group, step_s
        self.batches: list[CuratedBatch] = []
        self.lags: list[int] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        admin = KafkaAdminClient(**kafka_client_options(self.settings.kafka))
        try:
            while not self._stop.is_set():
                # KafkaError: the new group's coordinator is still being found
                with contextlib.suppress(KafkaError):
                    self.lags.append(unconsumed(admin, self.group, self.settings.topics.batches,
                                                self.settings.topics.partitions))
                time.sleep(0.05)
        finally:
            admin.close()

    def run(self, expected: int) -> None:
        topic = self.settings.topics.batches
        consumer = KafkaConsumer(**kafka_client_options(self.settings.kafka),
                                 group_id=self.group, enable_auto_commit=False,
                                 auto_offset_reset="earliest", max_poll_records=1)
        consumer.assign([TopicPartition(topic, p)
                         for p in range(self.settings.topics.partitions)])
        self._sampler.start()
        deadline = time.monotonic() + WAIT_S
        try:
            while len(self.batches) < expected and time.monotonic() < deadline:
                for tp, messages in consumer.poll(timeout_ms=200).items():
                    for message in messages:
                        self.batches.append(decode(message.value, "CuratedBatch"))
                        time.sleep(self.step_s)  # the training step
                        consumer.commit({tp: OffsetAndMetadata(message.offset + 1, "", -1)})
            # A little longer: nothing more may come (every sample is used once).
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                for messages in consumer.poll(timeout_ms=200).values():
                    self.batches += [decode(m.value, "CuratedBatch") for m in messages]
        finally:
            self._stop.set()
            self._sampler.join(10)
            consumer.close()


@pytest.mark.integration
@pytest.mark.parametrize(("step_s", "ahead"), [(0.6, 2), (0.0, 3)], ids=["slow", "fast"])
def test_trainer_paced_emission_keeps_the_lag_bound_and_serves_every_batch(
        stack: Settings, tmp_path: Path, step_s: float, ahead: int) -> None:
    """80 samples wait (10 batches, every sample used once). A slow trainer never has more
    than ``ahead_batches`` unconsumed batches; a fast one gets all 10 as the pool allows;
    both get every sample exactly once."""
    group = f"trainer-{uuid.uuid4().hex[:8]}"
    settings = _worker(stack, tmp_path, group, ahead)
    _produce(settings, 10 * BATCH)
    worker = WorkerProcess(settings, "balance", tmp_path / "worker.log").start()
    trainer = TrainerStandIn(settings, group, step_s)
    try:
        trainer.run(expected=10)
    finally:
        worker.stop()
    print(f"\n[pacing {step_s}s/batch] {len(trainer.batches)} batches, most unconsumed "
          f"{max(trainer.lags, default=0)} of {ahead}, {len(trainer.lags)} probes")
    assert len(trainer.batches) == 10, worker.log_tail()
    uses = Counter(s["id"] for b in trainer.batches for s in b["samples"])
    assert len(uses) == 10 * BATCH and set(uses.values()) == {1}
    assert trainer.lags and max(trainer.lags) <= ahead, trainer.lags
    if step_s:
        assert max(trainer.lags) == ahead  # the bound is reached: the trainer never waits


@pytest.mark.integration
@pytest.mark.parametrize("commit_every_s", [0.2, 30.0])
def test_the_real_trainer_paces_the_balance_stage_by_its_commits(
        stack: Settings, tmp_path: Path, commit_every_s: float) -> None:
    """The whole loop: the trainer commits its trained position at most every
    ``trainer.commit_every_s``, and at once when it waits for data; the balance stage
    follows it with ``ahead_batches = 2``, below the trainer's prefetch depth; the trainer
    still reaches all 10 batches. With a long commit interval the steps between two commits
    used to stay uncommitted while the trainer waited, so the balance stage saw it 2 ahead
    and composed nothing: a stall at step 3 (seen once with 0.2 s, every time with 30 s)."""
    from trainer.loop import train

    group = f"trainer-{uuid.uuid4().hex[:8]}"
    settings = _worker(stack, tmp_path, group, ahead=2)
    settings = settings.model_copy(update={
        "trainer": settings.trainer.model_copy(update={
            "group_id": group, "device": "cpu", "model": "embedding-classifier",
            "model_options": {"embedding_dim": 8, "hidden": 8}, "holdout_fraction": 0.0,
            "max_steps": 10, "idle_timeout_s": 20.0, "commit_every_s": commit_every_s,
            "checkpoint_dir": tmp_path / "ckpt"}),
        "metrics": settings.metrics.model_copy(update={"trainer_port": 0})})
    _produce(settings, 10 * BATCH)
    worker = WorkerProcess(settings, "balance", tmp_path / "worker.log").start()
    try:
        result = train(settings)
    finally:
        worker.stop()
    print(f"\n[paced trainer] {result.stopped} at step {result.step}, {result.samples} "
          f"samples, data-wait {result.data_wait_share:.0%}")
    assert (result.step, result.stopped) == (10, "max_steps"), worker.log_tail()
    assert result.samples == 10 * BATCH
