"""The semantic dedup step: embed a micro-batch of candidates, admit it against the vector
set, and pass on ``CuratedSample``s with their embeddings.

Blocking (the model and one Redis script call): the Faust agent runs it in an executor so
that the event loop keeps heartbeating. ``PassSemantic`` stands in when ``dedup.enabled``
is false: no model is loaded and candidates become samples without an embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from agents.config import DedupSettings
from agents.identity import event_id, store_id
from agents.index import Admission
from agents.step import Item, Outcome, Step, now_ms, rejection
from schemas.embedding import encode_embedding
from schemas.records import Candidate, CuratedSample


class Encoder(Protocol):
    """Texts in, unit vectors out (``agents.embed.Embedder``)."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


class Admitter(Protocol):
    """Decides each (id, vector) against the index and admits the new ones
    (``agents.index.VectorIndex``)."""

    def admit(self, ids: list[str], vectors: np.ndarray) -> list[Admission]: ...


class SemanticDedup(Step):
    """Candidates in; ``CuratedSample``s (with embeddings) or ``semantic_duplicate``s out."""

    name = "semantic"
    stage = "dedup"

    def __init__(self, settings: DedupSettings, embedder: Encoder, index: Admitter) -> None:
        super().__init__()
        self.settings = settings
        self.embedder = embedder
        self.index = index

    def embeds(self, cand: Candidate) -> bool:
        """Whether the settings send this candidate's kind and class through the model."""
        label = cand["label"]
        return (cand["kind"] in self.settings.kinds and label not in self.settings.skip_labels
                and (not self.settings.labels or label in self.settings.labels))

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per candidate, in input order; a kind or class the settings leave out
        passes as a sample without an embedding (``dedup.kinds``, ``labels``,
        ``skip_labels``): exact and fuzzy dedup decided it already."""
        chosen = [item for item in items if self.embeds(item.record)]
        if len(chosen) == len(items):
            return self._decide(items)
        decided = iter(self._decide(chosen) if chosen else [])
        return [next(decided) if self.embeds(item.record)
                else Outcome(sample_of(item.record, b"", 0, "", None), rejected=False)
                for item in items]

    def _decide(self, items: Sequence[Item]) -> list[Outcome]:
        with self.timed("embed"):
            vectors = self.embedder.encode([item.record["content"] for item in items])
        with self.timed("admit"):
            admissions = self.index.admit([store_id(item.record) for item in items], vectors)
        outcomes = []
        for item, vector, admission in zip(items, vectors, admissions, strict=True):
            cand = item.record
            if admission.keep:
                blob = encode_embedding(vector)
                outcomes.append(Outcome(sample_of(cand, blob, len(blob) // 2, self.settings.model,
                                                  admission.similarity), rejected=False))
            else:
                outcomes.append(rejection(
                    self.stage, "semantic_duplicate", item.coords, event=dict(cand),
                    duplicate_of=event_id(admission.duplicate_of or ""),
                    similarity=admission.similarity,
                    detail=f"cosine {admission.similarity:.4f} ≥ {self.settings.threshold}",
                ))
        return outcomes


class PassSemantic(Step):
    """``dedup.enabled = false``: every candidate becomes a sample, without an embedding."""

    name = "semantic"

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """One sample per candidate, in input order."""
        return [Outcome(sample_of(item.record, b"", 0, "", None), rejected=False)
                for item in items]


def sample_of(cand: Candidate, embedding: bytes, dim: int, model: str,
              nearest: float | None) -> CuratedSample:
    """The ``CuratedSample`` of an admitted candidate."""
    return CuratedSample(
        id=cand["id"], source=cand["source"], kind=cand["kind"], language=cand["language"],
        label=cand["label"], content=cand["content"], timestamp=cand["timestamp"],
        attributes=cand["attributes"], digest=cand["digest"],
        quality_score=cand["quality_score"], embedding=embedding, embedding_dim=dim,
        model=model, nearest_similarity=nearest, admitted_at=now_ms(),
        earlier_digest=cand.get("earlier_digest"),
    )
