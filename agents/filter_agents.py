"""The filter agents: ingest (raw-events → sluice.candidates) and dedup (→ sluice.samples).

Each takes micro-batches off its topic, runs its stage's steps (``agents.pipeline``) in an
executor, and sends every outcome on before Faust may commit the offsets. What may go wrong
is decided in ``agents.runner``: a record's own problem is its rejection, a store failing
for everyone is waited out in place, and nothing leaves the agent's body for a record
(faust acks the whole micro-batch when something does); a batch left undone (the worker
stops while it waits) is held, never acked (``agents.runner.consume``).
"""

from __future__ import annotations

from collections.abc import Sequence

import faust
import redis

from agents.config import Curation
from agents.exact import ExactClaims
from agents.index import VectorIndex
from agents.pipeline import Pipeline, build_pipeline
from agents.runner import Runner, consume, item_of, send_outcomes
from agents.step import Outcome
from streams.app import Topics
from streams.metrics import ADMIT_HOLD_MAX_S, INDEX_SIZE, StageMetrics


def declare_ingest(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                    metrics: StageMetrics) -> None:
    pipeline = build_pipeline(config, client, stages=["ingest"])
    claims = ExactClaims(client, config.redis.namespace)
    run = Runner("ingest", metrics, stopping=lambda: app.should_stop)

    async def handle(events: Sequence[faust.EventT]) -> None:
        batch = [item_of(e) for e in events]
        metrics.count_in(len(batch))
        outcomes = await run.decide(pipeline.run, batch, "ingest")
        await run(release_failed_claims, (claims, outcomes))
        outcomes = await send_outcomes(batch, outcomes, topics.candidates, topics.rejected,
                                       stage="ingest", metrics=metrics, stopping=run.stopping)
        metrics.count_outcomes(outcomes)
        metrics.add_seconds(pipeline.seconds())

    @app.agent(topics.raw, name="sluice-ingest")
    async def ingest(stream: faust.StreamT) -> None:
        await consume(stream, config.ingest.batch_size, config.ingest.batch_within_s, handle)


def declare_dedup(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                   metrics: StageMetrics) -> None:
    pipeline = build_pipeline(config, client, stages=["dedup"])  # loads the model now
    index = VectorIndex(client, config.redis.namespace, config.dedup)
    admitting = admission_index(pipeline)
    claims = ExactClaims(client, config.redis.namespace)
    run = Runner("dedup", metrics, stopping=lambda: app.should_stop)
    metrics.labels["model"] = config.dedup.model if config.dedup.enabled else "none"

    async def handle(events: Sequence[faust.EventT]) -> None:
        batch = [item_of(e) for e in events]
        metrics.count_in(len(batch))
        outcomes = await run.decide(pipeline.run, batch, "dedup")
        await run(release_failed_claims, (claims, outcomes))
        outcomes = await send_outcomes(batch, outcomes, topics.samples, topics.rejected,
                                       stage="dedup", metrics=metrics, stopping=run.stopping)
        metrics.count_outcomes(outcomes, (item.record["timestamp"] for item in batch))
        metrics.add_seconds(pipeline.seconds())
        metrics.gauges[INDEX_SIZE] = float(await run(lambda _: index.size(), None))
        if admitting is not None:
            metrics.gauges[ADMIT_HOLD_MAX_S] = admitting.longest_hold_s

    @app.agent(topics.candidates, name="sluice-dedup")
    async def dedup(stream: faust.StreamT) -> None:
        await consume(stream, config.dedup.batch_size, config.dedup.batch_within_s, handle)


def admission_index(pipeline: Pipeline) -> VectorIndex | None:
    """The vector set the pipeline's semantic step admits into (None: no semantic step)."""
    for step in pipeline.steps:
        index = getattr(step, "index", None)
        if isinstance(index, VectorIndex):
            return index
    return None


def release_failed_claims(args: tuple[ExactClaims, Sequence[Outcome]]) -> None:
    """Release the exact-digest claims of the records that failed (``error:*``) after
    claiming: such an event never becomes a sample, so a later copy of its content must not
    be rejected as its duplicate. (A crash instead of a failure needs nothing: the batch
    was never acked, its events are read again and get their own claims back.)"""
    claims, outcomes = args
    pairs = [(o.given["digest"], o.given["id"]) for o in outcomes
             if o.rejected and isinstance(o.given, dict) and "digest" in o.given]
    if pairs:
        claims.release(pairs)

