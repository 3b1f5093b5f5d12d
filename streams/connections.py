"""Client factories: every Kafka and Redis client in sluice is built here from settings."""

from __future__ import annotations

from typing import Any

import redis

from streams.config import KafkaSettings, RedisSettings


def kafka_client_options(k: KafkaSettings) -> dict[str, Any]:
    """kafka-python keyword arguments shared by producers, consumers and admin clients."""
    options: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers.split(","),
        "security_protocol": k.security_protocol,
        "client_id": k.client_id,
        "bootstrap_timeout_ms": k.connect_timeout_ms,
    }
    if k.sasl_mechanism:
        options.update(
            sasl_mechanism=k.sasl_mechanism,
            sasl_plain_username=k.sasl_username,
            sasl_plain_password=k.sasl_password,
        )
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(k, name):
            options[name] = getattr(k, name)
    return options


def redis_client(settings: RedisSettings, **kwargs: Any) -> redis.Redis:
    """A Redis client for the configured (or embedded) server; bytes in, bytes out."""
    return redis.Redis.from_url(
        settings.url,
        password=settings.password,
        health_check_interval=10,
        socket_keepalive=True,
        **kwargs,
    )
