"""Settings of the Kafka and Redis plumbing: connections, topics, producing, monitoring.

Each part of sluice owns the settings models of its own section; ``sluice.settings``
composes them and reads the TOML file and the ``SLUICE_*`` variables once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    entry point fills in its address).

    ``SSL`` and ``SASL_SSL`` verify the broker's certificate and host name against
    ``ssl_cafile`` (else the system's CAs) and present ``ssl_certfile``/``ssl_keyfile``
    when set; ``SASL_*`` log in as ``sasl_username``. A setting that the chosen protocol
    would silently ignore (a password with ``SSL``, a CA file with ``SASL_PLAINTEXT``) is an
    error, so a typo can never mean an unauthenticated or cleartext connection.
    """

    bootstrap_servers: str = Field("", description="host:port list; empty: the embedded broker")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="with SASL_*: the mechanism; unset means PLAIN")
    sasl_username: str | None = None
    sasl_password: str | None = Field(None, repr=False)
    ssl_cafile: str | None = Field(None, description="PEM file of the CAs that sign the "
                                   "brokers' certificates; unset: the system's CAs")
    ssl_certfile: str | None = Field(None, description="PEM client certificate (mutual TLS)")
    ssl_keyfile: str | None = Field(None, description="PEM key of ssl_certfile, if separate")
    client_id: str = "sluice"
    connect_timeout_ms: int = Field(10_000, ge=100, description="how long a client waits "
                                    "for the first broker before giving up")
    session_timeout_s: float = Field(30.0, gt=6, description="consumer group session timeout: "
                                     "how long a crashed worker's partitions wait")

    @model_validator(mode="after")
    def _consistent_security(self) -> KafkaSettings:
        protocol = self.security_protocol
        sasl = {name: getattr(self, name) for name in
                ("sasl_mechanism", "sasl_username", "sasl_password")}
        tls = {name: getattr(self, name) for name in
               ("ssl_cafile", "ssl_certfile", "ssl_keyfile")}
        if protocol.startswith("SASL"):
            missing = [name for name in ("sasl_username", "sasl_password") if not sasl[name]]
            if missing:
                raise ValueError(f"security_protocol {protocol} needs "
                                 f"{' and '.join('kafka.' + m for m in missing)}")
        else:
            unused = [name for name, value in sasl.items() if value]
            if unused:
                raise ValueError(f"{', '.join('kafka.' + u for u in unused)} would be ignored "
                                 f"with security_protocol {protocol}: use SASL_SSL (or "
                                 "SASL_PLAINTEXT on a trusted network)")
        if protocol.endswith("SSL"):
            # The files are read when a client is built (``streams.connections``), not here:
            # `sluice up` makes the embedded broker's certificate after reading the settings.
            if self.ssl_keyfile and not self.ssl_certfile:
                raise ValueError("kafka.ssl_keyfile needs kafka.ssl_certfile")
        else:
            unused = [name for name, value in tls.items() if value]
            if unused:
                raise ValueError(f"{', '.join('kafka.' + u for u in unused)} would be ignored "
                                 f"with security_protocol {protocol}: use SSL or SASL_SSL")
        return self


#: The scheme of a Redis Cluster address: ``redis+cluster://host:port[,host:port…]``.
CLUSTER_SCHEME = "redis+cluster://"


class RedisSettings(Section):
    """How clients reach Redis. Empty ``url`` means the embedded server (or the embedded
    cluster, with ``stack.redis_cluster``).

    ``redis+cluster://host:port[,host:port…]`` names a Redis Cluster by one or more of its
    masters (the client discovers the rest); every store then works through a cluster client.
    """

    url: str = Field("", description="redis://host:port/db, or redis+cluster://host:port"
                     "[,host:port…] for a Redis Cluster; empty: the embedded Redis")
    password: str | None = Field(None, repr=False, description="Redis AUTH password; the "
                                 "embedded Redis requires it (requirepass) when it is set")
    namespace: str = Field("default", description="prefix of every sluice key in Redis: "
                           "indexes, claims, buffers (one namespace, one curated stream)")

    @model_validator(mode="after")
    def _valid_cluster_url(self) -> RedisSettings:
        if self.url.startswith(CLUSTER_SCHEME):
            cluster_nodes(self.url)  # raises ValueError naming what is wrong
        return self

    @property
    def cluster(self) -> bool:
        """True when ``url`` names a Redis Cluster."""
        return self.url.startswith(CLUSTER_SCHEME)


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The (host, port) startup nodes of a ``redis+cluster://`` URL.

    No password, database or options in it: a cluster has only database 0, and the
    password is ``redis.password`` (never in an address that logs and ``ps`` may show).
    """
    if not url.startswith(CLUSTER_SCHEME):
        raise ValueError(f"redis.url {url!r} is not a {CLUSTER_SCHEME}host:port[,host:port] URL")
    rest = url[len(CLUSTER_SCHEME):].rstrip("/")
    if "@" in rest:
        raise ValueError("redis.url: give a cluster's password as redis.password, not in the URL")
    if any(mark in rest for mark in "/?#"):
        raise ValueError(f"redis.url {url!r}: a cluster URL is host:port[,host:port] only "
                         "(a cluster has one database, 0; no options)")
    nodes = []
    for part in rest.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")  # an IPv6 address in brackets
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"redis.url {url!r}: {part.strip()!r} is not host:port")
        nodes.append((host, int(port)))
    return nodes


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
    max_sources: int = Field(64, ge=1, le=4096, description="distinct event sources each "
                             "stage counts by name (in, kept, rejected by class, class mix); "
                             "later ones are counted as overflow_source")
    overflow_source: str = Field("other", min_length=1, max_length=64,
                                 description="the name sources beyond max_sources share")
