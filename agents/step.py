"""The step protocol: what moves between steps, what a step decides, and the base that
owns the loop around a step's one hook (datatrove's ``BaseFilter`` is the model).

A step is plain Python: ``process(items) -> outcomes``, over stores passed to its
constructor, testable without Kafka. ``Step.run`` wraps that hook with the timing and the
counters every step reports, so a subclass writes only its decision. A *filter* step
returns exactly one ``Outcome`` per item, in order (what ``agents.pipeline.Pipeline``
chains); a *sink* step (balance, feedback) returns what it emitted.

Failures follow Kafka Streams' split. Bad bytes are the deserialization handler's
(``streams.serde.decode_raw_event``, called by ``Validate``): an ``invalid:<what>``
rejection. A failure inside a step is the processing handler's (``isolate``): when
``process`` raises for a batch, the batch is bisected until the record(s) that raise are
alone, each becomes an ``error:<ExceptionClass>`` rejection with the message, and the rest
of the batch is decided as usual. Bisection, not one-by-one: a batch of 128 with one bad
record costs about 2·log2(128) = 14 extra calls instead of 128 round trips to Redis, and
every step is idempotent by event id, so deciding an item again is safe. A *systemic*
failure (``systemic``: Redis unreachable, OOM, READONLY, BUSY, NOPERM…) is no record's
fault: it is raised unchanged, for the caller to retry the whole batch
(``agents.runner.Runner``) and never to ack it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import redis

from schemas.records import Rejection
from streams.metrics import IN, OUT, REJECTED, rejected

log = logging.getLogger(__name__)

# What a rejection carries at most, so that it always fits the rejected topic's message
# limit whatever arrived (a 5 MiB Kafka key, a 1 MiB label): raw bytes, then each text.
# A rejection is thus under 64 KiB + 8 KiB of text + framing, far below the 8 MiB default.
MAX_RAW_IN_REJECTION = 64 * 1024
MAX_ID_IN_REJECTION = 1024  # UTF-8 bytes of id and duplicate_of (also the Kafka key)
MAX_TEXT_IN_REJECTION = 1024  # characters of source, kind, label
MAX_DETAIL_IN_REJECTION = 4096  # characters of detail


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
    #: For an ``error:*`` rejection, the record the failing step was given (a ``Candidate``
    #: names the digest whose exact claim it may hold); else None.
    given: Any = None

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
    """A Rejection outcome; ``event`` (when decoded) supplies id, source, kind and label.

    Every field is cut to its ``MAX_*_IN_REJECTION`` (an id by ``bounded_id``), so the
    rejection fits its topic whatever the event carried.
    """
    event = event or {}
    record = Rejection(
        id=bounded_id(event_id or event.get("id")
                      or f"{coords.topic}-{coords.partition}-{coords.offset}"),
        stage=stage,
        reason=reason,
        detail=_cut(detail, MAX_DETAIL_IN_REJECTION),
        duplicate_of=bounded_id(duplicate_of) if duplicate_of is not None else None,
        similarity=similarity,
        source=_cut(event.get("source"), MAX_TEXT_IN_REJECTION),
        kind=_cut(event.get("kind"), MAX_TEXT_IN_REJECTION),
        label=_cut(event.get("label"), MAX_TEXT_IN_REJECTION),
        topic=coords.topic,
        partition=coords.partition,
        offset=coords.offset,
        raw=raw[:MAX_RAW_IN_REJECTION] if raw is not None else None,
        timestamp=now_ms(),
    )
    return Outcome(record, rejected=True)


def bounded_id(text: str) -> str:
    """``text`` when it is at most ``MAX_ID_IN_REJECTION`` UTF-8 bytes; else its first 128
    characters, ``…sha256:`` and the first 32 hex digits of the SHA-256 of all of it (still
    unique, still traceable to what the producer sent)."""
    data = text.encode("utf-8", errors="surrogatepass")
    if len(data) <= MAX_ID_IN_REJECTION:
        return text
    return f"{text[:128]}…sha256:{hashlib.sha256(data).hexdigest()[:32]}"


def _cut(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    # An exception's message may quote a lone surrogate: never let it break the encoding.
    return text.encode("utf-8", errors="replace").decode("utf-8")


# Redis error replies (their first word) that say the server fails every command of this
# kind right now, whatever the record: out of memory, a replica during failover, a script
# past the busy threshold, an ACL that forbids the command, a server still loading...
SYSTEMIC_REPLIES = frozenset({
    "OOM", "READONLY", "BUSY", "NOPERM", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
    "MISCONF", "NOREPLICAS", "NOAUTH", "WRONGPASS", "NOTBUSY", "UNBLOCKED"})

# The same replies as redis-py's classes (it strips the code from their message).
_SYSTEMIC_CLASSES = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                     redis.exceptions.NoPermissionError, redis.exceptions.ClusterDownError,
                     redis.exceptions.TryAgainError)


def systemic(exc: BaseException | None) -> str | None:
    """What makes ``exc`` (or an exception it was raised from) a failure of the store for
    every record, in a few words (``"Redis unreachable"``, ``"Redis OOM"``…); None when it
    may be the record's own fault."""
    seen = 0
    while exc is not None and seen < 16:  # a cause chain is short; never loop on a cycle
        if isinstance(exc, redis.exceptions.BusyLoadingError):
            return "Redis LOADING"
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return "Redis unreachable"
        if isinstance(exc, redis.ResponseError):
            code = getattr(exc, "status_code", None) or _reply_code(str(exc))
            if code in SYSTEMIC_REPLIES or isinstance(exc, _SYSTEMIC_CLASSES):
                return f"Redis {code or type(exc).__name__}"
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _reply_code(message: str) -> str:
    # redis-py strips the code of the errors it maps to classes (OOM → OutOfMemoryError)
    # and prefixes a pipeline's error with "Command # n (...) of pipeline caused error: ".
    _, _, tail = message.rpartition("caused error: ")
    first = tail.split(" ", 1)[0]
    return first if first.isupper() else ""


