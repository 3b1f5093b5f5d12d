"""Client factories: every Kafka and Redis client in sluice is built here from settings.

TLS is configured once, as an ``ssl.SSLContext`` (``ssl_context``), and handed to both Kafka
libraries: kafka-python (producer, tail, admin, the trainer) and aiokafka under Faust (the
worker, through ``streams.app``), so the two can never disagree on what is verified.
"""

from __future__ import annotations

import ssl
from typing import Any, cast

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from schemas.errors import SluiceError
from streams.config import KafkaSettings, RedisSettings, cluster_nodes


def ssl_context(k: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of ``SSL`` and ``SASL_SSL`` (None for the other protocols).

    Verifies the broker's certificate chain and host name (against ``ssl_cafile``, else
    the system's CAs), TLS 1.2 at least, and presents the client certificate when set.
    """
    if not k.security_protocol.endswith("SSL"):
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=k.ssl_cafile)
    except (OSError, ssl.SSLError) as exc:
        raise SluiceError(f"kafka.ssl_cafile {k.ssl_cafile}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if k.ssl_certfile:
        try:
            context.load_cert_chain(k.ssl_certfile, k.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise SluiceError(f"kafka.ssl_certfile {k.ssl_certfile} / kafka.ssl_keyfile "
                              f"{k.ssl_keyfile}: {exc}") from exc
    return context


def kafka_client_options(k: KafkaSettings) -> dict[str, Any]:
    """kafka-python keyword arguments shared by producers, consumers and admin clients."""
    options: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers.split(","),
        "security_protocol": k.security_protocol,
        "client_id": k.client_id,
        "bootstrap_timeout_ms": k.connect_timeout_ms,
    }
    if k.security_protocol.startswith("SASL"):
        # kafka-python takes the SCRAM credentials under the same two names as PLAIN's.
        options.update(
            sasl_mechanism=k.sasl_mechanism or "PLAIN",
            sasl_plain_username=k.sasl_username,
            sasl_plain_password=k.sasl_password,
        )
    context = ssl_context(k)
    if context is not None:
        options["ssl_context"] = context
    return options


def redis_client(settings: RedisSettings, **kwargs: Any) -> redis.Redis:
    """A Redis client for the configured (or embedded) server; bytes in, bytes out.

    For a ``redis+cluster://`` URL it is a ``redis.cluster.RedisCluster`` (it learns the
    slots from the nodes named, so this call connects, and raises ``SluiceError`` when no
    node answers). RedisCluster is no subclass of ``redis.Redis`` but has the same command
    methods, pipelines, scripts and transactions, which is all the stores use; every key
    that one script or transaction touches shares a hash tag (``agents.keys``).
    """
    if settings.cluster:
        return _cluster_client(settings, **kwargs)
    return redis.Redis.from_url(
        settings.url,
        password=settings.password,
        health_check_interval=10,
        socket_keepalive=True,
        **kwargs,
    )


def _cluster_client(settings: RedisSettings, **kwargs: Any) -> redis.Redis:
    nodes = [ClusterNode(host, port) for host, port in cluster_nodes(settings.url)]
    try:
        client = RedisCluster(startup_nodes=nodes, password=settings.password,
                              socket_keepalive=True, **kwargs)
    except (RedisClusterException, redis.RedisError) as exc:
        raise SluiceError(f"redis.url {settings.url}: no node of the Redis Cluster answers "
                          f"as a cluster: {exc}") from exc
    # The same command methods as redis.Redis (see the docstring above).
    return cast(redis.Redis, client)
