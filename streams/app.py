"""The Faust app and every topic it reads or writes, declared once (CONVENTIONS §4).

Avro is registered as a Faust codec per record type (``sluice-<Record>``), so agents send
and receive plain dicts; ``raw-events`` is read as raw bytes because a bad raw event must
become a rejection, not a codec error.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import faust
from faust.serializers import codecs
from faust.types.auth import CredentialsT

from streams import serde
from streams.config import TOPIC_RECORDS, KafkaSettings, TopicSettings
from streams.connections import ssl_context
from streams.offsets import SafeTransport


@dataclass(frozen=True)
class Undecodable:
    """A message of a sluice topic that is not its record type. The codec hands it to the
    agent instead of raising: Faust would ack a message whose value fails to decode and
    then crash the agent, so the record would end with no outcome. The agent rejects it."""

    reason: str
    detail: str
    raw: bytes


class AvroCodec(codecs.Codec):
    """Single-object Avro for one record type; what does not decode is ``Undecodable``."""

    def __init__(self, record: str, **kwargs: Any) -> None:
        self.record = record
        super().__init__(record=record, **kwargs)

    def _dumps(self, obj: Any) -> bytes:
        return serde.encode(self.record, obj)

    def _loads(self, s: bytes) -> Any:
        try:
            return serde.decode(s, self.record)
        except serde.DecodeError as exc:
            return Undecodable(exc.reason, exc.detail, bytes(s))


def codec_name(record: str) -> str:
    """The Faust codec name registered for a record type."""
    return f"sluice-{record}"


for _record in set(TOPIC_RECORDS.values()):
    codecs.register(codec_name(_record), AvroCodec(_record))


@dataclass
class Topics:
    """Faust topic objects, by role (the roles of ``TOPIC_RECORDS``, checked below)."""

    raw: faust.TopicT
    candidates: faust.TopicT
    samples: faust.TopicT
    batches: faust.TopicT
    feedback: faust.TopicT
    rejected: faust.TopicT
    metrics: faust.TopicT


assert [f.name for f in fields(Topics)] == list(TOPIC_RECORDS), "Topics must list every role"


class SluiceApp(faust.App):
    """faust's app on ``SafeTransport``: its consumer never commits past a record that has
    no outcome (see ``streams.offsets``)."""

    def _new_transport(self) -> Any:
        return SafeTransport(self.conf.broker_consumer, self)


def create_app(kafka: KafkaSettings, topics: TopicSettings, *, app_id: str, datadir: Path,
               web_port: int, buffer_maxsize: int = 256) -> tuple[faust.App, Topics]:
    """The Faust app on the configured Kafka, and its topics."""
    # One scheme for every protocol: Faust's transport is chosen by the scheme ("kafka" is
    # aiokafka); TLS and SASL travel in the credentials, never in the URL.
    brokers = [f"kafka://{host}" for host in kafka.bootstrap_servers.split(",")]
    app = SluiceApp(
        app_id,
        broker=brokers,
        broker_credentials=_credentials(kafka),
        store="memory://",  # tables are rebuilt from their Kafka changelog on start
        web_enabled=True,
        web_bind="127.0.0.1",  # loopback only; put a proxy in front to expose it
        web_host="127.0.0.1",
        web_port=web_port,
        topic_partitions=topics.partitions,
        topic_replication_factor=topics.replication_factor,
        producer_max_request_size=topics.max_message_bytes,
        consumer_max_fetch_size=topics.max_message_bytes,
        producer_acks=-1,
        producer_compression_type="gzip",
        stream_buffer_maxsize=max(256, buffer_maxsize),
        broker_commit_every=200,
        broker_commit_interval=2.0,
        # Embedding a micro-batch of long code can take seconds: keep the group membership.
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=3.0,
        broker_max_poll_interval=600.0,
        consumer_auto_offset_reset="earliest",
        datadir=str(datadir),
    )
    datadir.mkdir(parents=True, exist_ok=True)

    def topic(name: str, record: str) -> faust.TopicT:
        # raw-events is read as bytes: a bad raw event must become a rejection, not a
        # codec error.
        serializer = "raw" if record == "RawEvent" else codec_name(record)
        return app.topic(name, key_type=bytes, key_serializer="raw", value_type=None,
                         value_serializer=serializer, partitions=topics.partitions)

    names = topics.all()
    return app, Topics(**{role: topic(names[role], record)
                          for role, record in TOPIC_RECORDS.items()})


def _credentials(k: KafkaSettings) -> CredentialsT | None:
    """Faust's credentials for the configured protocol (None: PLAINTEXT).

    ``SASLCredentials`` picks SASL_SSL only when it is given an SSL context; without one it
    sends the password in cleartext, so the context is always passed for ``SASL_SSL``.
    """
    context = ssl_context(k)
    if k.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=k.sasl_username, password=k.sasl_password,
                                     mechanism=k.sasl_mechanism or "PLAIN",
                                     ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None
