"""Python types that mirror the latest Avro schemas (a test keeps them in step).

Records travel as plain dicts (what the Avro reader yields); these ``TypedDict``s give
them names and field types. Timestamps are int milliseconds since the epoch (UTC).
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

Kind = Literal["CODE", "TEXT"]


class RawEvent(TypedDict):
    id: str
    source: str
    kind: Kind
    language: str | None
    label: str | None
    content: str
    timestamp: int
    attributes: dict[str, str]


class Candidate(TypedDict):
    id: str
    source: str
    kind: Kind
    language: str | None
    label: str
    content: str
    timestamp: int
    attributes: dict[str, str]
    digest: str
    quality_score: float
    ingested_at: int
    raw_partition: int
    raw_offset: int
    earlier_digest: NotRequired[str | None]


class CuratedSample(TypedDict):
    id: str
    source: str
    kind: Kind
    language: str | None
    label: str
    content: str
    timestamp: int
    attributes: dict[str, str]
    digest: str
    quality_score: float
    embedding: bytes
    embedding_dim: int
    model: str
    nearest_similarity: float | None
    admitted_at: int
    earlier_digest: NotRequired[str | None]


class BatchSample(TypedDict):
    id: str
    label: str
    kind: Kind
    source: str
    content: str
    embedding: bytes
    embedding_dim: int
    weight: float
    replay: bool


class CuratedBatch(TypedDict):
    batch_id: str
    partition: int
    sequence: int
    created_at: int
    policy: str
    samples: list[BatchSample]
    class_shares: dict[str, float]
    target_shares: dict[str, float]
    difficulty: dict[str, float]
    content_digest: str


class SampleLoss(TypedDict):
    id: str
    label: str
    loss: float
    correct: bool | None


class Feedback(TypedDict):
    batch_id: str
    step: int
    model: str
    created_at: int
    losses: list[SampleLoss]


class Rejection(TypedDict):
    id: str
    stage: str
    reason: str
    detail: str | None
    duplicate_of: str | None
    similarity: float | None
    source: str | None
    kind: str | None
    label: str | None
    topic: str
    partition: int
    offset: int
    raw: bytes | None
    timestamp: int


class MetricSnapshot(TypedDict):
    component: str
    instance: str
    timestamp: int
    counters: dict[str, int]
    gauges: dict[str, float]
    labels: dict[str, str]


RECORD_TYPES: dict[str, type] = {
    "RawEvent": RawEvent,
    "Candidate": Candidate,
    "CuratedSample": CuratedSample,
    "CuratedBatch": CuratedBatch,
    "Feedback": Feedback,
    "Rejection": Rejection,
    "MetricSnapshot": MetricSnapshot,
}
