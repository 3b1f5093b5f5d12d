"""The shell's own settings section: the embedded local stack started by ``sluice up``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from streams.config import CLUSTER_SCHEME, Section

#: A secured client listener the embedded broker can open beside its loopback PLAINTEXT one.
SecuredListener = Literal["SSL", "SASL_PLAINTEXT", "SASL_SSL"]

# What Kafka's JAAS parser and a .properties file take without quoting rules of their own.
_SASL_NAME = re.compile(r"[A-Za-z0-9_-]+")
_UNQUOTABLE = re.compile(r'["\\\r\n;]')

#: A cluster node's bus (node-to-node) port is its client port plus this (Redis's convention).
CLUSTER_BUS_OFFSET = 10000


class StackSettings(Section):
    """The embedded local stack started by ``sluice up``.

    Kafka always listens in PLAINTEXT on ``127.0.0.1:kafka_port`` (its own health check,
    topic creation and the controller use it). ``kafka_listeners`` opens secured client
    listeners beside it, also on loopback, to try TLS and SASL/PLAIN exactly as a secured
    cluster would serve them: SSL listeners use ``kafka_keystore`` (PKCS12), else a
    self-signed certificate for 127.0.0.1 and localhost that the stack makes once with the
    JDK's ``keytool`` (its PEM, for ``kafka.ssl_cafile``, is ``<state_dir>/kafka/tls/ca.pem``);
    SASL listeners accept the users of ``kafka_sasl_users``. Redis requires
    ``redis.password`` (requirepass) when that is set. With ``redis_cluster = N`` Redis is a
    Redis Cluster of N masters on ``redis_cluster_port`` and the N ports above it instead.
    """

    kafka_port: int = Field(9092, ge=1, le=65535)
    controller_port: int = Field(9093, ge=1, le=65535)
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_cluster: int = Field(0, ge=0, le=16, description="0: one Redis server on "
                               "redis_port; N: a Redis Cluster of N masters instead "
                               "(`sluice up --redis-cluster N`)")
    redis_cluster_port: int = Field(7000, ge=1, le=65535, description="client port of the "
                                    "cluster's first master; master i listens on this + i, "
                                    "its cluster bus on that + 10000")
    kafka_listeners: dict[SecuredListener, int] = Field(
        default_factory=dict, description="secured client listeners on loopback, by protocol: "
        '{"SASL_SSL": 9094}; none by default')
    kafka_keystore: Path | None = Field(None, description="PKCS12 keystore (key and "
                                        "certificate) of the SSL listeners; unset: self-signed")
    kafka_keystore_password: str | None = Field(None, repr=False)
    kafka_sasl_users: dict[str, str] = Field(default_factory=dict, repr=False,
                                             description="SASL/PLAIN users: name -> password")
    kafka_heap: str = Field("768m", description="the embedded broker's Java heap, fixed "
                            "(-Xms = -Xmx) and touched at start (-XX:+AlwaysPreTouch), so its "
                            "resident memory is the whole heap from the first minute, not a "
                            "slow climb to the cap that looks like a leak")
    java: str = "java"
    keytool: str = "keytool"
    maven: str = "mvn"
    start_timeout_s: float = Field(90.0, gt=0)
    stop_timeout_s: float = Field(20.0, gt=0)

    def redis_url(self) -> str:
        """The address of the embedded Redis: the single server, or the cluster's masters."""
        if self.redis_cluster:
            return CLUSTER_SCHEME + ",".join(f"127.0.0.1:{p}" for p in self.redis_cluster_ports())
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def redis_cluster_ports(self) -> list[int]:
        """The client ports of the cluster's masters (none without ``redis_cluster``)."""
        return [self.redis_cluster_port + i for i in range(self.redis_cluster)]

    @model_validator(mode="after")
    def _consistent_listeners(self) -> StackSettings:
        ports = [("kafka_port", self.kafka_port), ("controller_port", self.controller_port),
                 ("redis_port", self.redis_port)]
        ports += [(f"kafka_listeners.{name}", port)
                  for name, port in self.kafka_listeners.items()]
        for i, port in enumerate(self.redis_cluster_ports()):
            ports += [(f"redis_cluster_port (master {i})", port),
                      (f"redis_cluster_port (master {i}'s cluster bus)", port + CLUSTER_BUS_OFFSET)]
        seen: dict[int, str] = {}
        for name, port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"stack.{name} {port} is not a TCP port")
            if port in seen:
                raise ValueError(f"stack.{name} and stack.{seen[port]} are both port {port}")
            seen[port] = name
        sasl = [name for name in self.kafka_listeners if name.startswith("SASL")]
        if sasl and not self.kafka_sasl_users:
            raise ValueError(f"stack.kafka_listeners {', '.join(sasl)} needs "
                             "stack.kafka_sasl_users (name -> password)")
        for user, password in self.kafka_sasl_users.items():
            if not _SASL_NAME.fullmatch(user):
                raise ValueError(f"stack.kafka_sasl_users: user name {user!r} must be letters, "
                                 "digits, '_' or '-'")
            if not password or _UNQUOTABLE.search(password):
                raise ValueError(f"stack.kafka_sasl_users: the password of {user} must be "
                                 "non-empty, without quotes, backslashes, ';' or line breaks")
        if self.kafka_keystore is not None and not self.kafka_keystore_password:
            raise ValueError("stack.kafka_keystore needs stack.kafka_keystore_password")
        if self.kafka_keystore_password and _UNQUOTABLE.search(self.kafka_keystore_password):
            raise ValueError("stack.kafka_keystore_password must be without quotes, "
                             "backslashes, ';' or line breaks")
        return self
