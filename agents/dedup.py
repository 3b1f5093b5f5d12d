"""The semantic dedup step: embed a micro-batch of candidates, admit it atomically.

Blocking (the model and one Redis script call): the Faust agent runs ``process`` in an
executor so that the event loop keeps heartbeating.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis

from agents.embed import Embedder, to_f16_bytes
from agents.index import VectorIndex
from agents.outcome import Coords, Incoming, Outcome, now_ms, rejection
from schemas.records import Candidate, CuratedSample
from sluice.settings import Settings

if TYPE_CHECKING:
    from agents.ingest import Ingest


class SemanticDedup:
    """Candidates in, CuratedSamples (with embeddings) or semantic_duplicate rejections out."""

    stage = "dedup"

    def __init__(self, settings: Settings, client: redis.Redis, embedder: Embedder | None = None,
                 namespace: str | None = None) -> None:
        self.settings = settings
        self.embedder = embedder or Embedder(settings.dedup,
                                             threads=settings.dedup.torch_threads or None)
        self.index = VectorIndex(client, namespace or settings.redis.namespace, settings.dedup)
        self.model_name = settings.dedup.model
        #: Seconds spent per sub-step, for the metrics and the benchmark breakdown.
        self.seconds: dict[str, float] = defaultdict(float)

    def process(self, batch: Sequence[tuple[Candidate, Coords]]) -> list[Outcome]:
        """One outcome per candidate, in input order."""
        if not batch:
            return []
        tick = time.perf_counter()
        vectors = self.embedder.encode([cand["content"] for cand, _ in batch])
        tock = time.perf_counter()
        admissions = self.index.admit([cand["id"] for cand, _ in batch], vectors)
        self.seconds["embed"] += tock - tick
        self.seconds["admit"] += time.perf_counter() - tock
        threshold = self.settings.dedup.threshold
        outcomes = []
        for (cand, coords), vector, admission in zip(batch, vectors, admissions, strict=True):
            if admission.keep:
                outcomes.append(Outcome(self._sample(cand, vector, admission.similarity),
                                        rejected=False))
            else:
                outcomes.append(rejection(
                    self.stage, "semantic_duplicate", coords, event=dict(cand),
                    duplicate_of=admission.duplicate_of, similarity=admission.similarity,
                    detail=f"cosine {admission.similarity:.4f} ≥ {threshold}",
                ))
        return outcomes

    def _sample(self, cand: Candidate, vector: object, nearest: float | None) -> CuratedSample:
        blob = to_f16_bytes(vector)  # type: ignore[arg-type]
        return CuratedSample(
            id=cand["id"], source=cand["source"], kind=cand["kind"], language=cand["language"],
            label=cand["label"], content=cand["content"], timestamp=cand["timestamp"],
            attributes=cand["attributes"], digest=cand["digest"],
            quality_score=cand["quality_score"], embedding=blob, embedding_dim=len(blob) // 2,
            model=self.model_name, nearest_similarity=nearest, admitted_at=now_ms(),
        )



def ingest_and_dedup(batch: Sequence[Incoming], ingest: Ingest,
                     dedup: SemanticDedup | None) -> list[Outcome]:
    """Both steps over one micro-batch without Kafka: one outcome per message, in order
    (``sluice dedup`` and the benchmarks)."""
    outcomes = ingest.process(batch)
    if dedup is None:
        return outcomes
    passed = [(o.record, m.coords) for o, m in zip(outcomes, batch, strict=True)
              if not o.rejected]
    decided = iter(dedup.process(passed))
    return [o if o.rejected else next(decided) for o in outcomes]
