"""Settings of the Kafka and Redis plumbing: connections, topics, producing, monitoring.

Each part of sluice owns the settings models of its own section; ``sluice.settings``
composes them and reads the TOML file and the ``SLUICE_*`` variables once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors; values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: Every topic sluice reads or writes, by role, with the record type it carries
#: (DESIGN.md's table). Everything else about topics is derived from this one list.
TOPIC_RECORDS: dict[str, str] = {
    "raw": "RawEvent",
    "candidates": "Candidate",
    "samples": "CuratedSample",
    "batches": "CuratedBatch",
    "feedback": "Feedback",
    "rejected": "Rejection",
    "metrics": "MetricSnapshot",
}


class KafkaSettings(Section):
    """How clients reach Kafka. Empty ``bootstrap_servers`` means the embedded stack (the
    entry point fills in its address)."""

    bootstrap_servers: str = Field("", description="host:port list; empty: the embedded broker")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "sluice"
    connect_timeout_ms: int = Field(10_000, ge=100, description="how long a client waits "
                                    "for the first broker before giving up")
    session_timeout_s: float = Field(30.0, gt=6, description="consumer group session timeout: "
                                     "how long a crashed worker's partitions wait")


class RedisSettings(Section):
    """How clients reach Redis. Empty ``url`` means the embedded server."""

    url: str = Field("", description="redis://host:port/db; empty: the embedded Redis")
    password: str | None = None
    namespace: str = Field("default", description="prefix of every sluice key in Redis: "
                           "indexes, claims, buffers (one namespace, one curated stream)")


class TopicSettings(Section):
    """Topic names (DESIGN.md's defaults, by role) and how they are created."""

    raw: str = "raw-events"
    candidates: str = "sluice.candidates"
    samples: str = "sluice.samples"
    batches: str = "curated-batches"
    feedback: str = "training-feedback"
    rejected: str = "sluice.rejected"
    metrics: str = "sluice.metrics"
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)
    retention_ms: int = Field(7 * 24 * 3600 * 1000, ge=-1)
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024)

    def all(self) -> dict[str, str]:
        """Every topic name, by role (the roles of ``TOPIC_RECORDS``)."""
        return {role: str(getattr(self, role)) for role in TOPIC_RECORDS}


class ProduceSettings(Section):
    """``sluice produce``: what is read from disk and how it is sent."""

    max_file_bytes: int = Field(1024 * 1024, ge=1)
    compression: Literal["gzip", "snappy", "lz4", "zstd", "none"] = "gzip"
    linger_ms: int = Field(20, ge=0)
    batch_bytes: int = Field(256 * 1024, ge=1024)


class MetricsSettings(Section):
    """Monitoring: the metrics topic, Prometheus, the dashboard."""

    interval_s: float = Field(5.0, gt=0)
    worker_web_port: int = Field(6066, ge=1, le=65535)
    trainer_port: int = Field(9464, ge=0, le=65535)
    dashboard_port: int = Field(8050, ge=1, le=65535)
