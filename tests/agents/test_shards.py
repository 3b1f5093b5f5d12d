"""The pure half of a sharded semantic index (``agents.shards``): k-means, routing, the
centroid record, and the routed decide/settle rules. No Redis.

The clustering claim is made on real embeddings (lines of three kinds of text, embedded by
the product's model); the rest is exact arithmetic on small hand-made vectors.
"""

from __future__ import annotations

import re
import sysconfig
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.config import DedupSettings
from agents.shards import (
    Centroids,
    ShardsError,
    WindowItem,
    decide_routed,
    decode_centroids,
    encode_centroids,
    gives_way,
    kmeans,
    pair_shard,
    per_shard_items,
    route,
    settle_routed,
    shard_of_member,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
KIND_SIZE = 40


def _lines(paths: list[Path], n: int) -> list[str]:
    out: list[str] = []
    for path in paths:
        for raw in path.read_text(encoding="utf-8", errors="ignore").splitlines():
            line = raw.strip()
            if len(line) > 30 and not line.startswith("#") and line not in out:
                out.append(line)
    return out[:n]


@cache
def embedder() -> Any:
    """The product's model on the CPU, loaded once for the session (``agents.embed``)."""
    from agents.embed import Embedder

    return Embedder(DedupSettings(device="cpu"))


@cache
def three_kinds() -> tuple[list[str], np.ndarray]:
    """40 lines each of Python (asyncio's sources), English prose (sentences of the
    Python licence) and SQL inserts, embedded by the product's model: ``(texts, vectors)``,
    in that order. Cached for the session (``test_sharded_index`` uses it too)."""
    code = _lines(sorted((STDLIB / "asyncio").glob("*.py")), KIND_SIZE)
    licence = " ".join((STDLIB / "LICENSE.txt").read_text(encoding="utf-8").split())
    prose = [s for s in re.split(r"(?<=[.;])\s+", licence) if len(s) > 40][:KIND_SIZE]
    sql = [f"INSERT INTO orders (id, customer, amount, placed) VALUES ({i}, 'c{i * 7 % 13}', "
           f"{i * 3.5:.2f}, '2024-0{i % 9 + 1}-1{i % 9}');" for i in range(KIND_SIZE)]
    assert len(code) == len(prose) == len(sql) == KIND_SIZE
    texts = code + prose + sql
    return texts, embedder().encode(texts)


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def test_kmeans_separates_three_kinds_of_real_text() -> None:
    _, vectors = three_kinds()
    kinds = np.repeat(np.arange(3), KIND_SIZE)
    centroids = kmeans(vectors, 3, seed=0)
    assert centroids.shape == (3, vectors.shape[1]) and centroids.dtype == np.float32
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    home = route(vectors, centroids, 1)[:, 0]
    # Each kind lands (almost) whole in a shard of its own.
    majority = [int(np.bincount(home[kinds == k], minlength=3).argmax()) for k in range(3)]
    assert sorted(majority) == [0, 1, 2]
    purity = sum(int((home[kinds == k] == majority[k]).sum()) for k in range(3))
    assert purity >= 0.95 * len(vectors), purity
    # Seeded: the same fit again.
    assert np.array_equal(kmeans(vectors, 3, seed=0), centroids)


def test_kmeans_gives_every_shard_members_and_refuses_too_few_vectors() -> None:
    rng = np.random.default_rng(0)
    bases = [unit(rng.standard_normal(16)) for _ in range(4)]
    data = np.stack([unit(bases[i % 4] + 0.05 * rng.standard_normal(16)) for i in range(80)])
    for k in (1, 4, 7):
        centroids = kmeans(data, k, seed=3)
        assert len(np.unique(route(data, centroids, 1)[:, 0])) == k
    with pytest.raises(ShardsError, match="distinct"):
        kmeans(np.repeat(data[:2], 5, axis=0), 3)
    with pytest.raises(ShardsError):
        kmeans(np.zeros((0, 16)), 2)


def test_route_is_nearest_first_deterministic_and_ties_go_to_the_lower_shard() -> None:
    centroids = np.eye(4, dtype=np.float32)
    vectors = np.array([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 0.7]], dtype=np.float32)
    assert route(vectors, centroids, 3).tolist() == [[1, 2, 3], [3, 0, 1]]
    assert route(vectors, centroids, 1).tolist() == [[1], [3]]
    assert route(vectors, centroids, 9).shape == (2, 4)  # probe capped at the shard count
    # The same answer for a float32 or float64 copy, one row or a batch.
    assert route(vectors.astype(np.float64), centroids, 2).tolist() == [[1, 2], [3, 0]]
    assert route(vectors[1], centroids, 2).tolist() == [[3, 0]]
    with pytest.raises(ShardsError, match="dimension"):
        route(np.ones((1, 3)), centroids, 2)


