"""The sharded semantic index (``agents.sharded_index``) on a single Redis and on the
three-master cluster (conftest's ``any_redis``).

Recall claims use real embeddings (lines of three kinds of text, stdlib files and their
planted edits, embedded by the product's model); the race tests use synthetic groups of
near-copies placed on a border between two centroids, as ``test_index_races`` does: what
they test is the protocol (who gives way), not HNSW recall.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from agents.centroid_store import CentroidStore
from agents.config import DedupSettings
from agents.filter_agents import admission_index
from agents.index import Admission, VectorIndex
from agents.keys import shard_prefix
from agents.pipeline import build_pipeline
from agents.sharded_index import ShardedIndex, build_vector_index
from agents.shards import Centroids, ShardsError, kmeans, route
from sluice.settings import Settings
from streams.connections import redis_client
from tests.agents.pipeline_util import unique_id
from tests.agents.test_index import Corpus
from tests.agents.test_shards import embedder, three_kinds

pytestmark = pytest.mark.integration

DIM = 384
SETTINGS = DedupSettings(shards=3, probe=2, settle_wait_s=5.0)


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def near(vector: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A near-copy: cosine ≈ 1 / sqrt(1 + noise²) (0.995 at 0.1)."""
    return unit(vector + noise * unit(rng.standard_normal(DIM)))


def masters_of(client: Any, keys: list[str]) -> set[str]:
    """The masters holding ``keys`` (one name for a single Redis)."""
    if not isinstance(client, RedisCluster):
        return {"single"}
    return {client.get_node_from_key(key).name for key in keys}


@pytest.fixture
def client(any_redis: Settings) -> Iterator[redis.Redis]:
    conn = redis_client(any_redis.redis)
    try:
        yield conn
    finally:
        conn.close()


def spread_namespace(client: Any, shards: int = 3) -> str:
    """A fresh namespace whose first version's shards sit on as many masters as can be
    (on the cluster: every shard on its own master)."""
    masters = len(masters_of(client, [f"{{probe-{n}}}" for n in range(64)]))
    while True:
        name = unique_id()
        keys = [f"{shard_prefix(name, 1, s)}:set" for s in range(shards)]
        if len(masters_of(client, keys)) == min(shards, masters):
            return name


@pytest.fixture
def namespace(client: Any) -> Iterator[str]:
    """A fresh namespace; every key under it (tagged or not) is removed afterwards."""
    name = spread_namespace(client)
    yield name
    for pattern in (f"sluice:{name}:*", f"sluice:{{{name}:*"):
        for key in client.scan_iter(match=pattern, count=500):
            client.unlink(key)


@pytest.fixture
def stack_namespace(stack: Settings) -> Iterator[str]:
    """A fresh namespace on the session stack's single Redis (the tests that need no
    cluster run once), removed afterwards."""
    conn = redis_client(stack.redis)
    name = unique_id()
    yield name
    for pattern in (f"sluice:{name}:*", f"sluice:{{{name}:*"):
        for key in conn.scan_iter(match=pattern, count=500):
            conn.unlink(key)
    conn.close()


def install(client: Any, namespace: str, matrix: np.ndarray) -> Centroids:
    """Store ``matrix`` as the namespace's centroids in use."""
    store = CentroidStore(client, namespace)
    centroids = store.save(matrix, samples=len(matrix), model="test", source="corpus")
    store.activate(centroids.version)
    return centroids


def worker(any_redis: Settings, namespace: str, settings: DedupSettings = SETTINGS
           ) -> ShardedIndex:
    """One worker's index: its own connection, like a separate process."""
    return build_vector_index(redis_client(any_redis.redis), namespace,
                              settings)  # type: ignore[return-value]


class Paused(ShardedIndex):
    """An index that lets another worker run right after its search (``after_search``)."""

    after_search: Callable[[], Any] = staticmethod(lambda: None)

    def _search(self, ids: list[str], rows: np.ndarray, probes: np.ndarray) -> Any:
        found = super()._search(ids, rows, probes)
        self.after_search()
        return found


