"""The Faust agents: each a few lines that move events through a step (CONVENTIONS §3).

``build_worker(settings, stages)`` declares the chosen agents on a fresh app; the steps
(``Ingest``, ``SemanticDedup``, ``Balancer``, ``FeedbackStep``) hold all the logic. Blocking
steps run in single-thread executors so the event loop keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import faust
import redis

from agents.metrics import StageMetrics
from agents.outcome import Coords, Incoming, Outcome
from schemas.errors import SluiceError
from sluice.settings import Settings
from streams.app import Topics, create_app
from streams.connections import redis_client

log = logging.getLogger(__name__)

STAGES = ("ingest", "dedup", "balance", "feedback")
T = TypeVar("T")
R = TypeVar("R")


def coords_of(event: faust.EventT) -> Coords:
    """Topic, partition and offset of a Faust event."""
    message = event.message
    return Coords(message.topic, message.partition, message.offset)


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


def build_worker(settings: Settings, stages: Sequence[str] = STAGES) -> faust.App:
    """A Faust app with the agents of ``stages`` declared on it."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SluiceError(f"unknown agent(s) {', '.join(sorted(unknown))}; "
                          f"choose from {', '.join(STAGES)}")
    app, topics = create_app(settings.kafka, settings.topics, app_id=settings.app_id,
                             datadir=settings.state_dir / "faust",
                             web_port=settings.metrics.worker_web_port,
                             buffer_maxsize=4 * settings.dedup.batch_size)
    client = redis_client(settings.redis)
    metrics: dict[str, StageMetrics] = {}
    for stage in stages:
        metrics[stage] = StageMetrics(stage)
        _DECLARE[stage](app, topics, settings, client, metrics[stage])

    @app.timer(interval=settings.metrics.interval_s)
    async def publish_metrics() -> None:
        for stage_metrics in metrics.values():
            snapshot = stage_metrics.snapshot()
            await topics.metrics.send(key=snapshot["component"].encode(), value=snapshot)

    _expose_prometheus(app, metrics)
    return app


def _expose_prometheus(app: faust.App, metrics: dict[str, StageMetrics]) -> None:
    """``GET /metrics`` on the worker's web server, in Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from agents.prometheus import SnapshotCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: [m.snapshot() for m in metrics.values()]))

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def _declare_ingest(app: faust.App, topics: Topics, settings: Settings, client: redis.Redis,
                    metrics: StageMetrics) -> None:
    from agents.ingest import Ingest

    step = Ingest(settings, client)
    run = Runner("ingest")

    @app.agent(topics.raw, name="sluice-ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for events in stream.take_events(  # type: ignore[attr-defined]
                4 * settings.dedup.batch_size, within=settings.dedup.batch_within_s):
            batch = [Incoming(e.value, e.key, coords_of(e)) for e in events]
            metrics.count_in(len(batch))
            outcomes = await run(step.process, batch)
            await send_outcomes(outcomes, topics.candidates, topics.rejected)
            metrics.count_outcomes(outcomes)
            metrics.add_seconds(step.seconds)


def _declare_dedup(app: faust.App, topics: Topics, settings: Settings, client: redis.Redis,
                   metrics: StageMetrics) -> None:
    from agents.dedup import SemanticDedup

    step = SemanticDedup(settings, client)  # loads the model now: fail before consuming
    run = Runner("dedup")
    metrics.labels["model"] = settings.dedup.model

    @app.agent(topics.candidates, name="sluice-dedup")
    async def dedup(stream: faust.StreamT) -> None:
        async for events in stream.take_events(  # type: ignore[attr-defined]
                settings.dedup.batch_size, within=settings.dedup.batch_within_s):
            batch = [(e.value, coords_of(e)) for e in events]
            metrics.count_in(len(batch))
            outcomes = await run(step.process, batch)
            await send_outcomes(outcomes, topics.samples, topics.rejected)
            metrics.count_outcomes(outcomes, (cand["timestamp"] for cand, _ in batch))
            metrics.add_seconds(step.seconds)
            metrics.gauges["index.size"] = float(await run(lambda _: step.index.size(), None))


def _declare_balance(app: faust.App, topics: Topics, settings: Settings, client: redis.Redis,
                     metrics: StageMetrics) -> None:
    from agents.balance import declare_balance

    declare_balance(app, topics, settings, client, metrics)


def _declare_feedback(app: faust.App, topics: Topics, settings: Settings, client: redis.Redis,
                      metrics: StageMetrics) -> None:
    from agents.balance import declare_feedback

    declare_feedback(app, topics, settings, client, metrics)


_DECLARE: dict[str, Callable[[faust.App, Topics, Settings, redis.Redis, StageMetrics], None]] = {
    "ingest": _declare_ingest,
    "dedup": _declare_dedup,
    "balance": _declare_balance,
    "feedback": _declare_feedback,
}
