"""What a stage decides about one record: pass it on, or reject it with a reason."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from schemas.records import Rejection

# Raw bytes kept in a rejection at most (an oversized event is cut, not carried whole).
MAX_RAW_IN_REJECTION = 64 * 1024


@dataclass(frozen=True, slots=True)
class Coords:
    """Where a record was read: the lineage of a rejection or candidate."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Incoming:
    """One raw-events message as ingest sees it."""

    value: bytes
    key: bytes | None
    coords: Coords


@dataclass(frozen=True, slots=True)
class Outcome:
    """A stage's decision: ``record`` goes on (``rejected`` False) or to sluice.rejected."""

    record: Any
    rejected: bool

    @property
    def reason(self) -> str | None:
        return str(self.record["reason"]) if self.rejected else None


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch."""
    return int(time.time() * 1000)


def rejection(
    stage: str,
    reason: str,
    coords: Coords,
    *,
    event: dict[str, Any] | None = None,
    event_id: str | None = None,
    detail: str | None = None,
    duplicate_of: str | None = None,
    similarity: float | None = None,
    raw: bytes | None = None,
) -> Outcome:
    """A Rejection outcome; ``event`` (when decoded) supplies id, source, kind and label."""
    event = event or {}
    record = Rejection(
        id=event_id or event.get("id") or f"{coords.topic}-{coords.partition}-{coords.offset}",
        stage=stage,
        reason=reason,
        detail=detail,
        duplicate_of=duplicate_of,
        similarity=similarity,
        source=event.get("source"),
        kind=event.get("kind"),
        label=event.get("label"),
        topic=coords.topic,
        partition=coords.partition,
        offset=coords.offset,
        raw=raw[:MAX_RAW_IN_REJECTION] if raw is not None else None,
        timestamp=now_ms(),
    )
    return Outcome(record, rejected=True)
