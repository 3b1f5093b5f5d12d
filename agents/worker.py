"""The Faust agents: each a few lines that move events through steps (CONVENTIONS §3).

``build_worker(config, stages)`` declares the chosen agents on a fresh app. The steps
hold all the logic (``agents.pipeline`` composes ingest and dedup; ``Balance`` and
``Feedback`` are sinks); blocking steps run in single-thread executors
(``agents.runner.Runner``) so the event loop keeps heartbeating.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import faust
import redis

from agents.balance import Balance
from agents.buffers import ClassBuffers, buffers_for
from agents.config import AGENTS, Curation
from agents.feedback import Feedback, LossStore
from agents.index import VectorIndex
from agents.pipeline import build_pipeline
from agents.policy import label_for
from agents.runner import Runner, item_of, send_outcomes
from agents.step import Item
from schemas.errors import SluiceError
from schemas.records import CuratedBatch
from streams.app import Topics, create_app
from streams.connections import redis_client
from streams.metrics import (
    BATCHES,
    INDEX_SIZE,
    OUT,
    SnapshotCollector,
    StageMetrics,
    buffer_fill,
    class_difficulty,
    class_in,
    class_out,
    class_weight,
    evicted,
    share_ema,
    share_target,
)


def build_worker(config: Curation, agents: Sequence[str] = AGENTS) -> faust.App:
    """A Faust app with the chosen agents declared on it."""
    unknown = set(agents) - set(AGENTS)
    if unknown:
        raise SluiceError(f"unknown agent(s) {', '.join(sorted(unknown))}; "
                          f"choose from {', '.join(AGENTS)}")
    app, topics = create_app(config.kafka, config.topics, app_id=config.app_id,
                             datadir=config.state_dir / "faust",
                             web_port=config.metrics.worker_web_port,
                             buffer_maxsize=max(config.ingest.batch_size,
                                                config.dedup.batch_size))
    client = redis_client(config.redis)
    metrics: dict[str, StageMetrics] = {}
    for agent in agents:
        metrics[agent] = StageMetrics(agent)
        _DECLARE[agent](app, topics, config, client, metrics[agent])

    @app.timer(interval=config.metrics.interval_s)
    async def publish_metrics() -> None:
        for stage_metrics in metrics.values():
            snapshot = stage_metrics.snapshot()
            await topics.metrics.send(key=snapshot["component"].encode(), value=snapshot)

    _expose_prometheus(app, metrics)
    return app


def _expose_prometheus(app: faust.App, metrics: dict[str, StageMetrics]) -> None:
    """``GET /metrics`` on the worker's web server, in Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: [m.snapshot() for m in metrics.values()]))

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def _declare_ingest(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                    metrics: StageMetrics) -> None:
    pipeline = build_pipeline(config, client, stages=["ingest"])
    run = Runner("ingest")

    @app.agent(topics.raw, name="sluice-ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for events in stream.take_events(  # type: ignore[attr-defined]
                config.ingest.batch_size, within=config.ingest.batch_within_s):
            batch = [item_of(e) for e in events]
            metrics.count_in(len(batch))
            outcomes = await run(pipeline.run, batch)
            await send_outcomes(outcomes, topics.candidates, topics.rejected)
            metrics.count_outcomes(outcomes)
            metrics.add_seconds(pipeline.seconds())


def _declare_dedup(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                   metrics: StageMetrics) -> None:
    pipeline = build_pipeline(config, client, stages=["dedup"])  # loads the model now
    index = VectorIndex(client, config.redis.namespace, config.dedup)
    run = Runner("dedup")
    metrics.labels["model"] = config.dedup.model if config.dedup.enabled else "none"

    @app.agent(topics.candidates, name="sluice-dedup")
    async def dedup(stream: faust.StreamT) -> None:
        async for events in stream.take_events(  # type: ignore[attr-defined]
                config.dedup.batch_size, within=config.dedup.batch_within_s):
            batch = [item_of(e) for e in events]
            metrics.count_in(len(batch))
            outcomes = await run(pipeline.run, batch)
            await send_outcomes(outcomes, topics.samples, topics.rejected)
            metrics.count_outcomes(outcomes, (item.record["timestamp"] for item in batch))
            metrics.add_seconds(pipeline.seconds())
            metrics.gauges[INDEX_SIZE] = float(await run(lambda _: index.size(), None))


