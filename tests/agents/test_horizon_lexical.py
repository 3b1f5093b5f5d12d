"""``dedup.horizon`` on the lexical layers: the fuzzy MinHash-LSH indexes forget their
oldest items (by count or by age: signature, band memberships and order entry), a bounded
number per call, and count them; exact claims and first-digest keys expire (a TTL of
``age_s``). On a single Redis and on the cluster (conftest's ``any_redis``) where it
matters: the fuzzy trim script and its removal touch one hash tag."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pydantic
import pytest
import redis

from agents.config import DedupSettings, FuzzySettings, HorizonSettings
from agents.exact import ExactClaims
from agents.fuzzy import FuzzyDedup
from agents.fuzzy_index import FuzzyIndex
from agents.keys import exact_key, first_digest_key, lsh_prefix
from agents.pipeline import build_pipeline
from agents.step import Coords, Item
from sluice.settings import Settings
from streams.connections import redis_client
from tests.agents.pipeline_util import unique_id

pytestmark = pytest.mark.integration

SETTINGS = FuzzySettings()
N = 6  # the count horizon of these tests
BATCH = 3  # items per call


@pytest.fixture
def conn(any_redis: Settings) -> Iterator[redis.Redis]:
    """A bytes client on the single Redis, then on the cluster."""
    client = redis_client(any_redis.redis)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def ns(conn: redis.Redis) -> Iterator[str]:
    """A fresh namespace; every key under it (tagged or not) is removed afterwards."""
    name = unique_id()
    yield name
    for pattern in (f"sluice:{name}:*", f"sluice:{{{name}:*"):
        for key in conn.scan_iter(match=pattern, count=500):
            conn.unlink(key)


def document(n: int, words: int = 120) -> str:
    """A text of random words, unrelated to every other ``n`` (Jaccard of shingles ≈ 0)."""
    rng = np.random.default_rng(n)
    return " ".join(f"w{w}" for w in rng.integers(0, 1_000_000, words))


def near(text: str) -> str:
    """A near-copy: a few words changed at the end (Jaccard of 5-shingles ≈ 0.95)."""
    words = text.split()
    return " ".join([*words[:-2], "changed", "too"])


def index_keys(conn: redis.Redis, namespace: str) -> tuple[int, int, int]:
    """(signatures, band memberships, order entries) of the word index."""
    prefix = lsh_prefix(namespace)
    bands = [k for k in conn.scan_iter(match=f"{prefix}:band:*", count=1000)]
    members = sum(int(conn.scard(k)) for k in bands)
    return (int(conn.hlen(f"{prefix}:sig")), members, int(conn.zcard(f"{prefix}:order")))


def fuzzy(conn: redis.Redis, namespace: str, **horizon: float) -> FuzzyIndex:
    return FuzzyIndex(conn, namespace, SETTINGS, horizon=HorizonSettings(**horizon))


def test_the_horizon_describes_every_dedup_layer() -> None:
    doc = (HorizonSettings.__doc__ or "").lower()
    assert "exact" in doc and "fuzzy" in doc and "semantic" in doc
    with pytest.raises(pydantic.ValidationError, match="age_s"):
        HorizonSettings(age_s=-1)


def test_a_count_horizon_keeps_the_newest_fuzzy_items(conn: redis.Redis, ns: str) -> None:
    index = fuzzy(conn, ns, items=N, evict_per_call=BATCH)
    docs = [(f"d{i}", document(i)) for i in range(3 * N)]
    for start in range(0, len(docs), BATCH):
        decisions = index.check_and_insert(docs[start:start + BATCH])
        assert [d.outcome for d in decisions] == ["admitted"] * BATCH
        # Trimmed before each call: at most one call's items over the horizon.
        assert len(index) <= N + BATCH
    kept = len(index)
    assert index.counts["aged_out"] == 3 * N - kept
    assert index_keys(conn, ns) == (kept, kept * index.bands, kept)
    # The oldest are gone: a copy of one is admitted again; a copy of a recent one is not.
    assert "d0" not in index and f"d{3 * N - 1}" in index
    [old, recent] = index.check_and_insert([("copy-d0", near(docs[0][1])),
                                            ("copy-last", near(docs[-1][1]))])
    assert old.outcome == "admitted"
    assert (recent.outcome, recent.duplicate_of) == ("duplicate", f"d{3 * N - 1}")


def test_one_call_evicts_at_most_evict_per_call(conn: redis.Redis, ns: str) -> None:
    index = fuzzy(conn, ns, items=2, evict_per_call=2)
    index.check_and_insert([(f"d{i}", document(i)) for i in range(8)])
    assert len(index) == 8
    index.check_and_insert([("d8", document(8))])
    assert index.counts["aged_out"] == 2 and len(index) == 7
    index.check_and_insert([("d9", document(9))])
    assert index.counts["aged_out"] == 4 and len(index) == 6
    assert not {"d0", "d1", "d2", "d3"} & {f"d{i}" for i in range(10) if f"d{i}" in index}


def test_an_age_horizon_forgets_old_fuzzy_items(conn: redis.Redis, ns: str) -> None:
    index = fuzzy(conn, ns, age_s=1.0)
    old = document(1)
    index.check_and_insert([("old", old)])
    assert index.check_and_insert([("copy-old", near(old))])[0].outcome == "duplicate"
    time.sleep(1.2)
    new = document(2)
    index.check_and_insert([("new", new)])  # ``old`` ages out before this call decides
    assert index.counts["aged_out"] == 1 and index_keys(conn, ns) == (1, index.bands, 1)
    assert index.check_and_insert([("copy-old", near(old))])[0].outcome == "admitted"
    assert index.check_and_insert([("copy-new", near(new))])[0].duplicate_of == "new"


def test_removed_items_leave_the_order_too(conn: redis.Redis, ns: str) -> None:
    index = fuzzy(conn, ns, items=N)
    index.check_and_insert([(f"d{i}", document(i)) for i in range(4)])
    index.remove(["d0", "d1"])  # what ``forget`` does: no longer counts against the horizon
    assert index_keys(conn, ns) == (2, 2 * index.bands, 2)


def test_no_horizon_forgets_nothing(conn: redis.Redis, ns: str) -> None:
    index = FuzzyIndex(conn, ns, SETTINGS)
    index.check_and_insert([(f"d{i}", document(i)) for i in range(3 * N)])
    index.check_and_insert([("late", document(99))])
    assert len(index) == 3 * N + 1 and index.counts["aged_out"] == 0


def test_the_fuzzy_step_counts_what_aged_out(conn: redis.Redis, ns: str) -> None:
    step = FuzzyDedup(SETTINGS, fuzzy(conn, ns, items=2))
    records = [{"id": f"e{i}", "kind": "TEXT", "content": document(i)} for i in range(5)]
    step.run([Item(r, Coords("raw", 0, i)) for i, r in enumerate(records[:4])])
    step.run([Item(records[4], Coords("raw", 0, 4))])
    assert step.counters["fuzzy.aged_out"] == 2


def test_exact_claims_and_first_digests_expire_after_age_s(conn: redis.Redis, ns: str) -> None:
    claims = ExactClaims(conn, ns, HorizonSettings(age_s=0.5))
    assert claims.claim([("d1", "a"), ("d2", "b")]) == ["a", "b"]
    assert claims.first_digests([("a", "d1")]) == ["d1"]
    for key in (exact_key(ns, "d1"), first_digest_key(ns, "a")):
        assert 0 < conn.pttl(key) <= 500
    assert claims.claim([("d1", "c")]) == ["a"]  # a copy within the horizon: still a's
    claims.release([("d2", "b")])  # release still gives a claim back
    assert claims.claim([("d2", "c")]) == ["c"]
    time.sleep(0.7)
    assert claims.claim([("d1", "c")]) == ["c"]  # expired: a copy is admitted again
    assert claims.first_digests([("a", "d9")]) == ["d9"]


def test_exact_claims_without_an_age_never_expire(conn: redis.Redis, ns: str) -> None:
    claims = ExactClaims(conn, ns, HorizonSettings(items=5))
    claims.claim([("d1", "a")])
    claims.first_digests([("a", "d1")])
    assert conn.pttl(exact_key(ns, "d1")) == -1 == conn.pttl(first_digest_key(ns, "a"))


def test_the_pipeline_gives_the_horizon_to_every_lexical_layer(stack: Settings) -> None:
    horizon = HorizonSettings(items=7, age_s=60.0)
    config = stack.model_copy(update={"dedup": DedupSettings(enabled=False, horizon=horizon)})
    client, name = redis_client(stack.redis), unique_id()
    try:
        pipeline = build_pipeline(config, client, stages=["ingest"], namespace=name)
        stores = [store for step in pipeline.steps for attr in ("index", "claims")
                  if (store := getattr(step, attr, None)) is not None]
        fuzzy_indexes = [s for s in stores if isinstance(s, FuzzyIndex)]
        exact = [s for s in stores if isinstance(s, ExactClaims)]
        assert len(fuzzy_indexes) == 2 and len(exact) == 1
        assert all(s.horizon == horizon for s in [*fuzzy_indexes, *exact])
    finally:
        for key in client.scan_iter(match=f"sluice:{{{name}:*", count=500):
            client.unlink(key)
        client.close()