def state(index: ShardedIndex) -> tuple[list[int], int, int, int]:
    """(set sizes, FP32 vectors, log entries, pending): they agree once all settled."""
    c: Any = index.client
    return (index.shard_sizes(), sum(int(c.hlen(s.vectors_key)) for s in index.shards),
            sum(int(c.zcard(s.log_key)) for s in index.shards),
            sum(int(c.scard(s.pending_key)) for s in index.shards))


def stream_reference(vectors: np.ndarray, centroids: np.ndarray, probe: int,
                     threshold: float) -> list[tuple[bool, int | None]]:
    """What the sharded index must decide, by brute force: in order, an item is a
    duplicate of the nearest earlier kept item whose home it probes, if within threshold."""
    probes = route(vectors, centroids, probe)
    kept: list[int] = []
    out: list[tuple[bool, int | None]] = []
    for i, vector in enumerate(vectors):
        visible = [j for j in kept if probes[j][0] in set(probes[i])]
        if visible:
            cos = vectors[visible] @ vector
            best = int(np.argmax(cos))
            if cos[best] >= threshold:
                out.append((False, visible[best]))
                continue
        kept.append(i)
        out.append((True, None))
    return out


def test_real_items_spread_over_shards_and_masters_and_decide_as_brute_force(
        any_redis: Settings, client: Any, namespace: str) -> None:
    _, vectors = three_kinds()
    centroids = install(client, namespace, kmeans(vectors, 3, seed=0))
    index = worker(any_redis, namespace)
    assert isinstance(index, ShardedIndex) and index.version == centroids.version
    order = np.random.default_rng(0).permutation(len(vectors))  # the kinds interleaved
    ids = [f"line/{i}" for i in order]
    got: list[Admission] = []
    for start in range(0, len(ids), 32):
        got += index.admit(ids[start:start + 32], vectors[order[start:start + 32]])
    expected = stream_reference(vectors[order], centroids.matrix, SETTINGS.probes,
                                SETTINGS.threshold)
    assert [(a.keep, a.duplicate_of) for a in got] == [
        (keep, None if dup is None else ids[dup]) for keep, dup in expected]
    kept = sum(a.keep for a in got)
    sizes, vecs, logged, pending = state(index)
    assert sum(sizes) == vecs == logged == kept and pending == 0
    assert min(sizes) >= 10, sizes  # every shard holds a kind's worth
    keys = [shard.key for shard in index.shards]
    assert masters_of(client, keys) == masters_of(client, [f"{{probe-{n}}}" for n in
                                                           range(64)])
    # A replay, by another worker: the kept are "already", the duplicates unchanged.
    again = worker(any_redis, namespace)
    replay: list[Admission] = []
    for start in range(0, len(ids), 32):
        replay += again.admit(ids[start:start + 32], vectors[order[start:start + 32]])
    for first, second in zip(got, replay, strict=True):
        assert (second.already, second.duplicate_of) == (first.keep, first.duplicate_of)
    assert state(again)[0] == sizes
    print(f"\n[shards] {len(ids)} real lines, {kept} kept, per shard {sizes}, on "
          f"{len(masters_of(client, keys))} master(s)")


@pytest.mark.parametrize("probe", [2, 1])
def test_a_near_copy_homed_in_another_shard_is_caught_only_within_the_probe(
        any_redis: Settings, client: Any, namespace: str, probe: int) -> None:
    """A real file and its commented edit (cosine ≥ 0.975), with centroids that put the
    border between them: the copy lives in another shard than its original. Probing 2
    shards catches it; probing 1 misses it (the border miss that sharding trades)."""
    corpus = Corpus(embedder())
    original, copy, other = corpus.vectors[0, 0], corpus.vectors[0, 2], corpus.vectors[3, 0]
    middle, apart = unit(original + copy), original - copy
    matrix = np.stack([unit(middle + apart), unit(middle - apart), unit(other)])
    install(client, namespace, matrix)
    settings = SETTINGS.model_copy(update={"probe": probe})
    homes = route(np.stack([original, copy]), matrix, 2)
    assert homes.tolist() == [[0, 1], [1, 0]]
    index = worker(any_redis, namespace, settings)
    [first] = index.admit(["original"], original[None])
    [second] = index.admit(["copy"], copy[None])
    assert first.keep
    cos = float(original @ copy)
    if probe == 2:
        assert (second.keep, second.duplicate_of) == (False, "original")
        assert second.similarity == pytest.approx(cos, abs=1e-5)
        assert state(index)[0] == [1, 0, 0]
    else:
        assert second.keep and second.similarity is None  # nothing in its one shard
        assert state(index)[0] == [1, 1, 0]


