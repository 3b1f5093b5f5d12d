"""The arms whose batches depend on the trainer's losses (step 5 of
``bench.curated_vs_raw``'s method, the ``+hard_k`` and ``+reducible`` arms): the product's
``Balance`` step under trainer pacing and its ``Feedback`` step, with ``trainer.loop.train``
running beside them on the arm's own topics, as the balance and feedback agents run beside
a trainer in ``sluice worker``.

The loop keeps at most ``balance.ahead_batches`` batches on the topic beyond the steps the
trainer has reported (one ``Feedback`` record per optimizer step), so every batch is
composed after the losses of all but the last few: difficulty factors re-weight the class
targets, and the replay policy (``hard_k``: loss above mean + k·std; ``reducible``: the
trainer's loss minus a reference model's, RHO-LOSS) re-queues samples into later batches.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

from bench.curation.arms import buffer_all

#: Seconds without a Feedback record (while batches are waiting) before the loop gives up.
FEEDBACK_TIMEOUT_S = 120.0


class Loop:
    """The balance side of one closed-loop arm: the ``Balance`` and ``Feedback`` steps over
    one partition's buffers in a fresh namespace, what was sent, and what was folded."""

    def __init__(self, settings: Any, samples: list[Any], policy: str, replay_policy: str,
                 batch_size: int) -> None:
        from agents.balance import Balance
        from agents.buffers import buffers_for
        from agents.feedback import Feedback, LossStore
        from streams.connections import redis_client

        self.config = settings.balance.model_copy(update={
            "policy": policy, "batch_size": batch_size, "pace": "trainer",
            "replay_policy": replay_policy})
        namespace = f"bench-{os.urandom(6).hex()}"
        self.client = redis_client(settings.redis)
        buffers = buffers_for(self.client, namespace, 0, self.config)
        losses = LossStore(self.client, namespace)
        self.balance = Balance(self.config, buffers, losses)
        self.feedback = Feedback(self.config, losses, lambda _partition: buffers,
                                 partitions=1)
        buffer_all(self.balance, samples)
        self.pool = dict(buffers.sizes())
        self.sent: list[dict[str, Any]] = []
        self.fresh: list[dict[str, Any]] = []  # the batches composed, in order
        self.recycled = 0
        self.starved_at: int | None = None
        self.folded: Counter[str] = Counter()

    def next_batches(self, room: int) -> list[dict[str, Any]]:
        """``room`` batches to send: composed from the pool (each confirmed), and if the
        pool runs dry the composed ones again, oldest first."""
        drawn: list[dict[str, Any]] = []
        for composed in self.balance.paced(room):
            self.balance.confirm(composed)
            drawn.append(dict(composed))
        self.fresh += drawn
        if len(drawn) < room and self.starved_at is None:
            self.starved_at = len(self.sent) + len(drawn)
        out = list(drawn)
        while len(out) < room and self.fresh:
            out.append(self.fresh[self.recycled % len(self.fresh)])
            self.recycled += 1
        self.sent += out
        return out

    def fold(self, record: dict[str, Any], coords: Any) -> None:
        """One ``Feedback`` record through the product's ``Feedback`` step."""
        from agents.step import Item

        outcome = self.feedback.process([Item(record, coords)])[0]
        self.folded["rejected" if outcome.rejected else "folded"] += 1
        if not outcome.rejected:
            self.folded["replays_queued"] += int(outcome.record["queued"])

    def composition(self) -> dict[str, Any]:
        """How the composition went (the JSON's ``composition`` of the arm)."""
        return {"policy": self.balance.policy, "replay_policy": self.config.replay_policy,
                "pool": self.pool, "composed": len(self.fresh), "recycled": self.recycled,
                "starved_at": self.starved_at,
                "short_batches": self.balance.counters["batches.short"],
                "feedback": dict(self.folded),
                "reference_missing": self.feedback.counters["reference_missing"],
                "replayed_samples": sum(s["replay"] for b in self.sent for s in b["samples"]),
                "reuse_cap": self.config.reuse_cap}


def fed_back_batches(settings: Any, samples: list[Any], policy: str, replay_policy: str,
                     steps: int, batch_size: int) -> tuple[list[dict[str, Any]],
                                                           dict[str, Any], Any]:
    """Compose and train together: every kept sample is buffered (fresh namespace, one
    partition), the trainer starts on ``settings.topics.batches`` and the loop sends it
    paced batches while folding its feedback. Returns the batches in the order sent (a pool
    that runs dry is cycled from its first batch, as ``bench.curation.training.produce``
    cycles), how the composition went, and the trainer's ``TrainResult``."""
    from kafka import KafkaConsumer, KafkaProducer

    from agents.step import Coords
    from streams.connections import kafka_client_options
    from streams.serde import decode, encode
    from streams.topics import ensure_topics

    loop = Loop(settings, samples, policy, replay_policy, batch_size)
    ensure_topics(settings.kafka, settings.topics)
    options = kafka_client_options(settings.kafka)
    producer = KafkaProducer(**options, linger_ms=5, max_request_size=8 * 1024 * 1024)
    consumer = KafkaConsumer(settings.topics.feedback, **options,
                             group_id=f"bench-{os.urandom(6).hex()}",
                             auto_offset_reset="earliest", enable_auto_commit=False)
    trainer = TrainerThread(settings)
    reported = 0
    last_report = time.monotonic()
    try:
        while trainer.is_alive() and reported < steps:
            room = min(loop.config.ahead_batches - (len(loop.sent) - reported),
                       steps - len(loop.sent))
            if room > 0:
                for batch in loop.next_batches(room):
                    producer.send(settings.topics.batches, key=batch["batch_id"].encode(),
                                  value=encode("CuratedBatch", batch), partition=0)
                producer.flush(timeout=60)
            for records in consumer.poll(timeout_ms=500).values():
                for message in records:  # one record per optimizer step
                    loop.fold(decode(message.value, "Feedback"),
                              Coords(message.topic, message.partition, message.offset))
                    reported += 1
                    last_report = time.monotonic()
            if time.monotonic() - last_report > FEEDBACK_TIMEOUT_S:
                raise RuntimeError(f"no feedback for {FEEDBACK_TIMEOUT_S:.0f}s after "
                                   f"{reported} steps ({len(loop.sent)} batches sent)")
        result = trainer.finish()
    finally:
        producer.close(timeout=10)
        consumer.close()
        loop.client.close()
    return loop.sent, loop.composition(), result


class TrainerThread(threading.Thread):
    """``trainer.loop.train(settings)`` in a thread; ``finish`` joins it and returns its
    ``TrainResult`` or raises what it raised."""

    def __init__(self, settings: Any) -> None:
        super().__init__(name="bench-trainer", daemon=True)
        self.settings = settings
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        from trainer.loop import train

        try:
            self.result = train(self.settings)
        except BaseException as exc:  # handed to ``finish``
            self.error = exc

    def finish(self, timeout_s: float = 600.0) -> Any:
        """Wait for the run; its ``TrainResult``."""
        self.join(timeout=timeout_s)
        if self.error is not None:
            raise RuntimeError("the trainer failed") from self.error
        if self.result is None:
            raise RuntimeError("the trainer did not finish")
        return self.result
