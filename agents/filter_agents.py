"""The filter agents: ingest (raw-events → sluice.candidates) and dedup (→ sluice.samples).

Each takes micro-batches off its topic, runs its stage's steps (``agents.pipeline``) in an
executor, and sends every outcome on before Faust may commit the offsets. What may go wrong
is decided in ``agents.runner``: a record's own problem is its rejection, a store failing
for everyone is waited out in place, and nothing leaves the agent's body for a record
(faust acks the whole micro-batch when something does); a batch left undone (the worker
stops while it waits) is held, never acked (``agents.runner.consume``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import faust
import redis

from agents.config import Curation
from agents.exact import ExactClaims
from agents.index import VectorIndex
from agents.pipeline import Pipeline, build_pipeline
from agents.runner import Runner, consume, item_of, send_outcomes
from agents.sharded_index import ShardedIndex
from agents.step import Outcome
from agents.windows import WindowMemory
from streams.app import Topics
from streams.heap import HeapTrimmer
from streams.metrics import (
    ADMIT_HOLD_MAX_S,
    INDEX_AGED_OUT,
    INDEX_RACE_LOST,
    INDEX_SIZE,
    StageMetrics,
)

#: One per process (the heap is the process's): both filter stages of a worker share it.
HEAP = HeapTrimmer()


def _handle(stage: str, pipeline: Pipeline, run: Runner, claims: ExactClaims,
            passed: faust.TopicT, topics: Topics, metrics: StageMetrics, *,
            latency: bool = False,
            after: Callable[[], Awaitable[None]] | None = None
            ) -> Callable[[Sequence[faust.EventT]], Awaitable[None]]:
    """What a filter agent does with one micro-batch: decide every record (``run.decide``),
    give back the claims of records that failed, send every outcome, count (with the
    event-time latency of the decoded records when ``latency``)."""

    async def handle(events: Sequence[faust.EventT]) -> None:
        batch = [item_of(e) for e in events]
        metrics.count_in(len(batch))
        outcomes = await run.decide(pipeline.run, batch, stage)
        await run(release_failed_claims, (claims, outcomes))
        outcomes = await send_outcomes(batch, outcomes, passed, topics.rejected,
                                       stage=stage, metrics=metrics, stopping=run.stopping)
        times = [item.record["timestamp"] for item in batch
                 if latency and isinstance(item.record, dict)]
        metrics.count_outcomes(outcomes, times)
        metrics.add_seconds(pipeline.seconds())
        if after is not None:
            await after()
        await run(lambda _: HEAP.maybe_trim(), None)

    return handle


def declare_ingest(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                   metrics: StageMetrics) -> None:
    pipeline = build_pipeline(config, client, stages=["ingest"])
    run = Runner("ingest", metrics, stopping=lambda: app.should_stop)

    async def aged_out() -> None:
        publish_aged_out(metrics, pipeline)

    handle = _handle("ingest", pipeline, run, ExactClaims(client, config.redis.namespace),
                     topics.candidates, topics, metrics, after=aged_out)

    @app.agent(topics.raw, name="sluice-ingest")
    async def ingest(stream: faust.StreamT) -> None:
        await consume(stream, config.ingest.batch_size, config.ingest.batch_within_s, handle)


def declare_dedup(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                  metrics: StageMetrics) -> None:
    pipeline = build_pipeline(config, client, stages=["dedup"])  # loads the model now
    admitting = admission_index(pipeline)
    run = Runner("dedup", metrics, stopping=lambda: app.should_stop)
    metrics.labels["model"] = config.dedup.model if config.dedup.enabled else "none"

    async def index_gauges() -> None:
        if admitting is not None:
            metrics.gauges[INDEX_SIZE] = float(await run(lambda _: admitting.size(), None))
            metrics.gauges[ADMIT_HOLD_MAX_S] = admitting.longest_hold_s
            # Totals since the worker started (the index counts them; Prometheus counters).
            metrics.counters[INDEX_AGED_OUT] = admitting.counts["aged_out"]
            metrics.counters[INDEX_RACE_LOST] = admitting.counts["race_lost"]
        publish_windows(metrics, pipeline)

    handle = _handle("dedup", pipeline, run, ExactClaims(client, config.redis.namespace),
                     topics.samples, topics, metrics, latency=True,
                     after=index_gauges)

    @app.agent(topics.candidates, name="sluice-dedup")
    async def dedup(stream: faust.StreamT) -> None:
        await consume(stream, config.dedup.batch_size, config.dedup.batch_within_s, handle)


class AdmissionIndex(Protocol):
    """What the dedup stage reports of the index it admits into: one vector set
    (``agents.index.VectorIndex``) or its shards (``agents.sharded_index.ShardedIndex``)."""

    counts: Counter[str]

    @property
    def longest_hold_s(self) -> float: ...
    def size(self) -> int: ...


def admission_index(pipeline: Pipeline) -> AdmissionIndex | None:
    """The index the pipeline's semantic step admits into (None: no semantic step)."""
    for step in pipeline.steps:
        index = getattr(step, "index", None)
        if isinstance(index, VectorIndex | ShardedIndex):
            return index
    return None


def publish_aged_out(metrics: StageMetrics, pipeline: Pipeline) -> None:
    """The fuzzy steps' ``<step>.aged_out`` counters (items their index's horizon removed,
    totals since the worker started) as the stage's counters."""
    for step in pipeline.steps:
        for name, n in step.counters.items():
            if name.endswith(".aged_out"):
                metrics.counters[name] = n


def publish_windows(metrics: StageMetrics, pipeline: Pipeline) -> None:
    """The semantic step's window-memory counters (``windows.embedded``, ``cache_hits``,
    ``batch_repeats``, ``common_left_out``: totals since the worker started) as the
    stage's counters; nothing without a semantic step that embeds."""
    for step in pipeline.steps:
        windows = getattr(getattr(step, "embedder", None), "windows", None)
        if isinstance(windows, WindowMemory):
            for name, n in windows.totals().items():
                metrics.counters[name] = n
            return


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

