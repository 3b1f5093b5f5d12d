"""Send RawEvents to ``raw-events``: idempotent, acks=all, compressed, in input order.

``EventProducer`` is the Python API behind ``sluice produce``; other programs can use it:

    with EventProducer(settings.kafka, settings.topics) as producer:
        for event in events:
            producer.send(event)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from schemas.errors import SluiceError
from schemas.records import RawEvent
from streams.config import KafkaSettings, ProduceSettings, TopicSettings
from streams.connections import kafka_client_options
from streams.serde import encode


class ProduceError(SluiceError):
    """Events could not be delivered to Kafka."""


@dataclass
class ProduceStats:
    """Totals of one producer's life."""

    events: int = 0
    bytes: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)


class RateLimiter:
    """Keeps a caller at or under ``rate`` operations per second (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_at = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self.next_at > now:
            time.sleep(self.next_at - now)
        self.next_at = max(self.next_at, now) + self.interval


class EventProducer:
    """A kafka-python producer of single-object Avro RawEvents, keyed by event id."""

    def __init__(self, kafka: KafkaSettings, topics: TopicSettings,
                 produce: ProduceSettings | None = None, *, topic: str | None = None,
                 rate: float | None = None) -> None:
        p = produce or ProduceSettings()
        self.topic = topic or topics.raw
        self.stats = ProduceStats()
        self.limiter = RateLimiter(rate)
        self._errors: list[BaseException] = []
        try:
            self._producer = KafkaProducer(
                **kafka_client_options(kafka),
                acks="all",
                enable_idempotence=True,  # retries never duplicate or reorder
                compression_type=None if p.compression == "none" else p.compression,
                linger_ms=p.linger_ms,
                batch_size=p.batch_bytes,
                max_request_size=topics.max_message_bytes,
            )
        except KafkaError as exc:
            raise ProduceError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}; "
                               "is the stack up (`sluice up`)?") from exc

    def send(self, event: RawEvent) -> int:
        """Queue one event; returns its encoded size. Delivery errors surface at ``flush``."""
        self.limiter.wait()
        value = encode("RawEvent", event)
        future = self._producer.send(self.topic, key=event["id"].encode("utf-8"), value=value)
        future.add_errback(self._errors.append)
        self.stats.events += 1
        self.stats.bytes += len(value)
        return len(value)

    def send_bytes(self, key: bytes | None, value: bytes) -> None:
        """Queue raw bytes as they are (JSON events, or anything, for tests of bad input)."""
        future = self._producer.send(self.topic, key=key, value=value)
        future.add_errback(self._errors.append)

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait for every queued event; raise ``ProduceError`` if any failed."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as exc:
            raise ProduceError(f"flush failed: {exc}") from exc
        if self._errors:
            self.stats.failed += len(self._errors)
            first = self._errors[0]
            self._errors.clear()
            raise ProduceError(f"{self.stats.failed} event(s) not delivered; first: {first}")

    def close(self) -> None:
        """Flush, then close the connection."""
        try:
            self.flush()
        finally:
            self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Any:
        self.close()
