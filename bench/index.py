"""The semantic admission index at scale, on real embeddings.

``python -m bench.index [--quick]``; ``python -m bench.index [--quick] --shards N [--probe P]
[--size ITEMS]`` compares one vector set with N shards (``agents.sharded_index``) on a
private three-master Redis Cluster (``bench.index_shards``).

Vectors: all-MiniLM-L6-v2 embeddings of distinct lines of the standard library's sources
(cached under ~/.cache/sluice/bench/ after the first run; 14k lines take ~5 min to embed
here). Beyond the real lines, the larger sets are normalized means of two random real
embeddings (what the embedding of two lines pasted together looks like, roughly), so the
index still sees the clustered geometry of real text — random vectors would make HNSW look
far worse (recall ≈ 0.4) and far faster than it is.

For each configuration (quantization, build EF) one index is filled through the product's
``VectorIndex.admit`` in micro-batches of 32, as the dedup agent does, and measured at each
size checkpoint:

* admissions/s, and the wall time of one ``admit`` (all its round trips);
* the longest single server call of each ``admit``: ``SLOWLOG`` logging every command
  (threaded ``VSIM``/``VADD … CAS`` include their thread time: an upper bound on the main
  thread's hold), p50/p99 over the calls; and the product's own ``last_hold_s`` (the
  registration script's round trip: what the dedup agent publishes as ``admit.hold_s.max``);
* bytes per item (``MEMORY USAGE … SAMPLES 0`` of the set, the FP32 vectors and the log);
* recall@1 of ``VSIM`` against numpy brute force on held-out real lines (the HNSW part,
  which stays approximate);
* planted-duplicate recall: 1,000 FP32 near-copies of admitted items (cosine uniform in
  [threshold + 0.002, 0.998]) offered through ``admit``: the share rejected;
* pairs of admitted items within the threshold, by brute force (a sample of 2,000 rows
  against every admitted one): 0 when no decision let a near-copy in;
* up to 20k items, agreement of the duplicate decisions with brute force;
* aggregate admissions/s of two workers (threads, each its own connection) admitting
  disjoint halves of a fresh index at once.

The whole-batch-script design this one replaced is compared through its own last results
of this benchmark (``previous_design``, carried forward in the JSON): its code is gone, and
re-implementing it here would measure a copy, not it.
"""

from __future__ import annotations

import json
import os
import sysconfig
import threading
import time
import uuid
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    CACHE,
    RESULTS,
    embed_cached,
    private_redis,
    show,
    write_result,
)

BATCH = 32
HELD_OUT = 1000
PLANTED = 1000  # planted near-copies per checkpoint
PAIR_SAMPLE = 50_000  # admitted rows checked by brute force against every admitted row
DECISION_SAMPLE = 20_000  # offered rows whose decision is checked by brute force
SLOWLOG_LEN = 4096  # commands of one admit call, at most
DESIGN = "search-decide-settle"  # this admission; older results are the previous design


