"""Reading a live run back (``bench.churn``, ``bench.soak``): the outcomes and batches from
Kafka (``Ledger``), the namespace's vector set, what the balance stage buffered, and where
each id without an outcome stands (lost past a committed offset, or still in flight)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.common import console


@dataclass
class Ledger:
    """Reads samples, rejections and batches from the beginning, as they come."""

    settings: Any
    decisions: dict[str, set[tuple[str, str | None, str | None]]] = field(default_factory=dict)
    messages: Counter[str] = field(default_factory=Counter)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    batches: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from streams.config import TOPIC_RECORDS
        from streams.connections import kafka_client_options

        self._consumer = KafkaConsumer(**kafka_client_options(self.settings.kafka),
                                       group_id=None, enable_auto_commit=False)
        topics = self.settings.topics.all()
        self._role = {topics[r]: r for r in ("samples", "rejected", "batches")}
        self._records = TOPIC_RECORDS
        tps = [TopicPartition(t, p) for t in self._role
               for p in sorted(self._consumer.partitions_for_topic(t) or ())]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning()

    def poll(self, timeout_ms: int = 500) -> int:
        """Read what arrived; how many messages."""
        from schemas.embedding import decode_embedding
        from streams.serde import decode

        count = 0
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            for message in records:
                count += 1
                role = self._role[message.topic]
                record = decode(message.value, self._records[role])
                if role == "batches":
                    self.batches.setdefault(record["batch_id"], []).append(
                        (record["content_digest"], [s["id"] for s in record["samples"]]))
                    continue
                event_id = record["id"]
                self.messages[event_id] += 1
                if role == "rejected":
                    decision = ("rejected", record["reason"], record["duplicate_of"])
                else:
                    decision = ("kept", None, None)
                    if event_id not in self.vectors and record.get("embedding_dim"):
                        self.vectors[event_id] = decode_embedding(record["embedding"],
                                                                  record["embedding_dim"])
                self.decisions.setdefault(event_id, set()).add(decision)
        return count

    def drain(self) -> None:
        """Read until nothing more arrives for a second."""
        while self.poll(1000):
            pass

    def close(self) -> None:
        self._consumer.close()


def index_members(settings: Any) -> set[str]:
    """Every id in the namespace's vector set."""
    from agents.keys import vset_key
    from streams.connections import redis_client

    client = redis_client(settings.redis)
    try:
        key = vset_key(settings.redis.namespace)
        size = int(client.execute_command("VCARD", key) or 0)
        members = client.execute_command("VRANDMEMBER", key, size) if size else []
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members or []}
    finally:
        client.close()


def buffered(settings: Any) -> set[str]:
    """Every id the balance stage has buffered (the ``seen`` hash of each partition)."""
    from agents.keys import buffer_prefix
    from streams.connections import redis_client

    client = redis_client(settings.redis)
    try:
        out: set[str] = set()
        for partition in range(settings.topics.partitions):
            keys = client.hkeys(buffer_prefix(settings.redis.namespace, partition) + ":seen")
            out |= {k.decode() if isinstance(k, bytes) else k for k in keys}
        return out
    finally:
        client.close()


def drain(ledger: Ledger, produced: list[str], drain_s: float, idle_s: float = 120.0) -> float:
    """Poll until every produced id has an outcome, ``drain_s`` passed, or nothing new came
    for ``idle_s``; prints progress every 30 s; the seconds it took."""
    began = last_new = last_print = time.monotonic()
    wanted = set(produced)
    while True:
        if ledger.poll(1000):
            last_new = time.monotonic()
        now = time.monotonic()
        left = len(wanted - set(ledger.decisions))
        if not left or now - began > drain_s or now - last_new > idle_s:
            return now - began
        if now - last_print > 30:
            console.print(f"  draining: {left} of {len(wanted)} without an outcome yet "
                          f"({now - began:.0f} s)")
            last_print = now


def wait_buffered(settings: Any, samples: set[str], timeout_s: float = 180.0,
                  idle_s: float = 30.0, earlier: set[str] | None = None) -> set[str]:
    """What the balance stage buffered, once it holds every sample or stopped moving.
    ``earlier``: ids read from ``buffered`` during the run, which a bounded ``seen``
    (``balance.seen_cap``) may have forgotten since."""
    earlier = earlier or set()
    began = moved = time.monotonic()
    have = buffered(settings) | earlier
    while not samples <= have and time.monotonic() - began < timeout_s:
        if time.monotonic() - moved > idle_s:
            break
        time.sleep(1.0)
        now = buffered(settings) | earlier
        if now != have:
            have, moved = now, time.monotonic()
    return have


def committed_offsets(settings: Any) -> dict[tuple[str, int], int]:
    """The workers' group's committed offset of every partition it consumes."""
    from kafka.admin import KafkaAdminClient

    from streams.connections import kafka_client_options

    admin = KafkaAdminClient(**kafka_client_options(settings.kafka), request_timeout_ms=10000)
    try:
        found = admin.list_group_offsets(settings.app_id)
    finally:
        admin.close()
    if settings.app_id in found:  # kafka-python 3 answers by group
        found = found[settings.app_id]
    return {(tp.topic, tp.partition): int(meta.offset) for tp, meta in found.items()}


def positions(settings: Any, topic: str, ids: set[str]) -> dict[str, list[tuple[int, int]]]:
    """Where (partition, offset) each of ``ids`` is on ``topic``, read by key to the end."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.connections import kafka_client_options

    out: dict[str, list[tuple[int, int]]] = {}
    if not ids:
        return out
    consumer = KafkaConsumer(**kafka_client_options(settings.kafka), group_id=None,
                             enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for records in consumer.poll(timeout_ms=1000).values():
                for message in records:
                    key = (message.key or b"").decode("utf-8", "replace")
                    if key in ids:
                        out.setdefault(key, []).append((message.partition, message.offset))
    finally:
        consumer.close()
    return out


def where_stuck(settings: Any, undecided: set[str], unbuffered: set[str]) -> dict[str, str]:
    """Why each id without an outcome (or sample never buffered) is so: ``lost at <stage>``
    when the stage's committed offset has passed its record (acked without an outcome), else
    ``in flight`` (the stage has not got to it yet: the lag shows it)."""
    committed = committed_offsets(settings)
    t = settings.topics

    def passed(topic: str, coords: list[tuple[int, int]]) -> bool:
        return any(offset < committed.get((topic, p), 0) for p, offset in coords)

    raw = positions(settings, t.raw, undecided)
    candidates = positions(settings, t.candidates, undecided)
    samples = positions(settings, t.samples, unbuffered)
    out = {}
    for event_id in undecided:
        if candidates.get(event_id):
            out[event_id] = ("lost at dedup" if passed(t.candidates, candidates[event_id])
                             else "in flight")
        else:
            out[event_id] = ("lost at ingest" if passed(t.raw, raw.get(event_id, []))
                             else "in flight")
    for sample_id in unbuffered:
        out[sample_id] = ("lost at balance" if passed(t.samples, samples.get(sample_id, []))
                          else "in flight")
    return out
