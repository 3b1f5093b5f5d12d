"""Plumbing between the Faust agents and the blocking steps: where failures are decided.

faust-streaming acks a micro-batch of ``take_events`` in a ``finally`` around its
``yield``: whatever leaves the agent's body (an exception, a cancellation) acks every event
of the batch, outcome or not. So nothing may leave it for a record's fault, and a store
that fails for everyone must be waited out in place:

- ``Runner`` runs a step off the event loop (so heartbeats go on while the model works).
  A *systemic* failure (``agents.step.systemic``: Redis unreachable, OOM, READONLY, BUSY,
  NOPERM…) is retried in place with backoff, counted in ``retries`` and shown in the
  ``stalled_s`` gauge, while the offsets stay uncommitted (the consumer lag shows it too).
  ``Runner.decide`` adds the processing handler around a whole pipeline (``isolate``), the
  last line behind the one in ``Step.run``: a record that still makes it raise becomes an
  ``error:<ExceptionClass>`` rejection.
- ``send_outcomes`` delivers a micro-batch's outcomes before Faust may commit the offsets
  that produced them; a record Kafka refuses (it does not encode, it is over the message
  limit) is replaced by its ``error:*`` rejection, a broker that fails is retried.
- ``hold`` keeps a micro-batch's events uncommitted when the agent leaves it undone (the
  worker stops while it waits: ``Stopping``; a cancellation), so the ``finally`` of
  ``take_events`` cannot commit work that was not delivered, and a stopping worker does not
  wait for it either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import faust
from aiokafka.errors import MessageSizeTooLargeError

from agents.step import Coords, Item, Outcome, error_rejection, isolate, rejection, systemic
from schemas.errors import SluiceError
from streams.app import Undecodable
from streams.metrics import BUSY_S, RETRIES, STALLED_S, StageMetrics
from streams.serde import EncodeError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

FIRST_DELAY_S, MAX_DELAY_S = 0.5, 10.0  # backoff between attempts on a failing store
STOP_POLL_S = 0.25  # how often a waiting micro-batch checks whether the worker stops

# Errors of one record at send time: it does not fit its schema, or not the topic.
_UNSENDABLE = (EncodeError, MessageSizeTooLargeError)


def item_of(event: faust.EventT) -> Item:
    """The step item of a Faust event: its value, coordinates and key."""
    message = event.message
    return Item(event.value, Coords(message.topic, message.partition, message.offset),
                event.key)


def decode_problem(stage: str, item: Item) -> Outcome | None:
    """The rejection of a message of a sluice topic that is no record of its type (a
    tombstone, or bytes the codec handed on as ``Undecodable``); ``None`` for a record.
    Kafka Streams' deserialization handler: the bad record gets an outcome, the rest goes on.
    """
    record = item.record
    if record is None:
        reason, detail, raw = "tombstone", "a null value (tombstone)", None
    elif isinstance(record, Undecodable):
        reason, detail, raw = record.reason, record.detail, record.raw
    else:
        return None
    coords = item.coords
    log.warning("%s: invalid:%s at %s[%d]@%d: %s", stage, reason, coords.topic,
                coords.partition, coords.offset, detail)
    key = item.key.decode("utf-8", errors="replace") if item.key else None
    return rejection(stage, f"invalid:{reason}", coords, event_id=key, detail=detail, raw=raw)


def hold(events: Iterable[faust.EventT]) -> None:
    """Take ``events`` out of Faust's acking without committing them: marked finished for
    the consumer (so a stopping worker does not wait for them) but never handed to it as
    acked, so their offsets are not committed by this process and the next owner of the
    partition reads them again. The ``finally`` of ``take_events`` then acks nothing."""
    for event in events:
        # ``Message.ack`` records an offset only on its first ack; setting the flag
        # ourselves skips that, and the consumer's ``_clean_unacked_messages`` drops it.
        event.message.acked = True


class Stopping(SluiceError):
    """The worker is stopping while a micro-batch waits on a failing store or broker: the
    batch is held (``hold``), never acked, and decided by whoever reads it next."""


async def consume(stream: faust.StreamT, size: int, within_s: float,
                  handle: Callable[[Sequence[faust.EventT]], Awaitable[None]]) -> None:
    """``handle`` each micro-batch of ``stream`` (``take_events(size, within=within_s)``);
    a batch ``handle`` leaves undone is held, never acked: on ``Stopping`` the agent ends,
    on anything else (a cancellation, a bug) the exception goes on to Faust."""
    async for events in stream.take_events(size, within=within_s):  # type: ignore[attr-defined]
        try:
            await handle(events)
        except Stopping as exc:
            hold(events)
            log.warning("%s: %d events held, not acked (read again by the partition's next "
                        "owner)", exc, len(events))
            return
        except BaseException:
            hold(events)
            raise


class Runner:
    """Runs a blocking step off the event loop; waits out a store that fails for everyone.

    Retrying a whole micro-batch is safe: every step is idempotent by event id.
    """

    def __init__(self, name: str, metrics: StageMetrics | None = None,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self.metrics = metrics
        self.stopping = stopping
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sluice-{name}")
        #: Seconds the executor spent running steps (the ``busy_s`` gauge): busy over wall
        #: is the stage's utilization, and the stages of one worker together exceed the
        #: wall clock by as much as they overlap (ingest lexing while dedup embeds).
        self.busy_s = 0.0

    async def __call__(self, fn: Callable[[T], R], batch: T) -> R:
        """``fn(batch)`` in the executor; retried with backoff while it fails systemically
        (any other exception is raised; ``Stopping`` when the worker stops meanwhile)."""
        loop = asyncio.get_running_loop()
        waiting = _Backoff(self.metrics, self.stopping)
        while True:
            try:
                result = await loop.run_in_executor(self.pool, self._timed, fn, batch)
            except Exception as exc:
                cause = systemic(exc)
                if cause is None:
                    raise
                await waiting.wait(f"{cause} ({exc})")
                continue
            waiting.done()
            return result

    def _timed(self, fn: Callable[[T], R], batch: T) -> R:
        """``fn(batch)``, its time added to ``busy_s`` (in the executor's one thread)."""
        tick = time.perf_counter()
        try:
            return fn(batch)
        finally:
            self.busy_s += time.perf_counter() - tick
            if self.metrics is not None:
                self.metrics.gauges[BUSY_S] = self.busy_s

    async def decide(self, run: Callable[[Sequence[Item]], list[Outcome]],
                     items: Sequence[Item], stage: str) -> list[Outcome]:
        """``run(items)`` (a pipeline) with every record's failure made its rejection and
        every systemic failure retried: one outcome per item, whatever happens."""

        def failed(item: Item, exc: Exception) -> Outcome:
            return error_rejection(stage, f"{stage} pipeline", item, exc)

        bad = [decode_problem(stage, item) for item in items]
        good = [item for item, problem in zip(items, bad, strict=True) if problem is None]
        decided = iter(await self(lambda batch: isolate(run, batch, failed), good)
                       if good else [])
        return [problem or next(decided) for problem in bad]


class _Backoff:
    """Waits between attempts (0.5 s doubling to 10 s), logging and counting each one;
    raises ``Stopping`` as soon as ``stopping()`` says the worker stops."""

    def __init__(self, metrics: StageMetrics | None,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.metrics = metrics
        self.stopping = stopping
        self.delay = FIRST_DELAY_S
        self.since: float | None = None

    async def wait(self, why: str) -> None:
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        log.warning("%s; retrying in %.1f s (waiting %.0f s so far, nothing acked)",
                    why, self.delay, now - self.since)
        if self.metrics is not None:
            self.metrics.counters[RETRIES] += 1
            self.metrics.gauges[STALLED_S] = now - self.since
        until = now + self.delay
        while not self.stopping() and time.monotonic() < until:
            await asyncio.sleep(min(STOP_POLL_S, until - time.monotonic()))
        if self.stopping():
            raise Stopping(f"stopping after {now - self.since:.0f} s of waiting: {why}")
        self.delay = min(self.delay * 2, MAX_DELAY_S)

    def done(self) -> None:
        if self.since is not None and self.metrics is not None:
            self.metrics.gauges[STALLED_S] = 0.0
        self.since, self.delay = None, FIRST_DELAY_S


async def send_outcomes(items: Sequence[Item], outcomes: Sequence[Outcome],
                        passed: faust.TopicT, rejected: faust.TopicT, *, stage: str,
                        metrics: StageMetrics | None = None,
                        stopping: Callable[[], bool] = lambda: False) -> list[Outcome]:
    """Send each outcome (one per item, in order) on and wait until Kafka has them all, so
    that the offsets Faust commits afterwards never cover work that was not delivered.

    Returns what was sent: an outcome Kafka refuses for itself (``EncodeError``, over the
    message limit) is replaced by its item's ``error:*`` rejection; any other failure
    re-sends the whole micro-batch after a backoff (consumers are idempotent by id, so a
    duplicate message changes nothing).
    """
    waiting = _Backoff(metrics, stopping)
    while True:
        try:
            sent = await _send_all(items, list(outcomes), passed, rejected, stage)
        except Exception as exc:
            await waiting.wait(f"Kafka did not take the outcomes ({exc!r})")
            continue
        waiting.done()
        return sent


async def _send_all(items: Sequence[Item], outcomes: list[Outcome], passed: faust.TopicT,
                    rejected: faust.TopicT, stage: str) -> list[Outcome]:
    def refused(n: int, exc: Exception) -> Outcome:
        item = Item(outcomes[n].record, items[n].coords, items[n].key)
        return error_rejection(stage, "send", item, exc)

    pending: list[Awaitable[Any]] = []
    for n, outcome in enumerate(outcomes):
        try:
            pending.append(await _send(outcome, passed, rejected))
        except _UNSENDABLE as exc:
            outcomes[n] = refused(n, exc)
            pending.append(await _send(outcomes[n], passed, rejected))
    results = await asyncio.gather(*pending, return_exceptions=True)
    for n, result in enumerate(results):
        if isinstance(result, _UNSENDABLE):
            outcomes[n] = refused(n, result)
            await (await _send(outcomes[n], passed, rejected))
        elif isinstance(result, BaseException):
            raise result
    return outcomes


async def _send(outcome: Outcome, passed: faust.TopicT, rejected: faust.TopicT
                ) -> Awaitable[Any]:
    record = outcome.record
    topic = rejected if outcome.rejected else passed
    return await topic.send(key=record["id"].encode("utf-8"), value=record)
