"""Dedup quality and speed against the usual peers, on one real corpus, in one run.

``python -m bench.peers [--quick]``

Corpus: real files (Debian copyright files and licenses, site-packages and stdlib sources)
with their natural duplicates, plus planted near copies (lines dropped, a line of another
file inserted, a line repeated), in stream order. Ground truth: an item is a duplicate
when the exact Jaccard of its word 5-shingle set with some earlier item is ≥ 0.8.

Methods, each deciding every item in stream order (earlier wins):

- exact-hash: SHA-256 of the normalized content;
- MinHash-LSH: datasketch's in-memory ``MinHashLSH`` (128 permutations, Jaccard 0.8) over
  the same word 5-shingles;
- brute-force cosine: every pair of (chunk-mean MiniLM) embeddings at the dedup threshold;
- sluice exact + fuzzy: ``agents.pipeline.build_pipeline`` with stages ``ingest``
  (validate and quality, exact digest, MinHash in Redis);
- sluice all layers: ``build_pipeline`` with stages ``ingest, dedup`` (+ model and vector
  set), the composition the worker and ``sluice dedup`` run.

Items/s for brute-force cosine excludes embedding (reported apart); sluice's includes it.
Quality rejections of sluice's ingest count as "not a duplicate" (they are a different
decision) and are reported.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from typing import Any

import numpy as np

from bench.common import dedup_corpus, embed_cached, private_redis, quick_flag, show, write_result

WORD = re.compile(r"\w+")
DUPLICATES = {"exact_duplicate", "near_duplicate", "semantic_duplicate"}


def shingles(text: str, k: int = 5) -> frozenset[str]:
    """Word k-shingles (lower-cased ``\\w+`` runs); a short text is one shingle."""
    words = WORD.findall(text.lower())
    if len(words) < k:
        return frozenset({" ".join(words)}) if words else frozenset()
    return frozenset(" ".join(words[i:i + k]) for i in range(len(words) - k + 1))


def truth(sets: list[frozenset[str]], threshold: float = 0.8) -> np.ndarray:
    """Exact: is item i within Jaccard ``threshold`` of some earlier item?"""
    dup = np.zeros(len(sets), dtype=bool)
    sizes = [len(s) for s in sets]
    for i, a in enumerate(sets):
        for j in range(i):
            b = sets[j]
            small, large = sorted((sizes[i], sizes[j]))
            if large == 0 or small < threshold * large:  # Jaccard ≤ small / large
                continue
            inter = len(a & b)
            if inter / (sizes[i] + sizes[j] - inter) >= threshold:
                dup[i] = True
                break
    return dup


def exact_hash(texts: list[str]) -> np.ndarray:
    from agents.normalize import normalize

    seen: set[str] = set()
    out = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        digest = hashlib.sha256(normalize(text).encode()).hexdigest()
        out[i] = digest in seen
        seen.add(digest)
    return out


def minhash_lsh(sets: list[frozenset[str]], threshold: float = 0.8) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    out = np.zeros(len(sets), dtype=bool)
    for i, shingle_set in enumerate(sets):
        sig = MinHash(num_perm=128)
        sig.update_batch([s.encode() for s in shingle_set])
        if lsh.query(sig):
            out[i] = True
        else:
            lsh.insert(str(i), sig)
    return out


def brute_cosine(vectors: np.ndarray, threshold: float) -> np.ndarray:
    from bench.embed import greedy_keep

    return ~greedy_keep(vectors, threshold)


def sluice_layers(client: Any, corpus: list[tuple[str, str]], semantic: bool) -> tuple[
        np.ndarray, int]:
    """sluice's own pipeline (``build_pipeline``, stages ingest or ingest,dedup; it loads
    the model, one torch thread) over the corpus as JSON events, in micro-batches of
    ``dedup.batch_size`` as ``sluice dedup`` runs; (duplicate flags, quality drops)."""
    import json

    from agents.pipeline import build_pipeline
    from agents.step import Coords, Item
    from sluice.settings import load_settings

    settings = load_settings(dedup={"torch_threads": 1})  # the backend: as configured
    stages = ("ingest", "dedup") if semantic else ("ingest",)
    pipeline = build_pipeline(settings, client, stages=stages, namespace=uuid.uuid4().hex)
    flags: list[bool] = []
    quality = 0
    batch = settings.dedup.batch_size
    for start in range(0, len(corpus), batch):
        part = corpus[start:start + batch]
        items = [Item(json.dumps({"id": f"{start + k}", "source": "bench",
                                  "kind": "CODE" if item_id.startswith(("site", "std"))
                                  else "TEXT", "content": text}).encode(),
                      Coords("bench", 0, start + k))
                 for k, (item_id, text) in enumerate(part)]
        for outcome in pipeline.run(items):
            flags.append(outcome.reason in DUPLICATES)
            quality += bool(outcome.reason and outcome.reason.startswith("quality"))
    return np.array(flags), quality


def scores(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    tp = int((pred & gold).sum())
    precision = tp / max(int(pred.sum()), 1)
    recall = tp / max(int(gold.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"flagged": int(pred.sum()), "precision": precision, "recall": recall, "f1": f1}


def run(quick: bool) -> dict[str, Any]:
    """All methods; writes bench/results/peers[-<backend>][-quick].json (no suffix for
    torch)."""
    from agents.config import DedupSettings

    threshold = DedupSettings().threshold
    corpus = dedup_corpus(240 if quick else 600, 40 if quick else 120,
                          max_bytes=3_000 if quick else 6_000)
    texts = [t for _, t in corpus]
    sets = [shingles(t) for t in texts]
    gold = truth(sets)
    started = time.perf_counter()
    vectors = embed_cached(texts, "torch")
    embed_s = time.perf_counter() - started
    results: dict[str, Any] = {}

    def record(name: str, pred: np.ndarray, seconds: float, **extra: Any) -> None:
        results[name] = {**scores(pred, gold), "items_per_s": len(texts) / seconds, **extra}

    t = time.perf_counter()
    record("exact-hash", exact_hash(texts), time.perf_counter() - t)
    t = time.perf_counter()
    record("MinHash-LSH (datasketch)", minhash_lsh(sets), time.perf_counter() - t)
    t = time.perf_counter()
    record(f"brute-force cosine ≥ {threshold}", brute_cosine(vectors, threshold),
           time.perf_counter() - t, embedding_s_if_cached=embed_s)
    with private_redis() as client:
        for name, semantic in (("sluice exact + fuzzy", False), ("sluice all layers", True)):
            t = time.perf_counter()
            pred, quality = sluice_layers(client, corpus, semantic)
            record(name, pred, time.perf_counter() - t, quality_rejected=quality)
    # The goal: sluice's time over the same files within 20x datasketch's.
    bare = results["MinHash-LSH (datasketch)"]["items_per_s"]
    for r in results.values():
        r["time_vs_datasketch"] = bare / r["items_per_s"]
    show(f"dedup vs peers: {len(texts)} real files, {int(gold.sum())} duplicates by exact "
         "word 5-shingle Jaccard ≥ 0.8", ["method", "flagged", "precision", "recall", "F1",
                                          "items/s", "time vs datasketch"],
         [[name, r["flagged"], r["precision"], r["recall"], r["f1"], r["items_per_s"],
           f"{r['time_vs_datasketch']:.1f}x"] for name, r in results.items()])
    payload = {"items": len(texts), "true_duplicates": int(gold.sum()), "methods": results,
               "note": "brute-force cosine items/s excludes embedding; sluice's includes it"}
    from sluice.settings import load_settings

    backend = load_settings().dedup.backend  # as sluice_layers ran (SLUICE_DEDUP__BACKEND)
    payload["backend"] = backend
    write_result("peers" if backend == "torch" else f"peers-{backend}", quick, payload)
    return payload


if __name__ == "__main__":
    run(quick_flag())
