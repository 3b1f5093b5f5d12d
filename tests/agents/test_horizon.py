"""``dedup.horizon``: the semantic index forgets its oldest admissions (by count or by age),
counts them, and a copy of a forgotten item is admitted again; on a single Redis and on
the cluster (conftest's ``any_redis``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pydantic
import pytest

from agents.config import DedupSettings, HorizonSettings
from agents.index import VectorIndex
from sluice.settings import Settings
from streams.connections import redis_client
from tests.agents.pipeline_util import unique_id
from tests.agents.test_index_races import DIM, index_state, near, unit


@pytest.fixture
def namespace(any_redis: Settings) -> Iterator[str]:
    name = unique_id()
    yield name
    conn = redis_client(any_redis.redis)
    VectorIndex(conn, name, DedupSettings()).clear()
    conn.close()


def originals(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([unit(rng.standard_normal(DIM)) for _ in range(n)])


def test_horizon_settings_are_validated() -> None:
    assert DedupSettings().horizon == HorizonSettings(items=0, age_s=0.0)  # unbounded
    with pytest.raises(pydantic.ValidationError, match="items"):
        DedupSettings(horizon={"items": -1})
    with pytest.raises(pydantic.ValidationError, match="evict_per_call"):
        DedupSettings(horizon={"evict_per_call": 0})


@pytest.mark.integration
def test_a_count_horizon_keeps_the_newest_items_and_counts_what_ages_out(
        any_redis: Settings, namespace: str) -> None:
    settings = DedupSettings(horizon={"items": 2, "evict_per_call": 2})
    index = VectorIndex(redis_client(any_redis.redis), namespace, settings)
    rng = np.random.default_rng(1)
    vectors = originals(9)
    for i in range(3):
        assert index.admit([f"o{i}"], vectors[i:i + 1])[0].keep
    # The horizon applies before each call: the set may exceed it by one call's items.
    assert index_state(index) == (3, 3, 3, 0)
    [copy] = index.admit(["copy-o1"], near(vectors[1], rng, 0.1)[None])  # o0 ages out
    assert (copy.keep, copy.duplicate_of) == (False, "o1")
    assert index.counts["aged_out"] == 1 and index_state(index) == (2, 2, 2, 0)
    # o0 no longer blocks its copy, which is admitted.
    [copy] = index.admit(["copy-o0"], near(vectors[0], rng, 0.1)[None])
    assert copy.keep and copy.duplicate_of is None
    assert index.counts["aged_out"] == 1 and index_state(index) == (3, 3, 3, 0)
    # One call removes at most evict_per_call (2): four over the horizon take two calls.
    index.admit([f"o{i}" for i in range(3, 7)], vectors[3:7])  # o1 ages out first
    assert index.counts["aged_out"] == 2 and index.size() == 6
    index.admit(["o7"], vectors[7:8])
    assert index.counts["aged_out"] == 4 and index.size() == 5
    index.admit(["o8"], vectors[8:9])
    assert index.counts["aged_out"] == 6 and index_state(index) == (4, 4, 4, 0)


@pytest.mark.integration
def test_an_age_horizon_forgets_what_was_admitted_longer_ago(
        any_redis: Settings, namespace: str) -> None:
    settings = DedupSettings(horizon={"age_s": 1.0})
    index = VectorIndex(redis_client(any_redis.redis), namespace, settings)
    rng = np.random.default_rng(2)
    vectors = originals(2, seed=2)
    index.admit(["old"], vectors[:1])
    assert not index.admit(["copy-old"], near(vectors[0], rng, 0.1)[None])[0].keep
    time.sleep(1.2)
    index.admit(["new"], vectors[1:2])  # ``old`` ages out before this call decides
    assert index.counts["aged_out"] == 1 and index_state(index) == (1, 1, 1, 0)
    assert index.admit(["copy-old"], near(vectors[0], rng, 0.1)[None])[0].keep
    assert not index.admit(["copy-new"], near(vectors[1], rng, 0.1)[None])[0].keep
