"""Embedding backends side by side: throughput and dedup agreement with torch fp32.

``python -m bench.embed [--quick]``

1. Throughput of the bare model (no chunking) for torch, ONNX fp32, ONNX int8 and the
   model2vec static model distilled from it, on short real source lines (batch 64) and on
   256-token windows of real stdlib files (batch 32), one thread each, backends
   interleaved so that a busy machine hurts them alike.
2. Agreement: real files with their natural duplicates plus planted near copies, embedded
   (chunked, as sluice does) by each backend and admitted in stream order at the default
   threshold through ``VectorIndex`` (separate namespaces of one Redis) and by exact numpy
   greedy admission; the share of keep/drop decisions equal to torch's, the cosines to
   torch's vectors (not for ``static``: its vectors live in another space, a PCA rotation
   of the token vectors, so only decisions and neighbours compare), how often the nearest
   neighbour changes, and the threshold at which each backend agrees best with torch at
   the default one (scanned from 0.05 below it to 0.9975 in steps of 0.0025, and 0.999: a
   static model puts unrelated texts closer together, so it needs a higher one).
"""

from __future__ import annotations

import statistics
import uuid
from functools import partial
from typing import Any

import numpy as np

from bench.common import (
    dedup_corpus,
    embed_cached,
    private_redis,
    quick_flag,
    show,
    source_lines,
    stdlib_files,
    timed,
    write_result,
)

BACKENDS = ("torch", "onnx", "onnx-int8", "static")
#: Backends whose vectors are in torch's space (the others compare by decisions only).
SAME_SPACE = ("torch", "onnx", "onnx-int8")


def throughput(quick: bool) -> dict[str, Any]:
    """Texts/s per backend on short lines and on full windows; ratios to torch."""
    from agents.config import DedupSettings
    from agents.embed import Embedder

    lines = source_lines(192 if quick else 1024, seed=1)
    probe = Embedder(DedupSettings(device="cpu"), threads=1)
    windows = [w for _, text in stdlib_files(40 if quick else 120, 6_000)
               for w in probe.chunks([text], max_chunks=2)[0]][:32 if quick else 192]
    embedders = {b: Embedder(DedupSettings(device="cpu", backend=b, encode_batch_size=bs),
                             threads=1)
                 for b in BACKENDS for bs in [64]}
    window_batch = 32
    rates: dict[str, dict[str, list[float]]] = {b: {"lines": [], "windows": []} for b in BACKENDS}
    for _ in range(1 if quick else 3):
        for backend, embedder in embedders.items():
            embedder.encode_windows(lines[:16])  # warm up: first call allocates
            _, dt = timed(partial(embedder.encode_windows, lines))
            rates[backend]["lines"].append(len(lines) / dt)
            saved = embedder.settings
            embedder.settings = saved.model_copy(update={"encode_batch_size": window_batch})
            _, dt = timed(partial(embedder.encode_windows, windows))
            embedder.settings = saved
            rates[backend]["windows"].append(len(windows) / dt)
    tokens = [len(t) for t in probe.tokenizer(lines[:256])["input_ids"]]
    out = {b: {k: statistics.median(v) for k, v in r.items()} for b, r in rates.items()}
    rows = [[b, out[b]["lines"], out[b]["lines"] / out["torch"]["lines"],
             out[b]["windows"], out[b]["windows"] / out["torch"]["windows"]] for b in BACKENDS]
    show(f"bare model throughput, 1 thread ({len(lines)} lines of ~{np.mean(tokens):.0f} "
         f"tokens, batch 64; {len(windows)} windows of ≤256 tokens, batch {window_batch})",
         ["backend", "lines/s", "× torch", "windows/s", "× torch"], rows)
    return {"lines": len(lines), "line_tokens_mean": float(np.mean(tokens)),
            "windows": len(windows), "rates": out, "samples": rates}