def _declare_balance(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                     metrics: StageMetrics) -> None:
    table = app.Table("sluice-balance-state", default=dict, partitions=config.topics.partitions,
                      key_type=str)  # values: JSON (the default serializer)
    losses = LossStore(client, config.redis.namespace)
    steps: dict[int, Balance] = {}
    run = Runner("balance")
    metrics.labels["policy"] = label_for(config.balance)

    def balance_one(args: tuple[Item, dict[str, Any]]) -> tuple[Balance, list[CuratedBatch]]:
        item, state = args
        partition = item.coords.partition
        if partition not in steps:
            buffers = buffers_for(client, config.redis.namespace, partition, config.balance)
            steps[partition] = Balance(config.balance, buffers, losses)
        step = steps[partition]
        step.state = state
        return step, [outcome.record for outcome in step.run([item])]

    @app.agent(topics.samples, name="sluice-balance")
    async def balance(stream: faust.StreamT) -> None:
        # Iterate values (stream.events() never yields in faust-streaming 0.15).
        async for _ in stream:
            item = item_of(stream.current_event)  # type: ignore[arg-type]
            metrics.count_in()
            metrics.counters[class_in(item.record['label'])] += 1
            key = str(item.coords.partition)
            step, batches = await run(balance_one, (item, dict(table[key])))
            table[key] = step.state  # reassigned: only assignment reaches the changelog
            metrics.counters["replayed"] = sum(s.counters["replayed"] for s in steps.values())
            for batch in batches:
                await (await topics.batches.send(key=batch["batch_id"].encode(), value=batch))
                fill = await run(lambda b: (b.sizes(), b.evictions()), step.buffers)
                _batch_metrics(metrics, batch, *fill)


def _batch_metrics(metrics: StageMetrics, batch: CuratedBatch, sizes: dict[str, int],
                   evictions: dict[str, int]) -> None:
    metrics.counters[OUT] += len(batch["samples"])
    metrics.counters[BATCHES] += 1
    for sample in batch["samples"]:
        metrics.counters[class_out(sample['label'])] += 1
        if sample["replay"]:
            metrics.counters["out.replay"] += 1
    for label, share in batch["class_shares"].items():
        metrics.gauges[share_ema(label)] = share
    for label, share in batch["target_shares"].items():
        metrics.gauges[share_target(label)] = share
    for label, factor in batch["difficulty"].items():
        metrics.gauges[class_difficulty(label)] = factor
    for sample in batch["samples"]:
        metrics.gauges[class_weight(sample['label'])] = sample["weight"]
    for label, size in sizes.items():
        metrics.gauges[buffer_fill(label)] = float(size)
    for label, n in evictions.items():
        metrics.counters[evicted(label)] = int(n)


def _declare_feedback(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                      metrics: StageMetrics) -> None:
    buffers: dict[int, ClassBuffers] = {}

    def buffers_of(partition: int) -> ClassBuffers:
        if partition not in buffers:
            buffers[partition] = buffers_for(client, config.redis.namespace, partition,
                                             config.balance)
        return buffers[partition]

    step = Feedback(config.balance, LossStore(client, config.redis.namespace), buffers_of)
    run = Runner("feedback")

    @app.agent(topics.feedback, name="sluice-feedback")
    async def feedback(stream: faust.StreamT) -> None:
        async for _ in stream:
            metrics.count_in()
            (outcome,) = await run(step.run, [item_of(stream.current_event)])  # type: ignore[arg-type]
            result = outcome.record
            metrics.counters[OUT] += 1
            metrics.counters["hard"] += result["hard"]
            metrics.counters["replay.queued"] += result["queued"]
            if math.isfinite(result["threshold"]):
                metrics.gauges["hard.threshold"] = result["threshold"]
            for label, factor in result["difficulty"].items():
                metrics.gauges[class_difficulty(label)] = factor


_DECLARE: dict[str, Callable[[faust.App, Topics, Curation, redis.Redis, StageMetrics], None]] = {
    "ingest": _declare_ingest,
    "dedup": _declare_dedup,
    "balance": _declare_balance,
    "feedback": _declare_feedback,
}
