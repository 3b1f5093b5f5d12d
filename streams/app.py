"""The Faust app and every topic it reads or writes, declared once (CONVENTIONS §4).

Avro is registered as a Faust codec per record type (``sluice-<Record>``), so agents send
and receive plain dicts; ``raw-events`` is read as raw bytes because a bad raw event must
become a rejection, not a codec error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust
from faust.serializers import codecs

from sluice.settings import Settings
from streams import serde
from streams.topics import RECORD_OF_ROLE


class AvroCodec(codecs.Codec):
    """Single-object Avro for one record type."""

    def __init__(self, record: str, **kwargs: Any) -> None:
        self.record = record
        super().__init__(record=record, **kwargs)

    def _dumps(self, obj: Any) -> bytes:
        return serde.encode(self.record, obj)

    def _loads(self, s: bytes) -> Any:
        return serde.decode(s, self.record)


def codec_name(record: str) -> str:
    """The Faust codec name registered for a record type."""
    return f"sluice-{record}"


for _record in set(RECORD_OF_ROLE.values()):
    codecs.register(codec_name(_record), AvroCodec(_record))


@dataclass
class Topics:
    """Faust topic objects, by role."""

    raw: faust.TopicT
    candidates: faust.TopicT
    samples: faust.TopicT
    batches: faust.TopicT
    feedback: faust.TopicT
    rejected: faust.TopicT
    metrics: faust.TopicT


def create_app(settings: Settings, app_id: str = "sluice") -> tuple[faust.App, Topics]:
    """The Faust app on the configured Kafka, and its topics."""
    scheme = "kafka+ssl" if settings.kafka.security_protocol.endswith("SSL") else "kafka"
    brokers = [f"{scheme}://{host}" for host in settings.bootstrap_servers.split(",")]
    app = faust.App(
        app_id,
        broker=brokers,
        broker_credentials=_credentials(settings),
        store="memory://",  # tables are rebuilt from their Kafka changelog on start
        web_enabled=True,
        web_bind="127.0.0.1",  # loopback only; put a proxy in front to expose it
        web_host="127.0.0.1",
        web_port=settings.metrics.worker_web_port,
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication_factor,
        producer_max_request_size=settings.topics.max_message_bytes,
        consumer_max_fetch_size=settings.topics.max_message_bytes,
        producer_acks=-1,
        producer_compression_type="gzip",
        stream_buffer_maxsize=max(256, 4 * settings.dedup.batch_size),
        broker_commit_every=200,
        broker_commit_interval=2.0,
        # Embedding a micro-batch of long code can take seconds: keep the group membership.
        broker_session_timeout=settings.kafka.session_timeout_s,
        broker_heartbeat_interval=3.0,
        broker_max_poll_interval=600.0,
        consumer_auto_offset_reset="earliest",
        datadir=str(settings.state_dir / "faust"),
    )
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    t = settings.topics

    def topic(name: str, record: str | None) -> faust.TopicT:
        return app.topic(name, key_type=bytes, key_serializer="raw", value_type=None,
                         value_serializer=codec_name(record) if record else "raw",
                         partitions=t.partitions)

    topics = Topics(
        raw=topic(t.raw, None),
        candidates=topic(t.candidates, "Candidate"),
        samples=topic(t.samples, "CuratedSample"),
        batches=topic(t.batches, "CuratedBatch"),
        feedback=topic(t.feedback, "Feedback"),
        rejected=topic(t.rejected, "Rejection"),
        metrics=topic(t.metrics, "MetricSnapshot"),
    )
    return app, topics


def _credentials(settings: Settings) -> Any:
    k = settings.kafka
    if k.sasl_mechanism:
        return faust.SASLCredentials(username=k.sasl_username or "",
                                     password=k.sasl_password or "",
                                     mechanism=k.sasl_mechanism)
    if k.security_protocol == "SSL" and k.ssl_cafile:
        import ssl

        context = ssl.create_default_context(cafile=k.ssl_cafile)
        if k.ssl_certfile:
            context.load_cert_chain(k.ssl_certfile, k.ssl_keyfile)
        return faust.SSLCredentials(context)
    return None
