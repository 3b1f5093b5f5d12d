"""The topics of DESIGN.md, declared once: names from settings, partitions, retention."""

from __future__ import annotations

import contextlib

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from schemas.errors import SluiceError
from streams.config import TOPIC_RECORDS, KafkaSettings, TopicSettings
from streams.connections import kafka_client_options


def record_type(topics: TopicSettings, topic: str) -> str:
    """The record type a sluice topic carries; ``SluiceError`` for a foreign topic."""
    for role, name in topics.all().items():
        if name == topic:
            return TOPIC_RECORDS[role]
    known = ", ".join(topics.all().values())
    raise SluiceError(f"{topic!r} is not a sluice topic (known: {known})")


def topic_specs(t: TopicSettings) -> list[NewTopic]:
    """What ``ensure_topics`` creates."""
    specs = []
    for role, name in t.all().items():
        configs = {"retention.ms": str(t.retention_ms),
                   "max.message.bytes": str(t.max_message_bytes)}
        if role == "metrics":  # snapshots are totals: a day of them is plenty
            configs["retention.ms"] = str(24 * 3600 * 1000)
        specs.append(NewTopic(name, t.partitions, t.replication_factor, topic_configs=configs))
    return specs


def ensure_topics(kafka: KafkaSettings, topics: TopicSettings) -> list[str]:
    """Create the missing sluice topics; returns the names created."""
    admin = KafkaAdminClient(**kafka_client_options(kafka), request_timeout_ms=15000)
    try:
        existing = set(admin.list_topics())
        missing = [s for s in topic_specs(topics) if s.name not in existing]
        if missing:
            # Another process may create them meanwhile: that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing, timeout_ms=15000)
            admin.wait_for_topics([s.name for s in missing], timeout_ms=15000)
        return [s.name for s in missing]
    except KafkaError as exc:
        where = kafka.bootstrap_servers
        raise SluiceError(f"could not create topics on {where}: {exc}") from exc
    finally:
        admin.close()
