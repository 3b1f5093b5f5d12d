"""Each arm's batches: the raw stream cut into batches, and the curated ones — the
product's pipeline (``agents.pipeline.build_pipeline``) over the offered stream, then the
product's ``Balance`` step under trainer pacing, asked for exactly the batches the trainer
will consume (steps 4–5 of ``bench.curated_vs_raw``'s method)."""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import numpy as np

#: Records handed to the pipeline and to the balance step per call (the agents' take).
MICRO_BATCH = 32


def raw_batches(records: list[dict[str, Any]], vectors: np.ndarray, stream: list[int],
                digests: list[str], steps: int, batch_size: int) -> list[dict[str, Any]]:
    """``steps`` batches of the stream in order, nothing dropped (policy ``raw``): its first
    ``steps × batch_size`` records, the stream cycled when it is shorter."""
    from agents.compose import assemble_batch
    from schemas.embedding import encode_embedding

    shares = _shares(Counter(records[i]["label"] for i in stream))
    batches = []
    for seq in range(steps):
        samples = []
        for n in range(seq * batch_size, (seq + 1) * batch_size):
            i = stream[n % len(stream)]
            blob = encode_embedding(vectors[i])
            samples.append({**records[i], "digest": digests[i], "embedding": blob,
                            "embedding_dim": len(blob) // 2})
        batches.append(dict(assemble_batch(
            partition=0, sequence=seq, samples=samples, policy="raw", class_shares=shares,
            target_shares=shares, weights={}, difficulty=None,
            created_at=int(time.time() * 1000))))
    return batches


def curate(settings: Any, records: list[dict[str, Any]], stream: list[int],
           cache: dict[str, np.ndarray]) -> tuple[list[Any], dict[str, Any]]:
    """The product's ingest → dedup pipeline (``agents.pipeline.build_pipeline``) over the
    offered stream, in micro-batches of 32 against Redis in a fresh namespace: the
    CuratedSamples kept, in order, and what was rejected (by reason, and by class and
    reason)."""
    from agents.pipeline import build_pipeline
    from agents.step import Coords, Item
    from schemas.records import RawEvent
    from streams.connections import redis_client
    from streams.serde import encode

    client = redis_client(settings.redis)
    pipeline = build_pipeline(settings, client, namespace=f"bench-{os.urandom(6).hex()}",
                              embedder=cached_embedder(settings, cache))
    reasons: Counter[str] = Counter()
    by_class: Counter[str] = Counter()
    kept: list[Any] = []
    tick = time.perf_counter()
    try:
        for start in range(0, len(stream), MICRO_BATCH):
            items = []
            for offset, i in enumerate(stream[start:start + MICRO_BATCH], start):
                rec = records[i]
                event = RawEvent(id=rec["id"], source=rec["source"], kind=rec["kind"],
                                 language=rec["label"], label=rec["label"],
                                 content=rec["content"], timestamp=int(time.time() * 1000),
                                 attributes={})
                items.append(Item(encode("RawEvent", event), Coords("bench-raw", 0, offset),
                                  rec["id"].encode()))
            for outcome in pipeline.run(items):
                if outcome.rejected:
                    reason = f"{outcome.record['stage']}:{outcome.reason}"
                    reasons[reason] += 1
                    by_class[f"{outcome.record['label']}/{reason}"] += 1
                else:
                    kept.append(outcome.record)
    finally:
        client.close()
    return kept, {"offered": len(stream), "kept": len(kept),
                  "kept_by_class": dict(Counter(s["label"] for s in kept).most_common()),
                  "rejected": dict(reasons.most_common()),
                  "rejected_by_class": dict(by_class.most_common()),
                  "seconds": round(time.perf_counter() - tick, 1)}


def paced_batches(settings: Any, samples: list[Any], policy: str, steps: int,
                  batch_size: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ``Balance`` step with ``pace = trainer`` (one partition, fresh namespace): every
    kept sample is buffered first (arrivals compose nothing under this pace), then the
    step is asked, ``ahead_batches`` at a time as the agent asks it, for the ``steps``
    batches the trainer consumes, each composed from the whole pool; every batch is
    confirmed as sent. Returns the batches and how the composition went: ``starved_at``
    (the pool gave less than was asked: the rest is cycled), ``short_batches`` (composed
    while the pool could not meet the targets, the step's ``batches.short``) and
    ``short_from`` (batches composed before the first call that had such a batch)."""
    from agents.balance import Balance
    from agents.buffers import buffers_for
    from agents.feedback import LossStore
    from streams.connections import redis_client

    config = settings.balance.model_copy(update={"policy": policy, "batch_size": batch_size,
                                                 "pace": "trainer"})
    namespace = f"bench-{os.urandom(6).hex()}"
    client = redis_client(settings.redis)
    buffers = buffers_for(client, namespace, 0, config)
    step = Balance(config, buffers, LossStore(client, namespace))
    batches: list[dict[str, Any]] = []
    starved_at: int | None = None
    short_from: int | None = None
    try:
        buffer_all(step, samples)
        pool = dict(buffers.sizes())
        while len(batches) < steps:
            asked = min(config.ahead_batches, steps - len(batches))
            drawn = step.paced(asked)
            for batch in drawn:
                step.confirm(batch)
            if short_from is None and step.counters["batches.short"]:
                short_from = len(batches)
            batches += [dict(b) for b in drawn]
            # ``starved`` also says a batch could not meet the targets; only a pool that
            # gives less than was asked ends the run.
            if len(drawn) < asked:
                starved_at = len(batches)
                break
    finally:
        client.close()
    return batches, {"policy": step.policy, "pool": pool, "composed": len(batches),
                     "starved_at": starved_at, "short_batches": step.counters["batches.short"],
                     "short_from": short_from, "reuse_cap": config.reuse_cap}


def buffer_all(step: Any, samples: list[Any]) -> None:
    """Hand every kept sample to a ``Balance`` step paced by the trainer, in micro-batches
    as the agent takes them (arrivals compose nothing under that pace)."""
    from agents.step import Coords, Item

    for start in range(0, len(samples), MICRO_BATCH):
        items = [Item(s, Coords("bench-samples", 0, offset))
                 for offset, s in enumerate(samples[start:start + MICRO_BATCH], start)]
        if step.run(items):
            raise RuntimeError("pace = trainer composed a batch on arrivals")


def cached_embedder(settings: Any, cache: dict[str, np.ndarray]) -> Any:
    """An Embedder that answers from the vectors computed once (same model, same vectors)."""
    from agents.embed import Embedder

    class CachedEmbedder(Embedder):
        def encode(self, texts: list[str], max_chunks: int | None = None) -> np.ndarray:
            missing = [t for t in texts if t not in cache]
            if missing:  # not expected: every training text was embedded up front
                for text, vec in zip(missing, super().encode(missing, max_chunks), strict=True):
                    cache[text] = vec
            if not texts:
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.vstack([cache[t] for t in texts]).astype(np.float32)

    return CachedEmbedder(settings.dedup, threads=1)


def _shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {k: round(v / total, 4) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
