"""Sharding the semantic index by semantic locality: the pure half (no Redis).

``dedup.shards = N`` splits the vector set into N sets, one per coarse centroid; an item's
**home** is the shard of its nearest centroid and its **probes** are the ``dedup.probe``
nearest shards (home first). ``agents.sharded_index`` searches the probes, writes a kept
item to its home, and settles races per shard; here are the parts that need no server:

* ``kmeans``: spherical k-means (cosine on unit vectors) with k-means++ seeding, in numpy,
  deterministic for a seed;
* ``route``: each vector's probes, nearest centroid first, computed in float64 so that two
  machines agree (ties go to the lower shard);
* ``Centroids`` and ``encode_centroids``/``decode_centroids``: the versioned record kept in
  Redis (version, dim, N, the float32 matrix, when and from how many samples);
* ``decide_routed`` and ``settle_routed``: ``agents.admission``'s decide and settle, where
  an item only sees what its probes can find, and each racing pair is settled in one shard
  (``pair_shard``) so that both workers agree which of them stays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.admission import Decision, decide
from schemas.errors import SluiceError

#: Fields of the centroid record (a Redis hash; ``encode_centroids``).
RECORD_FIELDS = ("version", "dim", "shards", "matrix", "fitted_at", "samples", "model",
                 "source")
#: A centroid row must be a unit vector to within this (cosine routing assumes it).
UNIT_TOLERANCE = 1e-3


class ShardsError(SluiceError):
    """Centroids missing, malformed or not matching the settings; k-means given too little."""


@dataclass(frozen=True, slots=True)
class Centroids:
    """One version of the coarse centroids: ``matrix`` is (shards, dim), unit float32 rows.

    ``fitted_at`` is Unix seconds; ``samples`` how many vectors the fit saw; ``model`` the
    embedding model they came from; ``source`` where from (``corpus`` or ``index``).
    """

    version: int
    matrix: np.ndarray
    fitted_at: float
    samples: int
    model: str
    source: str

    @property
    def shards(self) -> int:
        """N, the number of shards (rows)."""
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        """The vectors' dimension (columns)."""
        return int(self.matrix.shape[1])


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64); a zero row stays zero."""
    array = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)


def kmeans(vectors: np.ndarray, k: int, *, seed: int = 0, iterations: int = 50,
           restarts: int = 4) -> np.ndarray:
    """``k`` unit centroids (float32, (k, dim)) of ``vectors`` by spherical k-means.

    Each of ``restarts`` runs is seeded by k-means++ (each next seed drawn with probability
    ∝ its squared distance ``2 − 2·cos`` to the nearest seed so far), then Lloyd
    iterations: assign by the largest cosine, move each centroid to its members'
    normalized sum, until no assignment changes or ``iterations``. A centroid left without
    members takes the vector farthest from its own centroid, so every shard gets a share.
    The run with the largest sum of cosines to the assigned centroids wins (one run can
    stop in a poor local optimum: two kinds of text merged, one split). Deterministic for
    ``seed``.
    """
    data = unit_rows(vectors)
    if data.ndim != 2 or not len(data):
        raise ShardsError("k-means needs a non-empty 2-D array of vectors")
    if k < 1:
        raise ShardsError(f"k-means needs k ≥ 1, got {k}")
    distinct = len(np.unique(data.round(6), axis=0))
    if distinct < k:
        raise ShardsError(f"{distinct} distinct vectors cannot make {k} shards: sample more")
    best: tuple[float, np.ndarray] | None = None
    for run in range(max(1, restarts)):
        centroids = _lloyd(data, _plus_plus(data, k, np.random.default_rng([seed, run])),
                           iterations)
        score = float((data @ centroids.T).max(axis=1).sum())
        if best is None or score > best[0]:
            best = (score, centroids)
    assert best is not None
    return best[1].astype(np.float32)


def _lloyd(data: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    """Lloyd iterations of spherical k-means from ``centroids`` (see ``kmeans``)."""
    k = len(centroids)
    assign = np.full(len(data), -1)
    for _ in range(iterations):
        cos = data @ centroids.T
        new = np.argmax(cos, axis=1)
        for empty in sorted(set(range(k)) - set(new.tolist())):
            # The worst-served vector (not the only member of its cluster) founds it.
            own = cos[np.arange(len(data)), new]
            sizes = np.bincount(new, minlength=k)
            own = np.where(sizes[new] > 1, own, np.inf)
            new[int(np.argmin(own))] = empty
        if np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, data)
        centroids = unit_rows(sums)
    return centroids


def _plus_plus(data: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds: the first uniformly, each next ∝ squared distance to the nearest."""
    chosen = [int(rng.integers(len(data)))]
    best = data @ data[chosen[0]]
    for _ in range(1, k):
        weight = np.clip(2.0 - 2.0 * best, 0.0, None)
        total = float(weight.sum())
        if total <= 0:  # every vector sits on a seed: take one not chosen yet
            pick = next(i for i in range(len(data)) if i not in chosen)
        else:
            pick = int(rng.choice(len(data), p=weight / total))
        chosen.append(pick)
        best = np.maximum(best, data @ data[pick])
    return data[chosen].copy()


def route(vectors: np.ndarray, centroids: np.ndarray, probe: int) -> np.ndarray:
    """Each vector's ``probe`` nearest shards, nearest first: an int array (n, probe).

    Cosine in float64 (so that workers on different machines agree short of a tie within
    ~1e-12); ties go to the lower shard number. Column 0 is the item's home.
    """
    matrix = np.asarray(centroids, dtype=np.float64)
    rows = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    if rows.shape[1] != matrix.shape[1]:
        raise ShardsError(f"vectors of dimension {rows.shape[1]} cannot be routed by "
                          f"centroids of dimension {matrix.shape[1]}")
    probe = max(1, min(probe, len(matrix)))
    cos = rows @ matrix.T
    return np.argsort(-cos, axis=1, kind="stable")[:, :probe]


