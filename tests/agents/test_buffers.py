"""ClassBuffers against a real Redis (the session ``stack``)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
import redis

from agents.buffers import BufferStoreError, ClassBuffers, SequenceTaken
from agents.sustain import Supply
from sluice.settings import Settings
from streams.connections import redis_client

pytestmark = pytest.mark.integration


@pytest.fixture
def make(client: redis.Redis) -> Iterator[Any]:
    """Buffers factory on a fresh namespace; every key is removed afterwards."""
    made: list[ClassBuffers] = []
    namespace = uuid4().hex

    def _make(buffer_cap: int = 100, reuse_cap: int = 3, partition: int = 0,
              **kwargs: Any) -> ClassBuffers:
        buf = ClassBuffers(client, namespace, partition, buffer_cap, reuse_cap, **kwargs)
        made.append(buf)
        return buf

    yield _make
    for buf in made:
        buf.clear()


def sample(i: int, label: str = "a") -> dict[str, Any]:
    """A CuratedSample-shaped dict (the fields the buffers keep, and a few they ignore)."""
    content = f"content {i} — ünïcode ✓"
    return {
        "id": f"id{i:05d}", "source": "test", "kind": "CODE", "language": "python",
        "label": label, "content": content, "timestamp": 0, "attributes": {},
        "digest": hashlib.sha256(content.encode()).hexdigest(), "quality_score": 1.0,
        "embedding": np.linspace(-1, 1, 8, dtype="<f2").tobytes() + bytes([0, 255, 13, 10]),
        "embedding_dim": 10, "model": "m", "nearest_similarity": None, "admitted_at": 0,
    }


def test_add_stores_what_a_batch_sample_needs_and_draw_returns_it(make: Any) -> None:
    buf = make()
    s = sample(1)
    assert buf.add(s) is True
    assert buf.sizes() == {"a": 1}
    [got] = buf.draw({"a": 1})
    for key in ("id", "label", "kind", "source", "content", "digest", "embedding",
                "embedding_dim"):
        assert got[key] == s[key]
    assert isinstance(got["embedding"], bytes)
    assert got["uses"] == 1 and got["replay"] is False


def test_add_is_idempotent_by_id(make: Any, client: redis.Redis) -> None:
    buf = make()
    assert buf.add(sample(1)) is True

    def snapshot() -> tuple[Any, ...]:
        return (client.hgetall(buf.sample_key("id00001")),
                client.lrange(buf.queue_key("a"), 0, -1), client.hlen(buf.prefix + ":seen"))

    before = snapshot()
    assert buf.add(dict(sample(1), content="something else")) is False
    assert snapshot() == before
    assert buf.add_many([sample(1), sample(2)]) == [False, True]
    assert buf.sizes() == {"a": 2}
    assert 0 < client.httl(buf.prefix + ":seen", "id00001")[0] <= 7 * 24 * 3600
    forever = make(seen_ttl_s=None, partition=2)
    forever.add(sample(1))
    assert client.httl(forever.prefix + ":seen", "id00001") == [-1]
    # Still refused after the sample has been used up and left the buffer.
    used = make(reuse_cap=1, partition=1)
    used.add(sample(5))
    used.draw({"a": 1})
    assert used.sizes() == {"a": 0}
    assert used.add(sample(5)) is False and used.sizes() == {"a": 0}


def test_the_idempotency_memory_is_bounded_by_count_oldest_forgotten_first(
        make: Any, client: redis.Redis) -> None:
    # Found in the 60-minute soak: the seen hash grew by ~95 bytes per sample for seven
    # days (seen_ttl_s), the only layer not bounded by anything but time.
    buf = make(seen_cap=4, buffer_cap=100, retain_s=0)
    assert all(buf.add_many([sample(i) for i in range(10)]))
    seen = buf.prefix + ":seen"
    assert client.hlen(seen) == 4 and client.zcard(seen + ":order") == 4
    assert sorted(client.hkeys(seen)) == [f"id{i:05d}".encode() for i in range(6, 10)]
    # A remembered id is still a no-op; a forgotten one whose payload is still buffered too.
    assert buf.add(sample(9)) is False and buf.add(sample(0)) is False
    # Forgotten and gone (used up): buffered again, as the setting's description says.
    used = make(seen_cap=1, reuse_cap=1, retain_s=0, partition=1)
    used.add(sample(1))
    used.draw({"a": 1})
    used.add(sample(2))
    assert used.add(sample(1)) is True
    # No bound: every id stays (until seen_ttl_s), and no order is kept.
    free = make(seen_cap=None, partition=2)
    assert all(free.add_many([sample(i) for i in range(10)]))
    assert client.hlen(free.prefix + ":seen") == 10
    assert not client.exists(free.prefix + ":seen:order")


def test_class_buffer_is_bounded_and_counts_evictions(make: Any, client: redis.Redis) -> None:
    buf = make(buffer_cap=5, retain_s=0)
    results = buf.add_many([sample(i, "a") for i in range(12)] + [sample(100, "b")])
    assert all(results)
    assert buf.sizes() == {"a": 5, "b": 1}
    assert buf.evictions() == {"a": 7}
    assert buf.evictions(unused=True) == {"a": 7}  # none of them was ever in a batch
    # The oldest went; their payloads with them. A draw takes the newest first.
    assert [s["id"] for s in buf.draw({"a": 5})] == [f"id{i:05d}" for i in range(11, 6, -1)]
    assert not client.exists(buf.sample_key("id00000"))


def test_an_overflowing_class_evicts_what_training_has_seen_before_what_it_has_not(
        make: Any) -> None:
    """Compute-limited: the stream outruns training and the class overflows. The least
    useful samples go first: those a batch already used (least recently drawn first),
    then the oldest never used; so no never-used sample is evicted while a used one
    is kept."""
    buf = make(buffer_cap=4, reuse_cap=3, retain_s=0)
    buf.add_many([sample(i) for i in range(4)])
    assert [s["id"] for s in buf.draw({"a": 2})] == ["id00003", "id00002"]
    buf.add_many([sample(4), sample(5)])  # two over the cap: the two used ones go
    assert buf.evictions() == {"a": 2}
    assert buf.evictions(unused=True) == {}
    assert [s["id"] for s in buf.draw({"a": 4})] == ["id00005", "id00004", "id00001",
                                                      "id00000"]
    buf.add_many([sample(6)])  # all four used: the least recently drawn goes
    assert buf.evictions() == {"a": 3}
    assert [(s["id"], s["uses"]) for s in buf.draw({"a": 4})] == [
        ("id00006", 1), ("id00004", 2), ("id00001", 2), ("id00000", 2)]
    buf.add_many([sample(i) for i in range(7, 11)])  # four new: the four used ones go
    assert buf.evictions() == {"a": 7}
    assert buf.evictions(unused=True) == {}
    buf.add_many([sample(11)])  # only never-used ones left: the oldest of them goes
    assert buf.evictions(unused=True) == {"a": 1}
    assert [s["id"] for s in buf.draw({"a": 9})] == [f"id{i:05d}" for i in range(11, 7, -1)]


def test_evicted_payload_is_retained_only_after_a_use(make: Any, client: redis.Redis) -> None:
    buf = make(buffer_cap=1, retain_s=60)
    buf.add(sample(1))
    buf.draw({"a": 1})
    buf.add(sample(2))  # evicts id00001, which was in a batch: kept for replay
    assert 0 < client.ttl(buf.sample_key("id00001")) <= 60
    assert client.ttl(buf.sample_key("id00002")) == -1  # buffered: no expiry
    buf.add(sample(3))  # evicts id00002, never used: gone at once
    assert not client.exists(buf.sample_key("id00002"))
    assert buf.evictions() == {"a": 2}
    assert buf.evictions(unused=True) == {"a": 1}  # by reason: id00002 never reached a batch


def test_draw_is_in_order_and_reuse_is_capped(make: Any, client: redis.Redis) -> None:
    buf = make(reuse_cap=3, retain_s=0)
    buf.add_many([sample(i, "rare") for i in range(2)] + [sample(10 + i, "big")
                                                          for i in range(4)])
    first = buf.draw({"big": 2, "rare": 2})
    assert [s["id"] for s in first] == ["id00013", "id00012", "id00001", "id00000"]
    # Never-used samples first, newest first; then used ones, least recently drawn first
    # (round robin over the class).
    assert [s["id"] for s in buf.draw({"big": 3})] == ["id00011", "id00010", "id00013"]
    uses: dict[str, int] = {}
    drawn = 0
    while True:
        got = buf.draw({"rare": 5})
        assert len({s["id"] for s in got}) == len(got)  # never one sample twice in a draw
        if not got:
            break
        drawn += len(got)
        for s in got:
            uses[s["id"]] = s["uses"]
    assert drawn == 2 * 3 - 2  # each rare sample entered batches exactly reuse_cap times
    assert uses == {"id00000": 3, "id00001": 3}
    assert buf.sizes()["rare"] == 0
    assert not client.exists(buf.sample_key("id00000"))  # deleted at the cap


def test_draw_asks_more_than_there_is_and_skips_excluded(make: Any) -> None:
    buf = make()
    buf.add_many([sample(i) for i in range(3)])
    assert buf.draw({"a": 0, "missing": 4}) == []
    got = buf.draw({"a": 3}, exclude=["id00001"])
    assert [s["id"] for s in got] == ["id00002", "id00000"]
    # The excluded one stayed among the never-used, without a use; it comes first now.
    assert [(s["id"], s["uses"]) for s in buf.draw({"a": 3})] == [
        ("id00001", 1), ("id00002", 2), ("id00000", 2)]


def test_concurrent_draws_are_atomic(make: Any, stack: Settings) -> None:
    """Two workers drawing at once never get the same sample use twice."""
    n, reuse = 200, 2
    buf = make(buffer_cap=1000, reuse_cap=reuse, retain_s=0)
    buf.add_many([sample(i) for i in range(n)])
    results: list[list[tuple[str, int]]] = [[], []]

    def worker(k: int) -> None:
        conn = redis_client(stack.redis)
        other = ClassBuffers(conn, buf.namespace, 0, 1000, reuse, retain_s=0)
        while got := other.draw({"a": 7}):
            results[k] += [(s["id"], s["uses"]) for s in got]
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    uses = results[0] + results[1]
    assert len(uses) == n * reuse
    assert len(set(uses)) == n * reuse  # every (id, use) handed out exactly once
    assert results[0] and results[1]


def test_replay_queue(make: Any, client: redis.Redis) -> None:
    buf = make(reuse_cap=1, retain_s=60, replay_cap=3)
    buf.add_many([sample(i) for i in range(6)])
    assert [s["id"] for s in buf.draw({"a": 1})] == ["id00005"]  # newest first
    # id00005 is used up: its payload is retained, so it can still be replayed.
    assert buf.push_replay(["id00005", "id00002", "nope", "id00002"]) == 2
    assert buf.push_replay(["id00003", "id00004"]) == 2  # over replay_cap: oldest dropped
    assert buf.replay_size() == 3
    client.delete(buf.sample_key("id00003"))  # payload gone meanwhile: skipped
    got = buf.pop_replay(5)
    assert [s["id"] for s in got] == ["id00002", "id00004"]
    assert all(s["replay"] for s in got)
    assert buf.replay_size() == 0 and buf.pop_replay(2) == []
    # A replay is not a use: the sample is still in its class with its count.
    assert [(s["id"], s["uses"]) for s in buf.draw({"a": 5})] == [
        ("id00004", 1), ("id00002", 1), ("id00001", 1), ("id00000", 1)]


def test_partitions_and_namespaces_are_separate(make: Any, client: redis.Redis) -> None:
    p0, p1 = make(partition=0), make(partition=1)
    p0.add(sample(1))
    assert p1.add(sample(1)) is True  # another partition's idempotency set
    other = ClassBuffers(client, uuid4().hex, 0, 10, 1)
    assert other.sizes() == {}


def test_bad_input_and_bad_client(make: Any, stack: Settings) -> None:
    buf = make()
    with pytest.raises(BufferStoreError):
        buf.add({"id": "x", "label": "a"})
    text = redis_client(stack.redis, decode_responses=True)
    with pytest.raises(BufferStoreError):
        ClassBuffers(text, "ns", 0, 10, 1)
    text.close()
    with pytest.raises(BufferStoreError):
        make(buffer_cap=0)


def test_admit_remembers_the_offset_that_first_buffered_an_id(make: Any) -> None:
    buf = make()
    assert buf.admit(sample(1), 17) == (True, 17, 0)
    assert buf.admit(sample(1), 17) == (False, 17, 0)  # the same message again
    assert buf.admit(sample(1), 99) == (False, 17, 0)  # the same id in another message
    assert buf.admit(sample(2)) == (True, None, 0)  # offset unknown
    assert buf.admit(sample(2), 5) == (False, None, 0)


def test_compose_draws_and_records_in_one_step_until_confirmed(make: Any,
                                                                client: redis.Redis) -> None:
    buf = make(reuse_cap=1, retain_s=0)
    buf.add_many([sample(i, "a") for i in range(4)] + [sample(10 + i, "b") for i in range(4)])
    buf.draw({"b": 1})  # id00013 used up, and its payload is gone (retain 0)
    buf.push_replay(["id00012"])
    meta = {"state": {"sequence": 1}, "shares": {"a": 0.5, "b": 0.5}}
    rows = buf.compose(0, {"a": 2, "b": 1}, 1, meta)
    # Never-used samples newest first; the replay is not drawn again.
    assert [(r["id"], r["replay"]) for r in rows] == [
        ("id00003", False), ("id00002", False), ("id00011", False), ("id00012", True)]
    assert buf.replay_size() == 0
    [recorded] = buf.unsent()
    assert (recorded.sequence, recorded.meta, recorded.rows) == (0, meta, rows)
    assert buf.admit(sample(20, "a"), 3).unsent == 1
    # The drawn uses are spent whether or not the batch was sent yet.
    assert buf.sizes() == {"a": 3, "b": 2}  # a: 0, 1, 20; b: 10, 12 (a replay: no use)
    assert not client.exists(buf.sample_key("id00003"))  # used up, and still recorded
    with pytest.raises(SequenceTaken) as taken:
        buf.compose(0, {"a": 1}, 0, meta)
    assert taken.value.next == 1
    assert buf.compose(1, {"missing": 3}, 0, meta) == []  # nothing drawn: nothing recorded
    buf.confirm(0)
    assert buf.unsent() == [] and buf.admit(sample(21, "a"), 4).unsent == 0
    assert [k for k in client.scan_iter(match=buf.prefix + ":outbox:0*")] == []


def test_labels_are_admitted_up_to_the_limit_for_the_whole_namespace(make: Any) -> None:
    p0, p1 = make(partition=0), make(partition=1)
    assert p0.admit_label("python", 2) and p1.admit_label("go", 2)
    assert not p0.admit_label("rust", 2) and not p1.admit_label("rust", 2)
    assert p1.admit_label("python", 2) and p0.admit_label("go", 2)  # known: still admitted


def recount(buf: ClassBuffers, client: redis.Redis) -> dict[str, Supply]:
    """What ``supply`` must say, counted the slow way from every queued sample."""
    out = {}
    for label in buf.classes():
        ids = (client.lrange(buf.queue_key(label), 0, -1)
               + client.lrange(buf.used_key(label), 0, -1))
        uses = [int(client.hget(buf.sample_key(i.decode()), "uses") or 0) for i in ids]
        out[label] = Supply(len(ids), sum(max(buf.reuse_cap - u, 1) for u in uses),
                            sum(u == 0 for u in uses))
    return out


def test_supply_counts_the_uses_left_through_adds_draws_composes_and_evictions(
        make: Any, client: redis.Redis) -> None:
    """The per-class counts the pacing reads in one round trip stay exact whatever the
    buffers do (random adds over three classes, evictions at a small cap, draws, composes
    with replays excluded), checked against a recount of every queued sample."""
    buf = make(buffer_cap=6, reuse_cap=3, retain_s=0)
    rng = np.random.default_rng(5)
    sequence = 0
    assert buf.supply() == {}
    for step in range(120):
        op = rng.integers(0, 4)
        label = ["a", "b", "c"][int(rng.integers(0, 3))]
        if op <= 1:
            buf.add_many([sample(int(rng.integers(0, 60)), label)
                          for _ in range(int(rng.integers(1, 4)))])
        elif op == 2:
            buf.draw({label: int(rng.integers(1, 5)), "a": 1})
        else:
            buf.push_replay([f"id{int(rng.integers(0, 60)):05d}"])
            if buf.compose(sequence, {label: int(rng.integers(1, 4))}, 1, {"n": step}):
                buf.confirm(sequence)
                sequence += 1
        assert buf.supply() == recount(buf, client), step
    assert any(s.fresh < s.waiting for s in buf.supply().values())


def test_supply_is_counted_again_when_its_counts_are_missing_or_wrong(
        make: Any, client: redis.Redis) -> None:
    """Buffers written before the counts existed get them from their queues, once; so
    does a class in which a draw met a queued id whose payload is gone (its uses are not
    known: the draw skips it, and the class is counted again)."""
    buf = make(reuse_cap=4, retain_s=0)
    buf.add_many([sample(i, "a") for i in range(5)] + [sample(10, "b")])
    buf.draw({"a": 2})  # a: 0, 1, 2 fresh; 4, 3 used once
    expected = {"a": Supply(5, 18, 3), "b": Supply(1, 4, 1)}
    assert buf.supply() == expected
    client.delete(buf.prefix + ":supply")
    assert buf.supply() == expected
    client.delete(buf.sample_key("id00000"))  # a fresh one vanishes from under the queue
    assert [s["id"] for s in buf.draw({"a": 3})] == ["id00002", "id00001", "id00004"]
    assert buf.supply()["a"] == Supply(4, 11, 0) == recount(buf, client)["a"]
    assert buf.supply() == recount(buf, client)


def test_supply_reads_in_one_script_on_a_single_redis_and_on_the_cluster(
        any_redis: Settings) -> None:
    """The supply script reads the class lists and samples of one partition by their
    shared hash tag, so it runs on a Redis Cluster as on a single Redis."""
    conn = redis_client(any_redis.redis)
    buf = ClassBuffers(conn, uuid4().hex, 3, buffer_cap=3, reuse_cap=2, retain_s=0)
    try:
        buf.add_many([sample(i, "a" if i % 3 else "b") for i in range(8)])  # a: 5 → 3
        buf.compose(0, {"a": 2, "b": 1}, 0, {"n": 0})
        assert buf.supply() == {"a": Supply(3, 4, 1), "b": Supply(3, 5, 2)}
        conn.delete(buf.prefix + ":supply")
        assert buf.supply() == {"a": Supply(3, 4, 1), "b": Supply(3, 5, 2)}
    finally:
        buf.clear()
        conn.close()