def greedy_keep(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Exact stream-order admission: keep an item unless a kept one has cosine ≥ threshold."""
    keep = np.zeros(len(vectors), dtype=bool)
    sims = vectors @ vectors.T
    for i in range(len(vectors)):
        kept = np.flatnonzero(keep[:i])
        keep[i] = not (kept.size and sims[i, kept].max() >= threshold)
    return keep


def index_keep(client: Any, vectors: np.ndarray, batch: int = 32) -> np.ndarray:
    """Stream-order admission through sluice's VectorIndex (default settings)."""
    from agents.config import DedupSettings
    from agents.index import VectorIndex

    index = VectorIndex(client, f"bench-{uuid.uuid4().hex}", DedupSettings())
    keep: list[bool] = []
    try:
        for start in range(0, len(vectors), batch):
            ids = [str(i) for i in range(start, min(start + batch, len(vectors)))]
            keep += [a.keep for a in index.admit(ids, vectors[start:start + batch])]
    finally:
        index.clear()
    return np.array(keep)


def agreement(quick: bool) -> dict[str, Any]:
    """Keep/drop agreement with torch fp32 at the default threshold, and recalibration."""
    from agents.config import DedupSettings

    threshold = DedupSettings().threshold
    corpus = dedup_corpus(240 if quick else 600, 40 if quick else 120,
                          max_bytes=3_000 if quick else 6_000)
    texts = [t for _, t in corpus]
    vectors = {b: embed_cached(texts, b) for b in BACKENDS}
    ref = vectors["torch"]
    ref_keep = greedy_keep(ref, threshold)
    n = len(texts)
    ref_nn = _nearest(ref)
    results: dict[str, Any] = {"items": n, "threshold": threshold,
                               "torch_kept": int(ref_keep.sum())}
    rows = []
    with private_redis() as client:
        ref_index = index_keep(client, ref)
        for backend in BACKENDS:
            vec = vectors[backend]
            cos = (vec * ref).sum(axis=1)
            same = backend in SAME_SPACE
            keep = greedy_keep(vec, threshold)
            via_index = index_keep(client, vec) if backend != "torch" else ref_index
            scan = np.round(np.append(np.arange(threshold - 0.05, 0.99751, 0.0025), 0.999), 4)
            best = max(scan, key=lambda t: ((greedy_keep(vec, t) == ref_keep).mean(),
                                            -abs(t - threshold)))
            results[backend] = {
                "cos_min": float(cos.min()) if same else None,
                "cos_mean": float(cos.mean()) if same else None,
                "cos_p1": float(np.percentile(cos, 1)) if same else None,
                "nn_changed": float((_nearest(vec) != ref_nn).mean()),
                "kept": int(keep.sum()),
                "agree_exact": float((keep == ref_keep).mean()),
                "agree_index": float((via_index == ref_index).mean()),
                "index_vs_exact_same_backend": float((via_index == keep).mean()),
                "best_threshold": float(best),
                "agree_at_best": float((greedy_keep(vec, best) == ref_keep).mean()),
            }
            r = results[backend]
            rows.append([backend, r["cos_min"] if same else "-", r["cos_mean"] if same else "-",
                         f"{100 * r['nn_changed']:.1f} %",
                         r["kept"], f"{100 * r['agree_exact']:.2f} %",
                         f"{100 * r['agree_index']:.2f} %", r["best_threshold"],
                         f"{100 * r['agree_at_best']:.2f} %"])
    show(f"dedup agreement with torch fp32 at cosine {threshold} ({n} real files incl. "
         f"natural duplicates and planted near copies; torch keeps {results['torch_kept']})",
         ["backend", "min cos", "mean cos", "NN changed", "kept", "agree (exact)",
          "agree (VectorIndex)", "best thr.", "agree there"], rows)
    return results


def _nearest(vectors: np.ndarray) -> np.ndarray:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -2.0)
    return sims.argmax(axis=1)


def run(quick: bool) -> dict[str, Any]:
    """Both parts; writes bench/results/embed[-quick].json."""
    payload = {"throughput": throughput(quick), "agreement": agreement(quick)}
    write_result("embed", quick, payload)
    return payload


if __name__ == "__main__":
    run(quick_flag())