def pair_shard(probes_x: Sequence[int], probes_y: Sequence[int]) -> int | None:
    """Where a race between two near-copies x and y is settled: the lower of their two
    homes that both probe (None: neither probes the other's home, they never meet).

    Both register in every shard they probe, so both are in that shard's log, whose
    clock orders them; both workers compute the same shard, so they agree who came first.
    """
    both = [s for s in (int(probes_x[0]), int(probes_y[0]))
            if s in set(map(int, probes_x)) and s in set(map(int, probes_y))]
    return min(both) if both else None


def gives_way(probes_x: Sequence[int], probes_y: Sequence[int], shard: int) -> bool:
    """Whether kept item x gives way to a near-copy y met in ``shard``'s race window
    (registered there after x searched, before x registered): only if x's search could
    find y (y's home is among x's probes, so a replay of x finds y too) and ``shard`` is
    the pair's shard."""
    return int(probes_y[0]) in set(map(int, probes_x)) and pair_shard(probes_x,
                                                                      probes_y) == shard


def decide_routed(vectors: np.ndarray, ids: list[str], found: list[dict[str, np.ndarray]],
                  probes: np.ndarray, threshold: float) -> list[Decision]:
    """``agents.admission.decide`` for a sharded index: each item in input order against its
    candidates (``found[i]``, from its probed shards) and the earlier kept items of the
    batch whose home it probes (the ones its search would find once written, so a replay
    decides alike); cosine ≥ ``threshold`` → a duplicate of the nearest."""
    return decide(vectors, ids, found, threshold, probes)


@dataclass(frozen=True, slots=True)
class WindowItem:
    """An item another worker registered in ``shard`` during this batch's race window:
    its FP32 vector and its probes (routed from the vector, as its worker did)."""

    shard: int
    item_id: str
    vector: np.ndarray
    probes: tuple[int, ...]


def settle_routed(kept: Mapping[str, tuple[np.ndarray, Sequence[int]]],
                  window: Sequence[WindowItem], threshold: float
                  ) -> dict[str, tuple[str, float]]:
    """The kept items that lose a race: id → (winner, cosine).

    ``kept``: id → (FP32 vector, probes). ``window``: per shard, in registration order,
    what others registered there after this batch read that shard's clock and before it
    registered (so earlier than this batch in that shard's order). A kept item loses to
    the first window item within ``threshold`` that it ``gives_way`` to.
    """
    lost: dict[str, tuple[str, float]] = {}
    if not kept or not window:
        return lost
    matrix = np.stack([w.vector.astype(np.float32) for w in window])
    for item_id, (vector, probes) in kept.items():
        cos = matrix @ np.asarray(vector, dtype=np.float32)
        for n in np.flatnonzero(cos >= threshold):
            other = window[int(n)]
            if other.item_id != item_id and gives_way(probes, other.probes, other.shard):
                lost[item_id] = (other.item_id, float(cos[n]))
                break
    return lost


def encode_centroids(centroids: Centroids) -> dict[str, bytes]:
    """The Redis hash of a centroid record (the matrix as little-endian float32 bytes)."""
    matrix = np.ascontiguousarray(centroids.matrix, dtype="<f4")
    return {"version": str(centroids.version).encode(), "dim": str(centroids.dim).encode(),
            "shards": str(centroids.shards).encode(), "matrix": matrix.tobytes(),
            "fitted_at": repr(float(centroids.fitted_at)).encode(),
            "samples": str(centroids.samples).encode(), "model": centroids.model.encode(),
            "source": centroids.source.encode()}


def decode_centroids(record: Mapping[Any, Any]) -> Centroids:
    """A centroid record read back (``HGETALL``); a malformed one is a ``ShardsError``."""
    fields = {_text(k): v for k, v in record.items()}
    missing = [f for f in RECORD_FIELDS if f not in fields]
    if missing:
        raise ShardsError(f"centroid record lacks {', '.join(missing)}")
    try:
        version, dim, shards = (int(_text(fields[f])) for f in ("version", "dim", "shards"))
        fitted_at, samples = float(_text(fields["fitted_at"])), int(_text(fields["samples"]))
        blob = fields["matrix"]
        raw = blob if isinstance(blob, bytes) else blob.encode("latin-1")
        matrix = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardsError(f"malformed centroid record: {exc}") from exc
    if version < 1 or shards < 1 or dim < 1 or matrix.size != shards * dim:
        raise ShardsError(f"centroid record version {version}: {matrix.size} floats for "
                          f"{shards} × {dim}")
    matrix = matrix.reshape(shards, dim)
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    if not np.isfinite(matrix).all() or (np.abs(norms - 1.0) > UNIT_TOLERANCE).any():
        raise ShardsError(f"centroid record version {version}: rows are not unit vectors")
    return Centroids(version, matrix, fitted_at, samples, _text(fields["model"]),
                     _text(fields["source"]))


def shard_of_member(member: str) -> tuple[int, str]:
    """A shadow-log member ``"<home>:<id>"`` split into (home shard, id)."""
    home, _, item_id = member.partition(":")
    return int(home), item_id


def per_shard_items(items: int, shards: int) -> int:
    """A count horizon split over the shards (0 stays 0: no count limit)."""
    return math.ceil(items / shards) if items else 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
