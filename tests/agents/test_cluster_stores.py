"""The Redis stores on a single Redis and on a three-master Redis Cluster (conftest's
``any_redis``): the same calls give the same answers. Keys that one script or transaction
touches share a hash tag (one slot); keys used alone spread over the masters, and a
pipeline of them still answers in order."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from agents.buffers import ClassBuffers
from agents.config import FuzzySettings
from agents.exact import ExactClaims
from agents.feedback import LossStore
from agents.fuzzy_index import FuzzyIndex
from agents.keys import exact_key, loss_state_key
from agents.near_match import FuzzyDecision
from sluice.settings import Settings
from streams.connections import redis_client
from tests.agents.pipeline_util import unique_id
from tests.agents.test_buffers import sample
from tests.agents.test_feedback_store import record
from tests.agents.test_fuzzy import distinct_files, near_copy

pytestmark = pytest.mark.integration


@pytest.fixture
def client(any_redis: Settings) -> Iterator[redis.Redis]:
    conn = redis_client(any_redis.redis)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    """A fresh namespace; every key under it (tagged or not) is removed afterwards."""
    name = unique_id()
    yield name
    for pattern in (f"sluice:{name}:*", f"sluice:{{{name}:*"):
        for key in client.scan_iter(match=pattern, count=500):
            client.unlink(key)


def masters_of(client: redis.Redis, keys: list[str]) -> set[str]:
    """The masters that hold ``keys`` (one name for a single Redis)."""
    if not isinstance(client, RedisCluster):
        return {"single"}
    return {client.get_node_from_key(key).name for key in keys}


def test_a_cluster_url_gives_a_cluster_client_of_every_master(redis_cluster: Settings) -> None:
    conn = redis_client(redis_cluster.redis)
    try:
        assert isinstance(conn, RedisCluster)
        assert len(conn.get_primaries()) == redis_cluster.stack.redis_cluster == 3
        conn.set("sluice:test:cluster-probe", b"\x00\xff")
        assert conn.get("sluice:test:cluster-probe") == b"\x00\xff"  # bytes in, bytes out
        conn.delete("sluice:test:cluster-probe")
    finally:
        conn.close()


def test_exact_claims_spread_over_the_masters_and_keep_first_wins(
        client: redis.Redis, namespace: str, any_redis: Settings) -> None:
    claims = ExactClaims(client, namespace)
    digests = [f"{i:064x}" for i in range(60)]
    firsts = [f"a{i}" for i in range(60)]
    assert claims.claim(list(zip(digests, firsts, strict=True))) == firsts
    assert claims.claim([(d, f"b{i}") for i, d in enumerate(digests)]) == firsts
    assert claims.claim(list(zip(digests, firsts, strict=True))) == firsts  # a replay
    assert claims.first_digests([("x", digests[0]), ("x", digests[1])]) == [digests[0]] * 2
    claims.release([(digests[0], "a0"), (digests[1], "b1")])  # b1 never held digest 1
    assert claims.claim([(digests[0], "c0"), (digests[1], "c1")]) == ["c0", "a1"]
    spread = masters_of(client, [exact_key(namespace, d) for d in digests])
    assert len(spread) == (3 if any_redis.redis.cluster else 1)


def test_fuzzy_index_catches_copies_keeps_replays_and_settles_races(
        client: redis.Redis, namespace: str, any_redis: Settings) -> None:
    settings = FuzzySettings()
    index = FuzzyIndex(client, namespace, settings)
    files = distinct_files(6)
    assert [d.outcome for d in index.check_and_insert(files[:3])] == ["admitted"] * 3
    copies = [(f"copy-{n}", near_copy(t)) for n, t in files[:3]]
    assert [d.duplicate_of for d in index.check_and_insert(copies)] == [n for n, _ in files[:3]]
    again = index.check_and_insert([*files[:3], copies[0]])
    assert [d.outcome for d in again] == ["replayed"] * 3 + ["duplicate"]
    # Two workers, each with its own connection, race an original against its copy.
    workers = [FuzzyIndex(redis_client(any_redis.redis), namespace, settings) for _ in (0, 1)]
    lanes = [files[3:], [(f"copy-{n}", near_copy(t)) for n, t in files[3:]]]
    results: list[list[FuzzyDecision]] = [[], []]
    start = threading.Barrier(2)

    def run(w: int) -> None:
        start.wait()
        for item in lanes[w]:
            results[w] += workers[w].check_and_insert([item])

    threads = [threading.Thread(target=run, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a.keep != b.keep for a, b in zip(*results, strict=True)] == [True] * 3
    assert len(index) == 6


def test_class_buffers_compose_confirm_replay_and_clear(client: redis.Redis,
                                                        namespace: str) -> None:
    buf = ClassBuffers(client, namespace, 3, buffer_cap=10, reuse_cap=1, retain_s=60)
    assert buf.add_many([sample(i, label="a" if i % 2 else "b") for i in range(8)]) == [True] * 8
    assert buf.add(sample(0, label="b")) is False  # idempotent by id
    assert buf.sizes() == {"a": 4, "b": 4}
    rows = buf.compose(0, {"a": 2, "b": 1}, 0, {"batch": "x"})
    # Never-used samples newest first: a 7, 5; b 6.
    assert sorted(r["id"] for r in rows) == ["id00005", "id00006", "id00007"]
    assert [r.sequence for r in buf.unsent()] == [0]
    buf.confirm(0)  # a MULTI/EXEC of two keys in one slot
    assert buf.unsent() == []
    assert buf.push_replay(["id00000", "id00001", "missing"]) == 2
    assert [r["id"] for r in buf.pop_replay(5)] == ["id00000", "id00001"]
    assert buf.clear() > 0
    assert buf.sizes() == {}


def test_loss_store_folds_a_record_once_across_racing_workers(
        client: redis.Redis, namespace: str, any_redis: Settings) -> None:
    rec = record("2-5-abcdef012345", 3, [0.5, 1.5, 0.7, 2.0, 0.1])
    results: list[Any] = []

    def fold() -> None:
        conn = redis_client(any_redis.redis)
        try:
            results.append(LossStore(conn, namespace).fold(rec, 0.9, 2.0))
        finally:
            conn.close()

    threads = [threading.Thread(target=fold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and sum(r is not None for r in results) == 1
    state = json.loads(client.get(loss_state_key(namespace)))  # type: ignore[arg-type]
    assert state and LossStore(client, namespace).fold(rec, 0.9, 2.0) is None
    assert set(LossStore(client, namespace).difficulty()) == {"python", "docs"}
