"""Racing admissions to the semantic index (``agents.index``), on a single Redis and on the
three-master cluster (conftest's ``any_redis``): workers search outside any script, so
two of them can write near-copies at once; the settle keeps exactly one, every duplicate
names an item that stays, and a replay reaches the same decisions.

Vectors are synthetic here (groups of near-copies around random directions): what is
tested is the protocol, not HNSW recall on real text (``test_index.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis

from agents.config import DedupSettings
from agents.index import Admission, VectorIndex
from sluice.settings import Settings
from streams.connections import redis_client
from tests.agents.pipeline_util import unique_id

pytestmark = pytest.mark.integration

SETTINGS = DedupSettings(settle_wait_s=5.0)
DIM = 384


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def near(vector: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A near-copy: cosine ≈ 1 / sqrt(1 + noise²) (0.995 at 0.1)."""
    return unit(vector + noise * unit(rng.standard_normal(DIM)))


@pytest.fixture
def namespace(any_redis: Settings) -> Iterator[str]:
    name = unique_id()
    yield name
    conn = redis_client(any_redis.redis)
    VectorIndex(conn, name, SETTINGS).clear()
    conn.close()


def worker(any_redis: Settings, namespace: str, settings: DedupSettings = SETTINGS
           ) -> VectorIndex:
    """One worker's index: its own connection, like a separate process."""
    return VectorIndex(redis_client(any_redis.redis), namespace, settings)


class Paused(VectorIndex):
    """An index that lets another worker run right after its search (``after_search``)."""

    after_search: Callable[[], None] = staticmethod(lambda: None)

    def _search(self, ids: list[str], rows: np.ndarray) -> Any:
        found = super()._search(ids, rows)
        self.after_search()
        return found


def index_state(index: VectorIndex) -> tuple[int, int, int, int]:
    """(set, FP32 vectors, log, pending) sizes: they agree once every admission settled."""
    client: redis.Redis = index.client
    return (index.size(), int(client.hlen(index.vectors_key)),
            int(client.zcard(index.log_key)), int(client.scard(index.pending_key)))


def test_a_worker_that_wrote_after_another_registered_its_copy_gives_way(
        any_redis: Settings, namespace: str) -> None:
    rng = np.random.default_rng(1)
    original = unit(rng.standard_normal(DIM))
    copy, copy_of_copy = near(original, rng, 0.1), near(original, rng, 0.1)
    other = worker(any_redis, namespace)
    slow = Paused(redis_client(any_redis.redis), namespace, SETTINGS)
    # ``slow`` searches (nothing there), ``other`` admits the original meanwhile, then
    # ``slow`` writes its two items: the first one kept in its batch, the second a
    # duplicate of it. The settle finds the original in the window: the first loses, and
    # the second, whose original is gone, is decided again.
    slow.after_search = lambda: other.admit(["orig"], original[None])  # type: ignore[method-assign]
    got = slow.admit(["copy", "copy2"], np.stack([copy, copy_of_copy]))
    assert [(a.keep, a.duplicate_of) for a in got] == [(False, "orig"), (False, "orig")]
    assert all(a.similarity is not None and a.similarity >= SETTINGS.threshold for a in got)
    assert slow.counts["race_lost"] == 1 and slow.counts["redecided"] == 1
    assert index_state(slow) == (1, 1, 1, 0)
    # A replay, by either worker, in either order: the same decisions.
    slow.after_search = lambda: None  # type: ignore[method-assign]
    assert slow.admit(["copy2", "copy"], np.stack([copy_of_copy, copy])) == got[::-1]
    assert other.admit(["orig", "copy"], np.stack([original, copy])) == [
        Admission(keep=True, already=True), got[0]]
    assert index_state(slow) == (1, 1, 1, 0)


def test_an_id_of_the_batch_that_another_worker_kept_meanwhile_still_wins(
        any_redis: Settings, namespace: str) -> None:
    """The same event reaches two workers (a redelivery): ``slow`` decides its copy first
    and the original a duplicate of it, while ``other`` keeps the original. The window
    holds an id of ``slow``'s own batch, written by ``other``: it must count."""
    rng = np.random.default_rng(4)
    original = unit(rng.standard_normal(DIM))
    copy = near(original, rng, 0.1)
    other = worker(any_redis, namespace)
    slow = Paused(redis_client(any_redis.redis), namespace, SETTINGS)
    slow.after_search = lambda: other.admit(["orig"], original[None])  # type: ignore[method-assign]
    got = slow.admit(["copy", "orig"], np.stack([copy, original]))
    assert [(a.keep, a.duplicate_of, a.already) for a in got] == [
        (False, "orig", False), (True, None, True)]
    assert index_state(slow) == (1, 1, 1, 0)