@cache
def stdlib_lines() -> list[str]:
    """Distinct stripped lines (> 25 chars) of the stdlib's sources, shuffled (seed 0)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "idlelib" in path.parts:
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        lines += [s for s in (raw.strip() for raw in text.splitlines()) if len(s) > 25]
    unique = list(dict.fromkeys(lines))
    np.random.default_rng(0).shuffle(unique)
    return unique


def real_vectors(n: int) -> np.ndarray:
    """Embeddings of the first ``n`` stdlib lines (cached; embedded once)."""
    return embed_cached(stdlib_lines()[:n], "torch")


def vectors_for(total: int, real: np.ndarray, seed: int = 0) -> np.ndarray:
    """``total`` vectors: the real ones first, then normalized pair means of real ones."""
    if total <= len(real):
        return real[:total]
    rng = np.random.default_rng(seed)
    extra = total - len(real)
    pairs = rng.integers(0, len(real), size=(extra, 2))
    mixed = real[pairs[:, 0]] + real[pairs[:, 1]]
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    return np.vstack([real, mixed.astype(np.float32)])


def _primaries(client: Any) -> list[Any]:
    """The nodes to ask: every master of a cluster client, else none (the one server)."""
    return list(client.get_primaries()) if hasattr(client, "get_primaries") else []


def slowlog_config(client: Any, slower_than_us: int) -> None:
    nodes = _primaries(client)
    for node in nodes or [None]:
        kwargs = {"target_nodes": node} if node is not None else {}
        client.config_set("slowlog-log-slower-than", slower_than_us, **kwargs)
        client.config_set("slowlog-max-len", SLOWLOG_LEN, **kwargs)


def slowlog_reset(client: Any) -> None:
    nodes = _primaries(client)
    for node in nodes or [None]:
        client.slowlog_reset(**({"target_nodes": node} if node is not None else {}))


def longest_command(client: Any) -> tuple[float, str]:
    """The longest server call since the last reset (``SLOWLOG``, logging every command),
    over every master of a cluster: seconds and its command name. For the threaded ``VSIM``
    and ``VADD … CAS`` the server counts their thread time too: an upper bound on how long
    they held the main thread."""
    nodes = _primaries(client)
    logged = [client.slowlog_get(SLOWLOG_LEN, **({"target_nodes": n} if n is not None else {}))
              for n in nodes or [None]]
    entries = [e for log in logged for e in log
               if not _name(e["command"]).startswith("SLOWLOG")]
    if not entries:
        return 0.0, ""
    top = max(entries, key=lambda e: e["duration"])
    return top["duration"] / 1e6, _name(top["command"])


def _name(command: bytes | str) -> str:
    text = command.decode(errors="replace") if isinstance(command, bytes) else command
    return " ".join(text.split(" ")[:1]).upper()


def planted_copies(vectors: np.ndarray, count: int, threshold: float,
                   seed: int = 1) -> np.ndarray:
    """``count`` near-copies of random rows, each at an FP32 cosine drawn uniformly from
    [threshold + 0.002, 0.998] to its original."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), size=count, replace=False)
    base = vectors[rows].astype(np.float64)
    noise = rng.standard_normal(base.shape)
    noise -= (noise * base).sum(axis=1, keepdims=True) * base  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = rng.uniform(threshold + 0.002, 0.998, size=(count, 1))
    copies = cos * base + np.sqrt(1 - cos**2) * noise
    return copies.astype(np.float32)