def isolate(process: Callable[[Sequence[Item]], list[Outcome]], items: Sequence[Item],
            failed: Callable[[Item, Exception], Outcome]) -> list[Outcome]:
    """The processing handler: ``process(items)``; when it raises for a record, that record's
    outcome is ``failed(item, exc)`` and the others are decided by ``process``.

    Bisects a failing batch down to the items that fail alone. A systemic failure
    (``systemic``) is raised unchanged: it is not the record's fault.
    """
    try:
        return process(items)
    except Exception as exc:
        if systemic(exc) is not None:
            raise
        if len(items) <= 1:
            return [failed(item, exc) for item in items]
        middle = len(items) // 2
        return (isolate(process, items[:middle], failed)
                + isolate(process, items[middle:], failed))


def error_rejection(stage: str, where: str, item: Item, exc: BaseException) -> Outcome:
    """``error:<ExceptionClass>`` for ``item``, which made ``where`` raise ``exc``; logged
    with its topic, partition and offset."""
    coords = item.coords
    log.warning("%s failed on %s[%d]@%d: %s: %s", where, coords.topic, coords.partition,
                coords.offset, type(exc).__name__, str(exc)[:200])
    record = item.record
    event = record if isinstance(record, dict) else None
    outcome = rejection(
        stage, f"error:{type(exc).__name__}", coords, event=event,
        event_id=None if event else _key_id(item.key),
        detail=f"{where}: {exc}", raw=record if isinstance(record, bytes) else None)
    return Outcome(outcome.record, rejected=True, given=record)


def _key_id(key: bytes | None) -> str | None:
    return key.decode("utf-8", errors="replace") if key else None


class Step(ABC):
    """One stage's decision over a batch of items; the base times and counts it.

    Subclasses set ``name`` and write ``process``. ``seconds`` holds the time spent in the
    step (under ``name``) and in the parts it times with ``timed`` (``embed``, ``admit``);
    ``counters`` holds ``in``, ``out``, ``rejected`` and ``rejected.<reason>``.

    A filter step also sets ``stage``, the stage its rejections name; ``run`` then isolates
    a record that makes ``process`` raise (``isolate``): its outcome is an
    ``error:<ExceptionClass>`` rejection and the rest of the batch goes on. A sink step
    (no ``stage``) returns what it emitted, so its failures are raised to its agent.
    """

    name: ClassVar[str]
    stage: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.counters: Counter[str] = Counter()

    def run(self, items: Sequence[Item]) -> list[Outcome]:
        """``process`` the items, timed and counted (what callers call)."""
        tick = time.perf_counter()
        if not items:
            outcomes = []
        elif self.stage is None:
            outcomes = self.process(items)
        else:
            outcomes = isolate(self.process, items, self._failed)
        self.seconds[self.name] += time.perf_counter() - tick
        self.counters[IN] += len(items)
        for outcome in outcomes:
            if outcome.rejected:
                self.counters[REJECTED] += 1
                self.counters[rejected(str(outcome.reason))] += 1
            else:
                self.counters[OUT] += 1
        return outcomes

    def _failed(self, item: Item, exc: Exception) -> Outcome:
        return error_rejection(str(self.stage), self.name, item, exc)

    @abstractmethod
    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """The step's decision; a filter step returns one outcome per item, in order."""

    def forget(self, items: Sequence[Item]) -> None:
        """Undo what the last ``process`` stored for ``items``, which it passed and a later
        step failed on (``error:*``): they never become samples, so nothing may be their
        duplicate. The base stores nothing."""
        return None

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the time spent in the block to ``seconds[part]``."""
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - tick