def test_the_centroid_record_round_trips_and_refuses_malformed_ones() -> None:
    rng = np.random.default_rng(1)
    matrix = np.stack([unit(rng.standard_normal(8)) for _ in range(3)])
    record = Centroids(7, matrix, 1_700_000_000.25, 1234, "all-MiniLM-L6-v2", "corpus")
    encoded = encode_centroids(record)
    back = decode_centroids({k.encode(): v for k, v in encoded.items()})  # as HGETALL gives
    assert (back.version, back.shards, back.dim, back.samples) == (7, 3, 8, 1234)
    assert (back.fitted_at, back.model, back.source) == (1_700_000_000.25, "all-MiniLM-L6-v2",
                                                         "corpus")
    assert np.array_equal(back.matrix, matrix)
    with pytest.raises(ShardsError, match="lacks"):
        decode_centroids({k: v for k, v in encoded.items() if k != "matrix"})
    with pytest.raises(ShardsError, match="floats"):
        decode_centroids({**encoded, "shards": b"4"})
    with pytest.raises(ShardsError, match="unit"):
        decode_centroids(encode_centroids(Centroids(1, matrix * 2, 0.0, 1, "m", "corpus")))
    assert shard_of_member("2:some:id") == (2, "some:id")
    assert per_shard_items(10, 3) == 4 and per_shard_items(0, 3) == 0


def test_pair_shard_and_who_gives_way() -> None:
    # Two-way: each probes the other's home. Settled in the lower home, both ways.
    assert pair_shard((1, 3), (3, 1)) == pair_shard((3, 1), (1, 3)) == 1
    assert gives_way((3, 1), (1, 3), 1) and gives_way((1, 3), (3, 1), 1)
    assert not gives_way((3, 1), (1, 3), 3)  # met in the other shard's window: ignored
    # One-way: x probes y's home 2, y does not probe x's home 0. Only x may give way,
    # in y's home.
    assert pair_shard((0, 2), (2, 1)) == 2
    assert gives_way((0, 2), (2, 1), 2) and not gives_way((2, 1), (0, 2), 2)
    # Neither probes the other's home: they never meet.
    assert pair_shard((0, 1), (2, 3)) is None and not gives_way((0, 1), (2, 3), 1)
    # The same home: the one-set rule, in that shard.
    assert pair_shard((2, 0), (2, 1)) == 2 and gives_way((2, 0), (2, 1), 2)


def test_decide_routed_sees_only_earlier_kept_items_whose_home_it_probes() -> None:
    a = unit(np.array([1.0, 0.0, 0.0]))
    near_a = unit(np.array([1.0, 0.05, 0.0]))
    ids = ["a", "copy-probing-a", "copy-not-probing-a"]
    probes = np.array([[0, 1], [1, 0], [2, 1]])
    got = decide_routed(np.stack([a, near_a, near_a]), ids, [{}, {}, {}], probes, 0.99)
    assert [d.duplicate_of for d in got] == [None, "a", None]
    assert got[1].similarity == pytest.approx(float(a @ near_a))
    # A candidate from the index wins when nearer.
    got = decide_routed(near_a[None], ["x"], [{"old": near_a}], probes[:1], 0.99)
    assert got[0].duplicate_of == "old" and got[0].similarity == pytest.approx(1.0)


def test_settle_routed_follows_the_pair_rule() -> None:
    a = unit(np.array([1.0, 0.0, 0.0]))
    near_a = unit(np.array([1.0, 0.05, 0.0]))
    far = unit(np.array([0.0, 1.0, 0.0]))
    kept = {"x": (near_a, (1, 0))}  # x lives in 1, probes 0
    met_in_pair_shard = [WindowItem(0, "y", a, (0, 1))]
    assert settle_routed(kept, met_in_pair_shard, 0.99) == {
        "x": ("y", pytest.approx(float(a @ near_a)))}
    met_elsewhere = [WindowItem(1, "y", a, (0, 1))]  # the pair's shard is 0, not 1
    assert settle_routed(kept, met_elsewhere, 0.99) == {}
    out_of_reach = [WindowItem(0, "y", a, (2, 0))]  # y's home 2 is not probed by x
    assert settle_routed(kept, out_of_reach, 0.99) == {}
    not_close = [WindowItem(0, "y", far, (0, 1))]
    assert settle_routed(kept, not_close, 0.99) == {}
    assert settle_routed(kept, [WindowItem(0, "x", a, (0, 1))], 0.99) == {}  # itself