def test_a_duplicate_of_an_item_still_settling_waits_for_its_fate(
        any_redis: Settings, namespace: str) -> None:
    """Three workers: ``b`` writes a copy, ``c`` admits the original before ``b``
    registers (so ``b``'s copy will lose); ``a`` meanwhile finds ``b``'s copy nearest,
    waits for it to settle, sees it gone, and decides again: a duplicate of the original."""
    rng = np.random.default_rng(2)
    original = unit(rng.standard_normal(DIM))
    copy = near(original, rng, 0.1)
    closest_to_copy = near(copy, rng, 0.02)
    a, c = worker(any_redis, namespace), worker(any_redis, namespace)
    b = Paused(redis_client(any_redis.redis), namespace, SETTINGS)
    b.after_search = lambda: c.admit(["orig"], original[None])  # type: ignore[method-assign]
    decided: dict[str, list[Admission]] = {}
    register = b._register

    def register_late(**kwargs: Any) -> Any:
        # ``b``'s copy is in the set, pending: ``a`` runs now and must wait for it.
        thread = threading.Thread(target=lambda: decided.update(
            a=a.admit(["close"], closest_to_copy[None])))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "a did not wait for b's pending copy"
        return register(**kwargs)

    b._register = register_late  # type: ignore[assignment]
    got_b = b.admit(["copy"], copy[None])
    for _ in range(100):
        if "a" in decided:
            break
        threading.Event().wait(0.05)
    assert got_b[0].duplicate_of == "orig" and not got_b[0].keep
    assert decided["a"][0].duplicate_of == "orig" and not decided["a"][0].keep
    assert a.counts["redecided"] == 1
    assert index_state(a) == (1, 1, 1, 0)


@pytest.mark.parametrize("offload", [False, True], ids=["main-thread", "offload"])
def test_two_threads_racing_over_groups_of_near_copies_keep_exactly_one_each(
        any_redis: Settings, namespace: str, offload: bool) -> None:
    rng = np.random.default_rng(3)
    groups = 24
    bases = [unit(rng.standard_normal(DIM)) for _ in range(groups)]
    members = {(g, v): near(bases[g], rng, 0.1) for g in range(groups) for v in range(3)}
    plans = []
    for name, order in (("w1", [0, 1, 2]), ("w2", [2, 1, 0])):
        items = [(f"{name}/{g}/{v}", members[g, v]) for g in range(groups) for v in order]
        plans.append([items[i:i + 4] for i in range(0, len(items), 4)])
    settings = SETTINGS.model_copy(update={"offload": offload})
    indexes = [worker(any_redis, namespace, settings) for _ in plans]
    barrier = threading.Barrier(len(plans))
    decided: dict[str, Admission] = {}
    errors: list[BaseException] = []

    def run(index: VectorIndex, plan: list[list[tuple[str, np.ndarray]]]) -> None:
        try:
            barrier.wait(30)
            for batch in plan:
                ids = [item_id for item_id, _ in batch]
                decided.update(zip(ids, index.admit(ids, np.stack([v for _, v in batch])),
                                   strict=True))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(indexes, plans,
                                                                       strict=True)]
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
    assert index_state(indexes[0]) == (groups, groups, groups, 0)
    # A replay of everything, by the other worker: nothing changes.
    for batch in plans[0] + plans[1]:
        ids = [item_id for item_id, _ in batch]
        again = indexes[1].admit(ids, np.stack([v for _, v in batch]))
        for item_id, admission in zip(ids, again, strict=True):
            first = decided[item_id]
            assert (admission.keep, admission.duplicate_of) == (
                (True, None) if first.keep else (False, first.duplicate_of))
            assert admission.already == first.keep
    assert index_state(indexes[0]) == (groups, groups, groups, 0)
    print(f"\n[races] {len(decided)} items in {groups} groups: one kept each; races lost "
          f"{sum(i.counts['race_lost'] for i in indexes)}, decided again "
          f"{sum(i.counts['redecided'] for i in indexes)}")


def test_an_id_twice_in_one_batch_is_decided_once(any_redis: Settings, namespace: str) -> None:
    """A redelivery inside one micro-batch: the later occurrence is "already" admitted,
    never a duplicate of itself."""
    rng = np.random.default_rng(5)
    vector = unit(rng.standard_normal(DIM))
    index = worker(any_redis, namespace)
    got = index.admit(["x", "x"], np.stack([vector, vector]))
    assert got == [Admission(keep=True), Admission(keep=True, already=True)]
    assert index_state(index) == (1, 1, 1, 0)


def test_an_item_left_pending_by_a_dead_worker_is_waited_for_once(
        any_redis: Settings, namespace: str) -> None:
    """A worker dies between its VADD and the registration: its item stays in the set,
    pending. The first copy waits settle_wait_s, then counts it as kept and settles it,
    so the next copy does not wait."""
    rng = np.random.default_rng(6)
    original = unit(rng.standard_normal(DIM))
    dead = worker(any_redis, namespace)

    def die(**_: Any) -> Any:
        raise RuntimeError("killed before registering")

    dead._register = die  # type: ignore[assignment]
    with pytest.raises(RuntimeError):
        dead.admit(["orig"], original[None])
    other = worker(any_redis, namespace, SETTINGS.model_copy(update={"settle_wait_s": 0.3}))
    started = time.monotonic()
    [first] = other.admit(["copy1"], near(original, rng, 0.1)[None])
    waited = time.monotonic() - started
    assert (first.keep, first.duplicate_of) == (False, "orig") and waited >= 0.3
    assert other.counts["stale_pending"] == 1
    started = time.monotonic()
    [second] = other.admit(["copy2"], near(original, rng, 0.1)[None])
    assert (second.keep, second.duplicate_of) == (False, "orig")
    assert time.monotonic() - started < 0.3 and other.counts["stale_pending"] == 1
    # Left over, as documented: the dead worker's item never entered the log.
    assert index_state(other) == (1, 1, 0, 0)
