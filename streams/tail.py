"""Read any sluice topic back as JSON-ready dicts (``sluice tail``)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from schemas.errors import SluiceError
from streams.config import KafkaSettings, TopicSettings
from streams.connections import kafka_client_options
from streams.serde import DecodeError, decode, decode_raw_event
from streams.topics import record_type


def printable(record: Any) -> Any:
    """A JSON-ready copy: embeddings by their size, other bytes as base64."""
    if isinstance(record, dict):
        out = {}
        for key, value in record.items():
            if key == "embedding" and isinstance(value, bytes):
                out[key] = f"<{len(value) // 2} x float16>"
            else:
                out[key] = printable(value)
        return out
    if isinstance(record, list):
        return [printable(item) for item in record]
    if isinstance(record, bytes):
        return base64.b64encode(record).decode("ascii")
    return record


def decode_message(topics: TopicSettings, topic: str, value: bytes) -> dict[str, Any]:
    """Decode one message of a sluice topic; undecodable ones become an ``_error`` dict."""
    name = record_type(topics, topic)
    try:
        if name == "RawEvent":
            return dict(decode_raw_event(value, max_bytes=len(value) + 1))
        return decode(value, name)
    except DecodeError as exc:
        return {"_error": exc.reason, "_detail": exc.detail}


def tail(kafka: KafkaSettings, topics: TopicSettings, topic: str, count: int | None,
         from_beginning: bool, follow: bool, idle_timeout_s: float = 2.0
         ) -> Iterator[dict[str, Any]]:
    """Messages of ``topic`` with their coordinates.

    Without ``from_beginning``: the last ``count`` messages (all partitions, by timestamp);
    with it: from the start, ``count`` at most. ``follow`` keeps waiting for new ones.
    """
    record_type(topics, topic)  # fail early on a foreign topic
    consumer = KafkaConsumer(**kafka_client_options(kafka), enable_auto_commit=False,
                             group_id=None, consumer_timeout_ms=int(idle_timeout_s * 1000))
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise SluiceError(f"topic {topic} does not exist on {kafka.bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        if from_beginning:
            consumer.seek_to_beginning()
        else:
            back = count if count is not None else 10
            for tp in tps:
                consumer.seek(tp, max(begin[tp], end[tp] - back))
        backlog: list[dict[str, Any]] = []
        # Read the backlog up to the end offsets seen at start, then sort it by time.
        remaining = {tp: end[tp] for tp in tps if consumer.position(tp) < end[tp]}
        while remaining:
            before = len(backlog)
            for message in consumer:
                backlog.append(_entry(topics, message))
                tp = TopicPartition(message.topic, message.partition)
                if message.offset + 1 >= remaining.get(tp, 0):
                    remaining.pop(tp, None)
                if not remaining:
                    break
            if len(backlog) == before:  # idle past the timeout: the broker has no more
                break
        backlog.sort(key=lambda e: (e["_timestamp"], e["_partition"], e["_offset"]))
        if from_beginning:
            shown = backlog[:count] if count is not None else backlog
        else:
            shown = backlog[-count:] if count else backlog
        yield from shown
        if count is not None and from_beginning and len(shown) >= count:
            return
        emitted = len(shown)
        while follow:
            for message in consumer:
                yield _entry(topics, message)
                emitted += 1
                if from_beginning and count is not None and emitted >= count:
                    return
    finally:
        consumer.close()


def _entry(topics: TopicSettings, message: Any) -> dict[str, Any]:
    entry = printable(decode_message(topics, message.topic, message.value))
    entry["_partition"] = message.partition
    entry["_offset"] = message.offset
    entry["_timestamp"] = message.timestamp
    return dict(entry)
