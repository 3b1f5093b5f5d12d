"""The semantic index sharded over a Redis Cluster, at scale: one set against N shards.

``python -m bench.index [--quick] --shards N [--probe P] [--size ITEMS]
[--configs SHARDS:PROBE,…] [--workers W]`` (``bench.index``'s entry point dispatches here):
on a private three-master cluster (``private_cluster``: sluice's own cluster code, as
``sluice up --redis-cluster``), each index (one set, or N shards probing P) is filled with
real embeddings through the product's ``admit`` in calls of ``bench.index.BATCH``, measured
per segment up to 10k / 100k / 250k / 500k / 1M (admissions/s, call times, the longest
server call over every master's SLOWLOG, the registration script's round trip, bytes per
item), then checked by brute force at the end (planted copies, pairs within the threshold,
decisions), and, unless ``--workers 0``, the aggregate rate of several clients on a fresh
index. Writes ``bench/results/index-shards[-quick|-<size>].json``.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from bench.common import show, write_result
from bench.index import (
    BATCH,
    HELD_OUT,
    decision_agreement,
    fill_segment,
    pairs_within,
    planted_recall,
    real_vectors,
    slowlog_config,
    vectors_for,
)

SLOWLOG_EVERY = 8  # sharded fills: the SLOWLOG of every 8th admit (reading all three
# masters' logs after every admit doubled the fill's time at 100k)

FIT_SAMPLE = 2000  # real vectors the centroids are fitted on (the first of the stream)


@contextlib.contextmanager
def private_cluster(masters: int = 3) -> Iterator[Any]:
    """A throwaway Redis Cluster of ``masters`` masters (sluice's own cluster code, as
    ``sluice up --redis-cluster``), its AOF fsync turned off (the disk is not what is
    measured); a cluster client on it; always stopped."""
    from redis.cluster import RedisCluster

    from sluice.ports import free_port, free_port_block
    from sluice.redis_cluster import RedisClusterProcesses
    from sluice.settings import load_settings
    from streams.connections import redis_client

    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(state_dir=folder, stack={
            "kafka_port": free_port(), "controller_port": free_port(),
            "redis_port": free_port(), "redis_cluster": masters,
            "redis_cluster_port": free_port_block(masters)})
        cluster = RedisClusterProcesses(settings)
        cluster.start()
        client = redis_client(settings.redis)
        try:
            client.config_set("appendfsync", "no", target_nodes=RedisCluster.ALL_NODES)
            yield settings, client
        finally:
            client.close()
            cluster.stop()


def measure_sharded(settings: Any, client: Any, vectors: np.ndarray, fit_on: np.ndarray,
                    shards: int, probe: int, workers: int = 2,
                    checkpoints: list[int] | None = None) -> list[dict[str, Any]]:
    """Fill one index (one set, or ``shards`` shards probing ``probe``) through the
    product's ``admit``, measured per segment up to each checkpoint (the longest server
    call of every ``SLOWLOG_EVERY``-th admit by every master's SLOWLOG); at the end
    planted copies, pairs within the threshold, decisions against brute force, and the
    aggregate rate of ``workers`` threads on a second fresh index (none when 0)."""
    from agents.centroid_store import CentroidStore
    from agents.config import DedupSettings
    from agents.keys import shard_prefix
    from agents.sharded_index import build_vector_index
    from agents.shards import kmeans

    dedup = DedupSettings(shards=shards, probe=probe)
    masters = len({node.name for node in client.get_primaries()})

    def fresh() -> str:
        # A namespace whose shards sit on as many masters as can be (the slots of its
        # hash tags decide; the centroids' first version is 1).
        while True:
            namespace = f"bench-{uuid.uuid4().hex}"
            nodes = {client.get_node_from_key(f"{shard_prefix(namespace, 1, s)}:set").name
                     for s in range(shards)}
            if shards == 1 or len(nodes) == min(shards, masters):
                break
        if shards > 1:
            store = CentroidStore(client, namespace)
            fitted = store.save(kmeans(fit_on, shards, seed=0), samples=len(fit_on),
                                model=dedup.model, source="corpus")
            store.activate(fitted.version)
        return namespace

    index = build_vector_index(client, fresh(), dedup)
    sets = getattr(index, "shards", [index])
    rows: list[dict[str, Any]] = []
    admitted: list[int] = []
    dup_flag = np.zeros(len(vectors), dtype=bool)
    pos = 0
    slowlog_config(client, 0)
    try:
        for target in sorted({*(checkpoints or []), len(vectors)}):
            began = time.perf_counter()
            pos, timings = fill_segment(client, index, vectors, pos, target, admitted,
                                        dup_flag, SLOWLOG_EVERY)
            size = index.size()
            row: dict[str, Any] = {
                "shards": shards, "probe": min(probe, shards), "offered": pos, "size": size,
                "per_shard": [s.size() for s in sets],
                "masters": len({client.get_node_from_key(s.key).name for s in sets}),
                "segment_wall_s": time.perf_counter() - began, **timings,
                "bytes_per_item": index.memory_bytes() / max(size, 1)}
            print(f"  {shards} shard(s), probe {row['probe']}: {pos:,} offered, "
                  f"{row['admit_per_s']:.0f} admit/s, longest call p99 "
                  f"{row['longest_p99_ms']:.1f} ms, {row['bytes_per_item']:.0f} B/item",
                  flush=True)
            rows.append(row)
        slowlog_config(client, 10_000)
        last = rows[-1]
        last["pairs_within_threshold"], last["pairs_checked_rows"] = pairs_within(
            vectors, admitted, dedup.threshold)
        last.update(decision_agreement(vectors, admitted, dup_flag, dedup.threshold))
        last.update(planted_recall(index, vectors, admitted, dedup.threshold))
    finally:
        slowlog_config(client, 10_000)
        index.clear()
    if workers > 1:
        rows[-1][f"admit_per_s_{workers}_workers"] = _aggregate_rate(
            settings, vectors, fresh(), dedup, workers)
    return rows


def _aggregate_rate(settings: Any, vectors: np.ndarray, namespace: str, dedup: Any,
                    workers: int) -> float:
    """``workers`` threads, each its own cluster client, admitting disjoint slices of
    ``vectors`` into one fresh index at once: admissions/s in all."""
    from agents.sharded_index import build_vector_index
    from streams.connections import redis_client

    indexes = [build_vector_index(redis_client(settings.redis), namespace, dedup)
               for _ in range(workers)]
    slices = np.array_split(np.arange(len(vectors)), workers)
    barrier = threading.Barrier(workers)

    def work(worker_index: Any, rows: np.ndarray) -> None:
        barrier.wait()
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            worker_index.admit([str(i) for i in chunk], vectors[chunk])

    threads = [threading.Thread(target=work, args=pair)
               for pair in zip(indexes, slices, strict=True)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rate = len(vectors) / (time.perf_counter() - t0)
    indexes[0].clear()
    for worker_index in indexes:
        worker_index.client.close()
    return rate


def run_shards(quick: bool, shards: int, probe: int, size: int | None = None,
               configs: list[tuple[int, int]] | None = None, workers: int = 2
               ) -> dict[str, Any]:
    """One set against ``shards`` shards (probing ``probe``, and 1), or the given
    ``configs`` (shards, probe), filled to ``size`` items on a private three-master
    cluster, measured at every tenfold checkpoint; writes
    bench/results/index-shards[-<size>][-<shards>x<probe>…][-quick].json."""
    n_real = 11_000 if quick else 13_000
    real = real_vectors(n_real + HELD_OUT)[:-HELD_OUT]
    total = size or (10_000 if quick else 100_000)
    vectors = vectors_for(total, real)
    checkpoints = [c for c in (10_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000)
                   if c < total]
    fit_on = vectors[:FIT_SAMPLE]
    rows = []
    with private_cluster() as (settings, client):
        for count, probes in configs or ((1, 1), (shards, probe), (shards, 1)):
            rows += measure_sharded(settings, client, vectors, fit_on, count, probes,
                                    workers, checkpoints)
    show(f"one set vs {shards} shards on a 3-master Redis Cluster (batches of {BATCH}, real "
         f"embeddings, centroids by k-means on the first {FIT_SAMPLE:,}; longest = longest "
         f"server call of every {SLOWLOG_EVERY}th admit over every master's SLOWLOG)",
         ["shards", "probe", "size", "per shard", "masters", "admit/s",
          f"admit/s {workers} workers", "call p50 ms", "call p99 ms", "longest p99 ms",
          "script p99 ms", "B/item", "planted recall", "pairs ≥ thr", "dup recall",
          "dup precision"],
         [[r["shards"], r["probe"], r["size"], r["per_shard"], r["masters"],
           r["admit_per_s"], r.get(f"admit_per_s_{workers}_workers", ""), r["call_p50_ms"],
           r["call_p99_ms"], r["longest_p99_ms"], r["script_p99_ms"], r["bytes_per_item"],
           r.get("planted_recall", ""),
           f"{r['pairs_within_threshold']} / {r['pairs_checked_rows']} rows"
           if "pairs_within_threshold" in r else "",
           r.get("dup_recall", ""), r.get("dup_precision", "")] for r in rows])
    payload = {"batch": BATCH, "real_vectors": len(real), "fit_sample": FIT_SAMPLE,
               "items": total, "rows": rows, "note": "a private 3-master cluster on this "
               "machine, AOF fsync off; rows are segments up to each checkpoint (admit/s and "
               "call times of that segment); the last row of each index carries the brute-"
               "force checks: dup recall/precision over a sample of offered items against "
               "this index's own earlier admitted items (a border miss lowers recall), pairs "
               "within the threshold among a sample of admitted rows against all, planted "
               "FP32 near-copies of admitted rows at cosine uniform in [threshold + 0.002, "
               "0.998]"}
    name = "index-shards" if size is None else f"index-shards-{total}"
    if configs:  # each chosen set of indexes keeps its own file
        name += "-" + "-".join(f"{count}x{probes}" for count, probes in configs)
    write_result(name, quick, payload)
    return payload