def border_centroids(rng: np.random.Generator) -> np.ndarray:
    """Three random (nearly orthogonal) unit centroids in DIM dimensions."""
    return np.stack([unit(rng.standard_normal(DIM)) for _ in range(3)])


def on_border(matrix: np.ndarray, a: int, b: int, lean: float,
              spread: np.ndarray | None = None) -> np.ndarray:
    """A vector between centroids a and b, leaning towards a (lean > 0) or b, and
    (``spread``, orthogonal to both) away from every other group on the same border."""
    vector = matrix[a] + matrix[b] + lean * (matrix[a] - matrix[b])
    if spread is not None:
        vector = 0.8 * unit(vector) + 0.6 * spread
    return unit(vector)


@pytest.mark.parametrize(("orig_home", "copy_home"), [(0, 1), (1, 0)],
                         ids=["settled-in-the-original's-home", "settled-in-the-copy's-home"])
def test_a_copy_written_in_another_shard_gives_way_to_an_original_admitted_meanwhile(
        any_redis: Settings, client: Any, namespace: str, orig_home: int,
        copy_home: int) -> None:
    """``slow`` searches (nothing there), ``other`` admits the original in its home
    meanwhile, then ``slow`` writes the copy in the copy's home: the pair's shard (the
    lower home) holds both registrations, the original's first, so the copy gives way."""
    rng = np.random.default_rng(7)
    matrix = border_centroids(rng)
    install(client, namespace, matrix)
    original = on_border(matrix, orig_home, copy_home, 0.05)
    copy = on_border(matrix, copy_home, orig_home, 0.05)
    assert float(original @ copy) >= SETTINGS.threshold
    assert route(np.stack([original, copy]), matrix, 2).tolist() == [
        [orig_home, copy_home], [copy_home, orig_home]]
    other = worker(any_redis, namespace)
    slow = Paused(redis_client(any_redis.redis), namespace, SETTINGS,
                  CentroidStore(client, namespace).current())  # type: ignore[arg-type]
    slow.after_search = lambda: other.admit(["orig"], original[None])
    [got] = slow.admit(["copy"], copy[None])
    assert (got.keep, got.duplicate_of) == (False, "orig")
    assert slow.counts["race_lost"] == 1
    sizes = [0, 0, 0]
    sizes[orig_home] = 1
    assert state(slow) == (sizes, 1, 1, 0)
    # The copy's shadow registration went with it; the original's stays.
    shadows = [int(client.zcard(key)) for key in slow.shadow_keys]
    assert shadows[orig_home] == 0 and shadows[copy_home] == 1
    # A replay, by either worker: the same decisions.
    slow.after_search = lambda: None
    replays = slow.admit(["copy"], copy[None]) + other.admit(["orig", "copy"],
                                                             np.stack([original, copy]))
    assert [(a.keep, a.duplicate_of, a.already) for a in replays] == [
        (False, "orig", False), (True, None, True), (False, "orig", False)]
    # (float32 cosines: the last bit may differ between a window and a search)
    assert replays[0].similarity == pytest.approx(got.similarity, abs=1e-6)


