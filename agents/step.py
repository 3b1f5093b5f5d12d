"""The step protocol: what moves between steps, what a step decides, and the base that
owns the loop around a step's one hook (datatrove's ``BaseFilter`` is the model).

A step is plain Python: ``process(items) -> outcomes``, over stores passed to its
constructor, testable without Kafka. ``Step.run`` wraps that hook with the timing and the
counters every step reports, so a subclass writes only its decision. A *filter* step
returns exactly one ``Outcome`` per item, in order (what ``agents.pipeline.Pipeline``
chains); a *sink* step (balance, feedback) returns what it emitted.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from schemas.records import Rejection
from streams.metrics import IN, OUT, REJECTED, rejected

# Raw bytes kept in a rejection at most (an oversized event is cut, not carried whole).
MAX_RAW_IN_REJECTION = 64 * 1024


@dataclass(frozen=True, slots=True)
class Coords:
    """Where a record was read: the lineage of a rejection or candidate."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Item:
    """One record on its way through the steps, with where it was read.

    ``record`` is the raw message value (bytes) before ``Validate``, then the record a step
    passed on (``Candidate``, ``CuratedSample``, ``Feedback``); ``key`` is the Kafka key.
    """

    record: Any
    coords: Coords
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A step's decision: ``record`` goes on (``rejected`` False) or to sluice.rejected."""

    record: Any
    rejected: bool

    @property
    def reason(self) -> str | None:
        """The rejection reason (``None`` for a record that goes on)."""
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


class Step(ABC):
    """One stage's decision over a batch of items; the base times and counts it.

    Subclasses set ``name`` and write ``process``. ``seconds`` holds the time spent in the
    step (under ``name``) and in the parts it times with ``timed`` (``embed``, ``admit``);
    ``counters`` holds ``in``, ``out``, ``rejected`` and ``rejected.<reason>``.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.counters: Counter[str] = Counter()

    def run(self, items: Sequence[Item]) -> list[Outcome]:
        """``process`` the items, timed and counted (what callers call)."""
        tick = time.perf_counter()
        outcomes = self.process(items) if items else []
        self.seconds[self.name] += time.perf_counter() - tick
        self.counters[IN] += len(items)
        for outcome in outcomes:
            if outcome.rejected:
                self.counters[REJECTED] += 1
                self.counters[rejected(str(outcome.reason))] += 1
            else:
                self.counters[OUT] += 1
        return outcomes

    @abstractmethod
    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """The step's decision; a filter step returns one outcome per item, in order."""

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the time spent in the block to ``seconds[part]``."""
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - tick
