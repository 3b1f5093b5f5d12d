"""Small kafka-python helpers for the integration tests: a fresh topic, and read it back."""

from __future__ import annotations

import time
import uuid
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from sluice.settings import Settings
from streams.connections import kafka_client_options


def create_topic(settings: Settings, prefix: str, partitions: int = 1) -> str:
    """A new topic with a unique name (tests sharing one broker never see each other's)."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(**kafka_client_options(settings.kafka), request_timeout_ms=15000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)], timeout_ms=15000)
        admin.wait_for_topics([name], timeout_ms=15000)
    finally:
        admin.close()
    return name


def consume_all(settings: Settings, topic: str, expected: int,
                timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` from the beginning, once ``expected`` have arrived.

    Returns kafka-python ``ConsumerRecord``s in (partition, offset) order; fewer than
    ``expected`` only when the timeout passed first.
    """
    consumer = KafkaConsumer(**kafka_client_options(settings.kafka), group_id=None,
                             enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
        return sorted(got, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()