def test_a_duplicate_of_an_item_settling_in_another_shard_waits_for_its_fate(
        any_redis: Settings, client: Any, namespace: str) -> None:
    """Three workers: ``b`` writes a copy in shard 1, ``c`` admits the original in shard 0
    before ``b`` registers (so ``b``'s copy will lose); ``a`` meanwhile finds ``b``'s copy
    nearest, waits for it to settle, sees it gone, and decides again: a duplicate of the
    original, found in the other shard it probes."""
    rng = np.random.default_rng(8)
    matrix = border_centroids(rng)
    install(client, namespace, matrix)
    original = on_border(matrix, 0, 1, 0.05)
    copy = on_border(matrix, 1, 0, 0.05)
    closest = unit(copy + 0.01 * (matrix[1] - matrix[0]))
    assert route(np.stack([original, copy, closest]), matrix, 1)[:, 0].tolist() == [0, 1, 1]
    a, c = worker(any_redis, namespace), worker(any_redis, namespace)
    b = Paused(redis_client(any_redis.redis), namespace, SETTINGS,
               CentroidStore(client, namespace).current())  # type: ignore[arg-type]
    b.after_search = lambda: c.admit(["orig"], original[None])
    decided: dict[str, list[Admission]] = {}
    register_all = b._register_all

    def register_late(calls: Any) -> Any:
        # ``b``'s copy is in shard 1, pending: ``a`` runs now and must wait for it.
        thread = threading.Thread(target=lambda: decided.update(
            a=a.admit(["close"], closest[None])))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "a did not wait for b's pending copy"
        return register_all(calls)

    b._register_all = register_late  # type: ignore[method-assign]
    got_b = b.admit(["copy"], copy[None])
    for _ in range(100):
        if "a" in decided:
            break
        threading.Event().wait(0.05)
    assert (got_b[0].keep, got_b[0].duplicate_of) == (False, "orig")
    assert (decided["a"][0].keep, decided["a"][0].duplicate_of) == (False, "orig")
    assert a.counts["redecided"] == 1
    assert state(a) == ([1, 0, 0], 1, 1, 0)


