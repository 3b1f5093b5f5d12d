"""The vector-set admission index at scale, on real embeddings.

``python -m bench.index [--quick]``

Vectors: all-MiniLM-L6-v2 embeddings of distinct lines of the standard library's sources
(cached under ~/.cache/sluice/bench/ after the first run; 14k lines take ~5 min to embed
here). Beyond the real lines, the larger sets are normalized means of two random real
embeddings (what the embedding of two lines pasted together looks like, roughly), so the
index still sees the clustered geometry of real text — random vectors would make HNSW look
far worse (recall ≈ 0.4) and far faster than it is.

For each configuration (quantization Q8/NOQUANT/BIN, build EF) the set is filled through
``VectorIndex.admit`` in micro-batches of 32, as the dedup agent does, and measured at each
size checkpoint: admission throughput, p50/p99 round trip per call, the server's own time
per call (``INFO commandstats`` of EVALSHA: the time the script holds the whole server),
memory per item (``MEMORY USAGE``), recall@1 of ``VSIM`` against numpy brute force on
held-out real lines, and agreement of the duplicate decisions with brute force.
"""

from __future__ import annotations

import sysconfig
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CACHE, embed_cached, private_redis, quick_flag, show, write_result

BATCH = 32
HELD_OUT = 1000


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


def _evalsha(client: Any) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(stats["calls"]), int(stats["usec"])


def measure(client: Any, vectors: np.ndarray, queries: np.ndarray, checkpoints: list[int],
            quantization: str, build_ef: int) -> list[dict[str, Any]]:
    """Fill one set through ``VectorIndex.admit``; measure at each checkpoint."""
    from agents.config import DedupSettings
    from agents.index import VectorIndex

    settings = DedupSettings(quantization=quantization, build_ef=build_ef)
    index = VectorIndex(client, f"bench-{uuid.uuid4().hex}", settings)
    rows: list[dict[str, Any]] = []
    pos = 0
    admitted: list[int] = []
    dup_flag = np.zeros(len(vectors), dtype=bool)
    try:
        for target in checkpoints:
            walls, holds = [], []
            t0 = time.perf_counter()
            start_pos = pos
            while pos < min(target, len(vectors)):
                ids = [str(i) for i in range(pos, min(pos + BATCH, target))]
                calls0, usec0 = _evalsha(client)
                decisions = index.admit(ids, vectors[pos:pos + len(ids)])
                calls1, usec1 = _evalsha(client)
                walls.append(index.last_call_s)
                holds.append((usec1 - usec0) / 1e6 / max(calls1 - calls0, 1))
                for offset, decision in enumerate(decisions):
                    if decision.keep:
                        admitted.append(pos + offset)
                    else:
                        dup_flag[pos + offset] = True
                pos += len(ids)
            elapsed = time.perf_counter() - t0
            size = index.size()
            row = {"quantization": quantization, "build_ef": build_ef, "size": size,
                   "offered": pos, "admit_per_s": (pos - start_pos) / elapsed,
                   "call_p50_ms": float(np.percentile(walls, 50) * 1e3),
                   "call_p99_ms": float(np.percentile(walls, 99) * 1e3),
                   "hold_p50_ms": float(np.percentile(holds, 50) * 1e3),
                   "hold_p99_ms": float(np.percentile(holds, 99) * 1e3),
                   "bytes_per_item": index.memory_bytes() / max(size, 1)}
            row["recall_at_1"] = _recall(client, index.key, vectors, admitted, queries)
            if pos <= 20_000:  # brute-force decisions: quadratic, so only on small sets
                row.update(_decision_agreement(vectors[:pos], admitted, dup_flag[:pos],
                                               settings.threshold))
            rows.append(row)
    finally:
        index.clear()
    return rows


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


def _decision_agreement(vectors: np.ndarray, admitted: list[int], dup_flag: np.ndarray,
                        threshold: float) -> dict[str, float]:
    """Brute force: was each offered item within ``threshold`` of an earlier admitted one?"""
    adm = np.asarray(admitted)
    truth = np.zeros(len(vectors), dtype=bool)
    for start in range(0, len(vectors), 2048):
        block = vectors[start:start + 2048] @ vectors[adm].T
        earlier = adm[None, :] < np.arange(start, start + len(block))[:, None]
        truth[start:start + len(block)] = ((block >= threshold) & earlier).any(axis=1)
    both = int((truth & dup_flag).sum())
    return {"true_duplicates": int(truth.sum()), "flagged": int(dup_flag.sum()),
            "dup_recall": both / max(int(truth.sum()), 1),
            "dup_precision": both / max(int(dup_flag.sum()), 1)}


def run(quick: bool) -> dict[str, Any]:
    """All configurations; writes bench/results/index[-quick].json."""
    n_real = 11_000 if quick else 13_000
    real = real_vectors(n_real + HELD_OUT)
    queries, real = real[-HELD_OUT:], real[:-HELD_OUT]
    big = 10_000 if quick else 100_000
    vectors = vectors_for(big, real)
    configs: list[tuple[str, int, list[int]]] = [("int8", 100, [10_000] if quick
                                                  else [10_000, 100_000])]
    small = [3_000] if quick else [10_000]
    configs += [("int8", 200, small), ("noquant", 100, small), ("bin", 100, small)]
    results = []
    with private_redis() as client:
        for quantization, ef, checkpoints in configs:
            results += measure(client, vectors, queries, checkpoints, quantization, ef)
    show(f"vector-set admission through VectorIndex.admit (batches of {BATCH}, real "
         "embeddings; recall on 1000 held-out real lines)",
         ["quant", "EF", "size", "admit/s", "call p50 ms", "call p99 ms", "hold p50 ms",
          "hold p99 ms", "B/item", "recall@1", "dup recall", "dup precision"],
         [[r["quantization"], r["build_ef"], r["size"], r["admit_per_s"], r["call_p50_ms"],
           r["call_p99_ms"], r["hold_p50_ms"], r["hold_p99_ms"], r["bytes_per_item"],
           r["recall_at_1"], r.get("dup_recall", float("nan")),
           r.get("dup_precision", float("nan"))] for r in results])
    payload = {"batch": BATCH, "real_vectors": len(real), "rows": results,
               "note": "vectors beyond real_vectors are normalized means of two real ones"}
    write_result("index", quick, payload)
    return payload


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


if __name__ == "__main__":
    run(quick_flag())
