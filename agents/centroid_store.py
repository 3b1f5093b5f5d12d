"""The coarse centroids of a sharded semantic index (``dedup.shards`` > 1) in Redis: one
hash per version, a counter of the versions fitted and a key naming the version in use
(``agents.keys``; the record itself is ``agents.shards.Centroids``, encoded by
``agents.shards.encode_centroids``).

``CentroidStore`` reads and writes them: ``sluice shards fit`` saves a new version,
``sluice shards migrate`` activates it once the items are moved; ``agents.sharded_index``
reads the version in use on every call and follows a switch. ``no_centroids_message`` says
what to run when a sharded namespace has none yet.
"""

from __future__ import annotations

import time

import numpy as np
import redis

from agents.keys import centroids_current_key, centroids_key, centroids_seq_key
from agents.shards import Centroids, ShardsError, decode_centroids, encode_centroids


def no_centroids_message(namespace: str, shards: int) -> str:
    """What to do when a sharded namespace has no centroids yet."""
    return (f"dedup.shards = {shards} but namespace {namespace!r} has no centroids: fit them "
            f"with `sluice shards fit CORPUS... --shards {shards}` (or `--from-index` to "
            "sample the vectors already admitted), then `sluice shards migrate` if the "
            "namespace already holds items")


class CentroidStore:
    """The versioned centroid records of a namespace in Redis (``agents.keys``).

    Versions only grow (``INCR``); ``save`` writes a new one without using it, ``activate``
    makes it the one the workers use (``sluice shards migrate`` does, after moving the
    items; ``sluice shards fit`` does at once when there is nothing to move).
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def current_version(self) -> int | None:
        """The version the workers use (None: the namespace is not sharded)."""
        value = self.client.get(centroids_current_key(self.namespace))
        return int(value) if value is not None else None

    def latest_version(self) -> int:
        """The last version fitted (0: none)."""
        return int(self.client.get(centroids_seq_key(self.namespace)) or 0)

    def load(self, version: int) -> Centroids:
        """One version's record; a missing or malformed one is a ``ShardsError``."""
        record = self.client.hgetall(centroids_key(self.namespace, version))
        if not record:
            raise ShardsError(f"namespace {self.namespace!r} has no centroid version "
                              f"{version}")
        centroids = decode_centroids(record)
        if centroids.version != version:
            raise ShardsError(f"centroid record {version} says it is version "
                              f"{centroids.version}")
        return centroids

    def current(self) -> Centroids | None:
        """The centroids in use (None: not sharded)."""
        version = self.current_version()
        return None if version is None else self.load(version)

    def save(self, matrix: np.ndarray, *, samples: int, model: str, source: str
             ) -> Centroids:
        """Store ``matrix`` as a new version (not yet used) and return it."""
        version = int(self.client.incr(centroids_seq_key(self.namespace)))
        centroids = Centroids(version, np.asarray(matrix, dtype=np.float32), time.time(),
                              samples, model, source)
        encoded = encode_centroids(centroids)
        decode_centroids(encoded)  # a bad matrix fails here, not in every worker
        self.client.hset(centroids_key(self.namespace, version), mapping=encoded)  # type: ignore[arg-type]
        return centroids

    def activate(self, version: int) -> None:
        """Make ``version`` the one workers use (they follow at their next call)."""
        self.load(version)
        self.client.set(centroids_current_key(self.namespace), version)