@pytest.mark.parametrize("offload", [False, True], ids=["main-thread", "offload"])
def test_two_threads_racing_over_border_groups_keep_exactly_one_each(
        any_redis: Settings, client: Any, namespace: str, offload: bool) -> None:
    """Groups of near-copies on the borders between two shards (each member's home is one
    of the two, by its noise; each probes both): two workers admit them in opposite
    orders at once. One per group stays; every duplicate names it; a replay agrees."""
    rng = np.random.default_rng(3)
    matrix = border_centroids(rng)
    install(client, namespace, matrix)
    groups = 24
    members: dict[tuple[int, int], np.ndarray] = {}
    for g in range(groups):
        a, b = [(0, 1), (1, 2), (0, 2)][g % 3]
        spread = rng.standard_normal(DIM)
        spread -= matrix[[a, b]].T @ (matrix[[a, b]] @ spread)  # no lean to a or b
        base = on_border(matrix, a, b, 0.0, unit(spread))
        for v in range(3):
            members[g, v] = near(base, rng, 0.1)
    homes = {key: int(route(vec, matrix, 1)[0, 0]) for key, vec in members.items()}
    split = sum(len({homes[g, v] for v in range(3)}) > 1 for g in range(groups))
    assert split >= groups // 3, "too few groups straddle a border to test the races"
    plans = []
    for name, order in (("w1", [0, 1, 2]), ("w2", [2, 1, 0])):
        items = [(f"{name}/{g}/{v}", members[g, v]) for g in range(groups) for v in order]
        plans.append([items[i:i + 4] for i in range(0, len(items), 4)])
    settings = SETTINGS.model_copy(update={"offload": offload})
    indexes = [worker(any_redis, namespace, settings) for _ in plans]
    barrier = threading.Barrier(len(plans))
    decided: dict[str, Admission] = {}
    errors: list[BaseException] = []

    def run(index: ShardedIndex, plan: list[list[tuple[str, np.ndarray]]]) -> None:
        try:
            barrier.wait(30)
            for batch in plan:
                ids = [item_id for item_id, _ in batch]
                decided.update(zip(ids, index.admit(ids, np.stack([v for _, v in batch])),
                                   strict=True))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=pair)
               for pair in zip(indexes, plans, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    kept = {item_id for item_id, a in decided.items() if a.keep}
    assert sorted(int(i.split("/")[1]) for i in kept) == list(range(groups))
    for item_id, admission in decided.items():
        if not admission.keep:
            assert admission.duplicate_of in kept, (item_id, admission)
            assert admission.duplicate_of.split("/")[1] == item_id.split("/")[1]
    sizes, vecs, logged, pending = state(indexes[0])
    assert sum(sizes) == vecs == logged == groups and pending == 0
    for batch in plans[0] + plans[1]:
        ids = [item_id for item_id, _ in batch]
        again = indexes[1].admit(ids, np.stack([v for _, v in batch]))
        for item_id, admission in zip(ids, again, strict=True):
            first = decided[item_id]
            assert (admission.keep, admission.duplicate_of) == (
                (True, None) if first.keep else (False, first.duplicate_of))
            assert admission.already == first.keep
    assert state(indexes[0])[0] == sizes
    print(f"\n[shard races] {len(decided)} items in {groups} groups ({split} straddling a "
          f"border): one kept each; races lost {sum(i.counts['race_lost'] for i in indexes)}"
          f", decided again {sum(i.counts['redecided'] for i in indexes)}")


class _NoModel:
    """Stands in for the embedder: the tests below never embed."""

    def encode(self, texts: list[str]) -> np.ndarray:
        raise AssertionError("not expected to embed")


def test_the_dedup_stage_refuses_shards_without_matching_centroids(
        stack: Settings, stack_namespace: str) -> None:
    namespace = stack_namespace

    def build(shards: int) -> Any:
        config = stack.model_copy(update={"dedup": stack.dedup.model_copy(
            update={"shards": shards})})
        conn = redis_client(stack.redis)
        return build_pipeline(config, conn, stages=["dedup"], namespace=namespace,
                              embedder=_NoModel()).steps[-1].index  # type: ignore[attr-defined]

    assert isinstance(build(1), VectorIndex)
    with pytest.raises(ShardsError, match="sluice shards fit"):
        build(3)
    client = redis_client(stack.redis)
    store = CentroidStore(client, namespace)
    fitted = store.save(border_centroids(np.random.default_rng(0)), samples=3, model="m",
                        source="corpus")
    with pytest.raises(ShardsError, match="sluice shards migrate"):
        build(3)  # fitted, not in use yet
    store.activate(fitted.version)
    assert isinstance(build(3), ShardedIndex)
    # The dedup stage's metrics (size, hold, aged out, race lost) read the sharded index.
    config = stack.model_copy(update={"dedup": stack.dedup.model_copy(update={"shards": 3})})
    pipeline = build_pipeline(config, redis_client(stack.redis), stages=["dedup"],
                              namespace=namespace, embedder=_NoModel())
    found = admission_index(pipeline)
    assert isinstance(found, ShardedIndex) and found.size() == 0
    with pytest.raises(ShardsError, match=r"set dedup\.shards = 3"):
        build(2)
    with pytest.raises(ShardsError, match="is sharded"):
        build(1)


def test_migration_moves_every_item_and_workers_follow_the_new_version(
        any_redis: Settings, client: Any, namespace: str) -> None:
    """One set filled with real lines; centroids fitted on its own vectors; ``migrate``
    moves the items (replays are "already" afterwards); a second fit and migration to 2
    shards is followed by a worker built before it."""
    from sluice.shards import fit, migrate

    _, vectors = three_kinds()
    ids = [f"line/{i}" for i in range(len(vectors))]
    one = build_vector_index(client, namespace, DedupSettings())
    assert isinstance(one, VectorIndex)
    first = [a for s in range(0, len(ids), 32) for a in one.admit(ids[s:s + 32],
                                                                  vectors[s:s + 32])]
    kept = [i for i, a in zip(ids, first, strict=True) if a.keep]
    done = fit(any_redis, [], shards=3, from_index=True, namespace=namespace)
    assert not done.active and done.centroids.samples == len(kept)
    report = migrate(any_redis, namespace=namespace, grace_s=0.0)
    assert (report.source, report.target) == (None, done.centroids.version)
    assert report.counts["moved"] + report.counts["merged"] == len(kept)
    assert one.size() == 0  # the old set is gone
    index = worker(any_redis, namespace)
    assert index.size() == report.counts["moved"] and min(index.shard_sizes()) > 0
    replay = [a for s in range(0, len(ids), 32) for a in index.admit(ids[s:s + 32],
                                                                     vectors[s:s + 32])]
    assert sum(a.already for a in replay) == report.counts["moved"]
    assert all(a.already or not a.keep for a in replay)
    # Again, to 2 shards: the worker built above follows the switch at its next call.
    again = fit(any_redis, [], shards=2, from_index=True, namespace=namespace)
    second = migrate(any_redis, namespace=namespace, grace_s=0.0)
    assert second.source == done.centroids.version
    assert second.counts["moved"] + second.counts["merged"] == report.counts["moved"]
    replay = index.admit(ids[:32], vectors[:32])
    assert index.version == again.centroids.version and len(index.shards) == 2
    assert all(a.already or not a.keep for a in replay)


def test_the_horizon_bounds_each_shard_and_its_shadow_log(
        any_redis: Settings, client: Any, namespace: str) -> None:
    """``horizon.items`` = 6 over 3 shards: each shard keeps its 2 newest (plus at most
    one micro-batch), and each shadow log its (probes − 1) × 2."""
    rng = np.random.default_rng(9)
    install(client, namespace, border_centroids(rng))
    horizon = SETTINGS.horizon.model_copy(update={"items": 6})
    index = worker(any_redis, namespace, SETTINGS.model_copy(update={"horizon": horizon}))
    batch = 4
    for start in range(0, 40, batch):
        vectors = np.stack([unit(rng.standard_normal(DIM)) for _ in range(batch)])
        got = index.admit([f"item/{start + n}" for n in range(batch)], vectors)
        assert all(a.keep for a in got)  # random directions: nothing alike
        assert max(index.shard_sizes()) <= 2 + batch
        assert max(int(client.zcard(key)) for key in index.shadow_keys) <= 2 + batch
    sizes, vecs, logged, pending = state(index)
    assert sum(sizes) == vecs == logged and pending == 0
    assert index.counts["aged_out"] == 40 - sum(sizes)


def test_the_cli_fits_centroids_on_a_corpus_and_shows_them(stack: Settings,
                                                           stack_namespace: str) -> None:
    """``sluice shards fit`` embeds a sample of real files with the product's model; on an
    empty namespace the new version is in use at once; ``status`` shows it; ``migrate``
    with nothing newer refuses."""
    from click.testing import CliRunner

    namespace = stack_namespace
    from sluice.cli import cli
    from tests.agents.test_shards import STDLIB

    runner = CliRunner()
    result = runner.invoke(cli, ["shards", "fit", str(STDLIB / "json"), str(STDLIB / "email"),
                                 "--shards", "2", "--limit", "24", "--namespace", namespace],
                           obj=stack)
    assert result.exit_code == 0, result.output
    assert "centroid version 1: 2 shards of dimension 384" in result.output
    assert "in use now" in result.output
    fitted = CentroidStore(redis_client(stack.redis), namespace).current()
    assert fitted is not None and fitted.source == "corpus" and fitted.samples >= 20
    result = runner.invoke(cli, ["shards", "status", "--namespace", namespace], obj=stack)
    assert result.exit_code == 0 and "centroid version 1, 2 shards" in result.output
    result = runner.invoke(cli, ["shards", "migrate", "--namespace", namespace], obj=stack)
    assert result.exit_code == 1 and "fit one first" in result.output
