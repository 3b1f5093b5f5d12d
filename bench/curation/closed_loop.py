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


def fed_back_batches(settings: Any, samples: list[Any], policy: str, replay_policy: str,
                     steps: int, batch_size: int) -> tuple[list[dict[str, Any]],
                                                           dict[str, Any], Any]:
    """Compose and train together: every kept sample is buffered (fresh namespace, one
    partition), the trainer starts on ``settings.topics.batches`` and the loop sends it
    paced batches while folding its feedback. Returns the batches in the order sent (a pool
    that runs dry is cycled from its first batch, as ``bench.curation.training.produce``
    cycles), how the composition went, and the trainer's ``TrainResult``."""
    from kafka import KafkaConsumer, KafkaProducer

    from agents.balance import Balance
    from agents.buffers import buffers_for
    from agents.feedback import Feedback, LossStore
    from agents.step import Coords, Item
    from streams.connections import kafka_client_options, redis_client
    from streams.serde import decode, encode
    from streams.topics import ensure_topics
    from trainer.loop import train

    config = settings.balance.model_copy(update={
        "policy": policy, "batch_size": batch_size, "pace": "trainer",
        "replay_policy": replay_policy})
    namespace = f"bench-{os.urandom(6).hex()}"
    client = redis_client(settings.redis)
    buffers = buffers_for(client, namespace, 0, config)
    losses = LossStore(client, namespace)
    balance = Balance(config, buffers, losses)
    feedback = Feedback(config, losses, lambda _partition: buffers, partitions=1)
    buffer_all(balance, samples)
    pool = dict(buffers.sizes())

    ensure_topics(settings.kafka, settings.topics)
    options = kafka_client_options(settings.kafka)
    producer = KafkaProducer(**options, linger_ms=5, max_request_size=8 * 1024 * 1024)
    consumer = KafkaConsumer(settings.topics.feedback, **options,
                             group_id=f"bench-{namespace}", auto_offset_reset="earliest",
                             enable_auto_commit=False)
    result: list[Any] = []
    failure: list[BaseException] = []

    def run_trainer() -> None:
        try:
            result.append(train(settings))
        except BaseException as exc:  # reported by the loop below
            failure.append(exc)

    trainer = threading.Thread(target=run_trainer, name="bench-trainer", daemon=True)
    trainer.start()
    sent: list[dict[str, Any]] = []
    fresh: list[dict[str, Any]] = []  # the batches composed, in order
    recycled = 0
    starved_at: int | None = None
    folded: Counter[str] = Counter()
    reported = 0
    last_report = time.monotonic()
    try:
        while trainer.is_alive() and reported < steps:
            room = min(config.ahead_batches - (len(sent) - reported), steps - len(sent))
            if room > 0:
                drawn: list[dict[str, Any]] = []
                for composed in balance.paced(room):
                    balance.confirm(composed)
                    drawn.append(dict(composed))
                fresh += drawn
                if len(drawn) < room and starved_at is None:
                    starved_at = len(sent) + len(drawn)
                out = list(drawn)
                while len(out) < room and fresh:  # a dry pool: re-send, oldest first
                    out.append(fresh[recycled % len(fresh)])
                    recycled += 1
                for batch in out:
                    producer.send(settings.topics.batches, key=batch["batch_id"].encode(),
                                  value=encode("CuratedBatch", batch), partition=0)
                    sent.append(batch)
                producer.flush(timeout=60)
            for records in consumer.poll(timeout_ms=500).values():
                for message in records:
                    item = Item(decode(message.value, "Feedback"),
                                Coords(message.topic, message.partition, message.offset))
                    outcome = feedback.process([item])[0]
                    folded["rejected" if outcome.rejected else "folded"] += 1
                    if not outcome.rejected:
                        folded["replays_queued"] += int(outcome.record["queued"])
                    reported += 1
                    last_report = time.monotonic()
            if time.monotonic() - last_report > FEEDBACK_TIMEOUT_S:
                raise RuntimeError(f"no feedback for {FEEDBACK_TIMEOUT_S:.0f}s after "
                                   f"{reported} steps ({len(sent)} batches sent)")
        trainer.join(timeout=600)
    finally:
        producer.close(timeout=10)
        consumer.close()
        client.close()
    if failure:
        raise RuntimeError("the trainer failed") from failure[0]
    if not result:
        raise RuntimeError("the trainer did not finish")
    return sent, {"policy": balance.policy, "replay_policy": replay_policy, "pool": pool,
                  "composed": len(fresh), "recycled": recycled, "starved_at": starved_at,
                  "short_batches": balance.counters["batches.short"],
                  "feedback": dict(folded),
                  "reference_missing": feedback.counters["reference_missing"],
                  "replayed_samples": sum(s["replay"] for b in sent for s in b["samples"]),
                  "reuse_cap": config.reuse_cap}, result[0]
