"""Plumbing between the Faust agents and the blocking steps.

``Runner`` runs a step off the event loop (so heartbeats go on while the model works) and
waits out a Redis outage; ``send_outcomes`` delivers a micro-batch's outcomes before Faust
may commit the offsets that produced them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import faust
import redis

from agents.step import Coords, Item, Outcome
from schemas.errors import SluiceError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def item_of(event: faust.EventT) -> Item:
    """The step item of a Faust event: its value, coordinates and key."""
    message = event.message
    return Item(event.value, Coords(message.topic, message.partition, message.offset),
                event.key)


def _redis_down(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError | redis.BusyLoadingError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


class Runner:
    """Runs a blocking step off the event loop; waits out a Redis outage and retries.

    Retrying a whole micro-batch is safe: every step is idempotent by event id.
    """

    def __init__(self, name: str) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sluice-{name}")

    async def __call__(self, fn: Callable[[T], R], batch: T) -> R:
        loop = asyncio.get_running_loop()
        delay = 0.5
        while True:
            try:
                return await loop.run_in_executor(self.pool, fn, batch)
            except (redis.RedisError, SluiceError) as exc:
                if not _redis_down(exc):
                    raise
                log.warning("Redis unreachable (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


async def send_outcomes(outcomes: Sequence[Outcome], passed: faust.TopicT,
                        rejected: faust.TopicT) -> None:
    """Send each outcome on and wait until Kafka has them all, so that the offsets Faust
    commits afterwards never cover work that was not delivered."""
    pending: list[Awaitable[Any]] = []
    for outcome in outcomes:
        record = outcome.record
        topic = rejected if outcome.rejected else passed
        pending.append(await topic.send(key=record["id"].encode("utf-8"), value=record))
    await asyncio.gather(*pending)