def fill_segment(client: Any, index: Any, vectors: np.ndarray, pos: int, target: int,
                 admitted: list[int], dup_flag: np.ndarray, slowlog_every: int = 1
                 ) -> tuple[int, dict[str, Any]]:
    """Offer ``vectors[pos:target]`` to ``index.admit`` in calls of ``BATCH``, recording
    each decision (``admitted``, ``dup_flag``); the new position and the segment's timings:
    admissions/s and call times (the admissions' own time: SLOWLOG reads between them are
    not counted), the registration script's round trip, and the longest server call of
    every ``slowlog_every``-th call (SLOWLOG, which must log every command)."""
    walls: list[float] = []
    holds: list[float] = []
    longest: list[float] = []
    names = Counter[str]()
    start = pos
    while pos < min(target, len(vectors)):
        ids = [str(i) for i in range(pos, min(pos + BATCH, target))]
        sampled = (pos // BATCH) % slowlog_every == 0
        if sampled:
            slowlog_reset(client)
        decisions = index.admit(ids, vectors[pos:pos + len(ids)])
        if sampled:
            seconds, name = longest_command(client)
            longest.append(seconds)
            names[name] += 1
        walls.append(index.last_call_s)
        holds.append(index.last_hold_s)
        for offset, decision in enumerate(decisions):
            if decision.keep:
                admitted.append(pos + offset)
            else:
                dup_flag[pos + offset] = True
        pos += len(ids)
    # The load average says how busy the (shared) machine was meanwhile.
    return pos, {"admit_per_s": (pos - start) / sum(walls),
                 "load_avg_1m": os.getloadavg()[0],
                 "call_p50_ms": float(np.percentile(walls, 50) * 1e3),
                 "call_p99_ms": float(np.percentile(walls, 99) * 1e3),
                 "script_p50_ms": float(np.percentile(holds, 50) * 1e3),
                 "script_p99_ms": float(np.percentile(holds, 99) * 1e3),
                 "longest_p50_ms": float(np.percentile(longest, 50) * 1e3),
                 "longest_p99_ms": float(np.percentile(longest, 99) * 1e3),
                 "longest_max_ms": float(np.max(longest) * 1e3),
                 "longest_is": dict(names.most_common(3)),
                 "longest_sampled": len(longest)}


def measure(client: Any, vectors: np.ndarray, queries: np.ndarray, checkpoints: list[int],
            quantization: str, build_ef: int, offload: bool, precision: str = "fp32"
            ) -> list[dict[str, Any]]:
    """Fill one index through ``VectorIndex.admit``; measure at each checkpoint."""
    from agents.config import DedupSettings
    from agents.index import VectorIndex

    settings = DedupSettings(quantization=quantization, build_ef=build_ef, offload=offload,
                             vector_precision=precision)
    index = VectorIndex(client, f"bench-{uuid.uuid4().hex}", settings)
    rows: list[dict[str, Any]] = []
    pos = 0
    admitted: list[int] = []
    dup_flag = np.zeros(len(vectors), dtype=bool)
    slowlog_config(client, 0)  # every command, with its duration
    try:
        for target in checkpoints:
            pos, timings = fill_segment(client, index, vectors, pos, target, admitted,
                                        dup_flag)
            size = index.size()
            row = {"quantization": quantization, "build_ef": build_ef, "offload": offload,
                   "vector_precision": precision, "size": size, "offered": pos, **timings,
                   "bytes_per_item": _bytes(client, index) / max(size, 1)}
            row["recall_at_1"] = _recall(client, index.key, vectors, admitted, queries)
            row["pairs_within_threshold"], row["pairs_checked_rows"] = pairs_within(
                vectors, admitted, settings.threshold)
            row.update(decision_agreement(vectors[:pos], admitted, dup_flag[:pos],
                                           settings.threshold))
            row.update(planted_recall(index, vectors, admitted, settings.threshold))
            rows.append(row)
    finally:
        index.clear()
        slowlog_config(client, 10_000)
    return rows


def measure_workers(client: Any, vectors: np.ndarray, workers: int, offload: bool
                    ) -> dict[str, Any]:
    """``workers`` threads, each its own connection and ``VectorIndex`` on one fresh
    namespace, admit disjoint slices of ``vectors`` at once: aggregate admissions/s."""
    import redis

    from agents.config import DedupSettings
    from agents.index import VectorIndex

    namespace = f"bench-{uuid.uuid4().hex}"
    where = client.connection_pool.connection_kwargs
    indexes = [VectorIndex(redis.Redis(host=where["host"], port=where["port"]), namespace,
                           DedupSettings(offload=offload)) for _ in range(workers)]
    slices = np.array_split(np.arange(len(vectors)), workers)
    barrier = threading.Barrier(workers)
    holds: list[float] = []

    def work(index: Any, rows: np.ndarray) -> None:
        barrier.wait()
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            index.admit([str(i) for i in chunk], vectors[chunk])
            holds.append(index.last_hold_s)

    threads = [threading.Thread(target=work, args=pair) for pair in zip(indexes, slices,
                                                                       strict=True)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    try:
        return {"workers": workers, "offload": offload, "items": len(vectors),
                "admit_per_s": len(vectors) / elapsed,
                "size": indexes[0].size(),
                "races_lost": sum(i.counts["race_lost"] for i in indexes),
                "script_p99_ms": float(np.percentile(holds, 99) * 1e3)}
    finally:
        indexes[0].clear()
        for index in indexes:
            index.client.close()


def _bytes(client: Any, index: Any) -> int:
    """Every key of the index, measured whole (``MEMORY USAGE … SAMPLES 0``)."""
    return sum(int(client.memory_usage(key, samples=0) or 0)
               for key in (index.key, index.vectors_key, index.log_key))


def planted_recall(index: Any, vectors: np.ndarray, admitted: list[int],
             threshold: float) -> dict[str, float]:
    """Planted near-copies of admitted items, admitted through the product: the share
    rejected as duplicates (each is within ``threshold`` of its admitted original)."""
    copies = planted_copies(vectors[admitted], PLANTED, threshold)
    caught = 0
    for start in range(0, PLANTED, BATCH):
        ids = [f"planted-{uuid.uuid4().hex}" for _ in range(min(BATCH, PLANTED - start))]
        decisions = index.admit(ids, copies[start:start + len(ids)])
        caught += sum(not d.keep for d in decisions)
    return {"planted": PLANTED, "planted_recall": caught / PLANTED}


def pairs_within(vectors: np.ndarray, admitted: list[int], threshold: float
                  ) -> tuple[int, int]:
    """Brute force: admitted pairs at FP32 cosine ≥ ``threshold`` (0 when every decision
    was right), among a sample of up to ``PAIR_SAMPLE`` admitted rows against all."""
    base = vectors[admitted]
    rng = np.random.default_rng(2)
    sample = rng.choice(len(base), size=min(PAIR_SAMPLE, len(base)), replace=False)
    pairs = 0
    for start in range(0, len(sample), 256):  # 256 × 1M float32 = 1 GiB at a time
        block = sample[start:start + 256]
        cos = base[block] @ base.T
        cos[np.arange(len(block)), block] = -1.0  # not with itself
        pairs += int((cos >= threshold).sum())
    return pairs, len(sample)


def _recall(client: Any, key: str, vectors: np.ndarray, admitted: list[int],
            queries: np.ndarray) -> float:
    """Share of held-out queries whose VSIM top hit is numpy's nearest admitted vector."""
    base = vectors[admitted]
    truth = np.asarray(admitted)[np.argmax(queries @ base.T, axis=1)]
    pipe = client.pipeline(transaction=False)
    for q in queries:
        pipe.execute_command("VSIM", key, "FP32", q.astype("<f4").tobytes(), "COUNT", 4)
    hits = [int(r[0]) if r else -1 for r in pipe.execute()]
    return float(np.mean(np.asarray(hits) == truth))


def decision_agreement(vectors: np.ndarray, admitted: list[int], dup_flag: np.ndarray,
                        threshold: float) -> dict[str, float]:
    """Brute force: was each offered item within ``threshold`` of an earlier admitted one?
    Every item up to ``DECISION_SAMPLE`` offered, a random sample of that many beyond."""
    adm = np.asarray(admitted)
    rows = np.arange(len(vectors))
    if len(rows) > DECISION_SAMPLE:
        rows = np.sort(np.random.default_rng(3).choice(rows, DECISION_SAMPLE, replace=False))
    truth = np.zeros(len(rows), dtype=bool)
    base = vectors[adm]
    for start in range(0, len(rows), 256):
        block = rows[start:start + 256]
        cos = vectors[block] @ base.T
        earlier = adm[None, :] < block[:, None]
        truth[start:start + len(block)] = ((cos >= threshold) & earlier).any(axis=1)
    flagged = dup_flag[rows]
    both = int((truth & flagged).sum())
    return {"decisions_checked": len(rows),
            "true_duplicates": int(truth.sum()), "flagged": int(flagged.sum()),
            "dup_recall": both / max(int(truth.sum()), 1),
            "dup_precision": both / max(int(flagged.sum()), 1)}


def run(quick: bool) -> dict[str, Any]:
    """Every configuration; writes bench/results/index[-quick].json."""
    n_real = 11_000 if quick else 13_000
    real = real_vectors(n_real + HELD_OUT)
    queries, real = real[-HELD_OUT:], real[:-HELD_OUT]
    big = 10_000 if quick else 100_000
    vectors = vectors_for(big, real)
    configs: list[tuple[str, int, bool, list[int], str]] = [
        ("int8", 100, False, [3_000, 10_000] if quick else [10_000, 100_000], "fp32"),
        ("int8", 100, True, [3_000, 10_000] if quick else [10_000, 100_000], "fp32"),
        ("int8", 100, False, [3_000, 10_000] if quick else [10_000, 100_000], "fp16"),
        ("noquant", 100, False, [3_000] if quick else [10_000], "fp32")]
    results = []
    previous = _previous_design(quick)
    with private_redis() as client:
        for quantization, ef, offload, checkpoints, precision in configs:
            results += measure(client, vectors, queries, checkpoints, quantization, ef,
                               offload, precision)
    show(f"semantic admission through VectorIndex.admit (batches of {BATCH}, real "
         f"embeddings; recall on {HELD_OUT} held-out real lines; longest = longest server "
         "call of each admit, by SLOWLOG; script = the product's admit.hold_s)",
         ["quant", "vectors", "offload", "size", "admit/s", "× before", "call p50 ms",
          "longest p50 ms", "longest p99 ms", "longest p99 × before", "script p99 ms",
          "B/item", "recall@1",
          "planted recall", "pairs ≥ thr", "dup recall", "dup precision"],
         [[r["quantization"], r.get("vector_precision", "fp32"), r["offload"], r["size"],
           r["admit_per_s"], _ratio(r, previous, "admit_per_s", "admit_per_s"),
           r["call_p50_ms"],
           r["longest_p50_ms"], r["longest_p99_ms"],
           _ratio(r, previous, "longest_p99_ms", "hold_p99_ms"), r["script_p99_ms"],
           r["bytes_per_item"], r["recall_at_1"], r["planted_recall"],
           f"{r['pairs_within_threshold']} / {r['pairs_checked_rows']} rows",
           r.get("dup_recall", float("nan")), r.get("dup_precision", float("nan"))]
          for r in results])
    concurrent = []
    with private_redis() as client:
        for offload in (False, True):
            for workers in (1, 2):
                concurrent.append(measure_workers(
                    client, vectors[:4_000 if quick else 10_000], workers, offload))
    show("workers admitting one fresh index at once (threads, own connections)",
         ["workers", "offload", "items", "admit/s", "× one worker", "races lost",
          "script p99 ms"],
         [[r["workers"], r["offload"], r["items"], r["admit_per_s"],
           r["admit_per_s"] / next(o["admit_per_s"] for o in concurrent
                                   if o["offload"] == r["offload"]),
           r["races_lost"], r["script_p99_ms"]] for r in concurrent])
    payload = {"design": DESIGN, "batch": BATCH, "real_vectors": len(real), "rows": results,
               "workers": concurrent,
               "previous_design": previous,
               "note": "vectors beyond real_vectors are normalized means of two real ones; "
                       "planted copies are FP32 near-copies of admitted rows at cosine "
                       "uniform in [threshold + 0.002, 0.998]"}
    write_result("index", quick, payload)
    return payload


def _previous_design(quick: bool) -> list[dict[str, Any]]:
    """The rows of the whole-batch-script design (the admission this one replaced), as
    its last run of this benchmark measured them on this machine; carried forward."""
    path = RESULTS / f"index{'-quick' if quick else ''}.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if old.get("design") == DESIGN:
        return list(old.get("previous_design", []))
    return list(old.get("rows", []))


def _ratio(row: dict[str, Any], previous: list[dict[str, Any]], key: str, old_key: str
           ) -> float:
    """``row[key]`` over the previous design's figure for the same configuration and
    size (NaN when it has none)."""
    for old in previous:
        same = (old["quantization"], old["build_ef"], old["size"] // 1000) == (
            row["quantization"], row["build_ef"], row["size"] // 1000)
        if same and old.get(old_key):
            return float(row[key]) / float(old[old_key])
    return float("nan")


def seed_cache_from(lines_txt: Path, lines_npy: Path) -> None:
    """Reuse an earlier embedding of the same stdlib lines (e.g. /tmp/vsx) as the cache."""
    texts = lines_txt.read_text().split("\n")
    if texts != stdlib_lines()[:len(texts)]:
        raise SystemExit("those lines are not this machine's stdlib lines")
    vectors = np.load(lines_npy)
    # embed_cached's key for these texts: write through it with a stub embedder.
    class _Stub:
        def encode(self, chunk: list[str], max_chunks: int | None = None) -> np.ndarray:
            start = texts.index(chunk[0])
            return vectors[start:start + len(chunk)]

    CACHE.mkdir(parents=True, exist_ok=True)
    for n in (11_000 + HELD_OUT, 13_000 + HELD_OUT):
        if n <= len(texts):
            embed_cached(texts[:n], "torch", embedder=_Stub())


def main(argv: list[str] | None = None) -> None:
    """``--quick``, and ``--shards N [--probe P]`` for the sharded comparison."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.index")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--shards", type=int, default=0,
                        help="compare one set with this many shards on a Redis Cluster")
    parser.add_argument("--probe", type=int, default=2, help="shards probed (with --shards)")
    parser.add_argument("--size", type=int, default=None,
                        help="items offered per index with --shards (default 100k, 10k quick)")
    parser.add_argument("--configs", default=None,
                        help="with --shards: only these SHARDS:PROBE indexes, e.g. '3:2,1:1'")
    parser.add_argument("--workers", type=int, default=2,
                        help="with --shards: threads for the aggregate rate (0: skip it)")
    args = parser.parse_args(argv)
    if args.shards > 1:
        configs = ([(int(a), int(b)) for a, b in
                    (pair.split(":") for pair in args.configs.split(","))]
                   if args.configs else None)
        from bench.index_shards import run_shards

        run_shards(args.quick, args.shards, args.probe, args.size, configs, args.workers)
    else:
        run(args.quick)


if __name__ == "__main__":
    main()
