"""The filter agents: ingest (raw-events → sluice.candidates) and dedup (→ sluice.samples).

Each takes micro-batches off its topic, runs its stage's steps (``agents.pipeline``) in an
executor, and sends every outcome on before Faust may commit the offsets.
"""

from __future__ import annotations

import faust
import redis

from agents.config import Curation
from agents.index import VectorIndex
from agents.pipeline import build_pipeline
from agents.runner import Runner, item_of, send_outcomes
from streams.app import Topics
from streams.metrics import INDEX_SIZE, StageMetrics


def declare_ingest(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
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


def declare_dedup(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
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
