"""The balance and feedback steps, and their thin Faust agents.

balance — per samples partition: buffer each new sample in Redis (idempotent by id), update
the class EMA, and every ``batch_size`` new samples compose a batch by the policy's target
shares (× the difficulty factor from feedback), with up to ``replay_fraction`` of it hard
examples. Its state (EMA, rounding credit, sequence, pending count) is a changelog-backed
Faust table value, reassigned after every sample.

feedback — folds the trainer's per-sample losses into a loss EMA per class (kept in Redis,
shared by all workers), publishes the difficulty factors, and re-queues hard examples on
the buffers of the partition whose batch they came from.
"""

from __future__ import annotations

import json
import math
from typing import Any

import faust
import redis

from agents.buffers import ClassBuffers
from agents.compose import allocate_with_credit, assemble_batch, batch_order, partition_of
from agents.feedback_logic import FeedbackOutcome, process_feedback
from agents.keys import difficulty_key, loss_state_key
from agents.metrics import StageMetrics
from agents.outcome import now_ms
from agents.policy import label_for, targets_for
from agents.stats import ClassEMA
from schemas.records import CuratedBatch, CuratedSample, Feedback
from sluice.settings import Settings
from streams.app import Topics


class Balancer:
    """The balance step of one samples partition."""

    def __init__(self, settings: Settings, client: redis.Redis, partition: int,
                 namespace: str | None = None) -> None:
        b = settings.balance
        self.settings = b
        self.redis = client
        self.partition = partition
        self.namespace = namespace or settings.redis.namespace
        self.buffers = ClassBuffers(client, self.namespace, partition, b.buffer_cap, b.reuse_cap,
                                    seen_ttl_s=b.seen_ttl_s or None, retain_s=b.retain_s)
        self.policy = label_for(b)

    def add(self, sample: CuratedSample, state: dict[str, Any] | None
            ) -> tuple[dict[str, Any], CuratedBatch | None, bool]:
        """Take one sample; returns the new state, a batch when one is due, and whether the
        sample was new (False: a replay of an id already buffered, which changes nothing)."""
        state = dict(state or {})
        if not self.buffers.add(sample):
            return state, None, False
        b = self.settings
        ema = ClassEMA.restore(state.get("ema"), b.alpha, b.window)
        ema.update(sample["label"])
        state["ema"] = ema.to_dict()
        state["pending"] = int(state.get("pending", 0)) + 1
        batch = None
        if state["pending"] >= b.batch_size:
            batch = self.compose(ema, state)
            if batch is not None:
                state["pending"] = 0
        return state, batch, True

    def compose(self, ema: ClassEMA, state: dict[str, Any]) -> CuratedBatch | None:
        """Draw one batch by the policy; updates ``state`` (sequence, credit) in place."""
        b = self.settings
        difficulty = self.difficulty()
        targets = targets_for(ema.get(), b, difficulty)
        replays = self.buffers.pop_replay(int(b.batch_size * b.replay_fraction))
        counts, credit = allocate_with_credit(
            b.batch_size - len(replays), targets.shares, self.buffers.sizes(),
            state.get("credit") or {})
        drawn = self.buffers.draw(counts, exclude=[r["id"] for r in replays]) + replays
        if not drawn:
            return None
        sequence = int(state.get("sequence", 0))
        state["sequence"] = sequence + 1
        state["credit"] = credit
        return assemble_batch(
            partition=self.partition, sequence=sequence,
            samples=batch_order(drawn, b.seed, self.partition, sequence),
            policy=self.policy, class_shares=ema.shares(), target_shares=targets.shares,
            weights=targets.weights, difficulty=difficulty, created_at=now_ms())

    def difficulty(self) -> dict[str, float]:
        """The current difficulty factor per class (empty before any feedback)."""
        raw: dict[bytes, bytes] = self.redis.hgetall(  # type: ignore[assignment]
            difficulty_key(self.namespace))
        return {k.decode(): float(v) for k, v in raw.items()}


class FeedbackStep:
    """Folds Feedback records into the shared loss statistics; re-queues hard examples."""

    def __init__(self, settings: Settings, client: redis.Redis,
                 namespace: str | None = None) -> None:
        self.settings = settings
        self.redis = client
        self.namespace = namespace or settings.redis.namespace
        self._buffers: dict[int, ClassBuffers] = {}

    def _buffers_of(self, partition: int) -> ClassBuffers:
        if partition not in self._buffers:
            b = self.settings.balance
            self._buffers[partition] = ClassBuffers(
                self.redis, self.namespace, partition, b.buffer_cap, b.reuse_cap,
                seen_ttl_s=b.seen_ttl_s or None, retain_s=b.retain_s)
        return self._buffers[partition]

    def process(self, feedback: Feedback) -> dict[str, Any]:
        """Update the statistics (optimistic transaction: workers share them); returns
        what changed: difficulty, hard ids, threshold, replays queued."""
        b = self.settings.balance
        key = loss_state_key(self.namespace)

        def update(pipe: redis.client.Pipeline) -> FeedbackOutcome:
            raw = pipe.get(key)
            state = json.loads(raw) if raw else None
            outcome = process_feedback(state, feedback, alpha=b.loss_alpha, hard_k=b.hard_k)
            pipe.multi()
            pipe.set(key, json.dumps(outcome.state))
            if outcome.difficulty:
                pipe.hset(difficulty_key(self.namespace),
                          mapping=dict(outcome.difficulty))  # type: ignore[arg-type]
            return outcome

        outcome: FeedbackOutcome = self.redis.transaction(  # type: ignore[assignment]
            update, key, value_from_callable=True)  # type: ignore[arg-type]
        queued = 0
        if outcome.hard_ids:
            queued = self._buffers_of(partition_of(feedback["batch_id"])).push_replay(
                outcome.hard_ids)
        return {"difficulty": outcome.difficulty, "hard": len(outcome.hard_ids),
                "threshold": outcome.threshold, "queued": queued}


def declare_balance(app: faust.App, topics: Topics, settings: Settings, client: redis.Redis,
                    metrics: StageMetrics) -> None:
    """The balance agent over ``sluice.samples``."""
    from agents.worker import Runner

    table = app.Table("sluice-balance-state", default=dict, partitions=settings.topics.partitions,
                      key_type=str)  # values: JSON (the default serializer)
    balancers: dict[int, Balancer] = {}
    run = Runner("balance")
    metrics.labels["policy"] = label_for(settings.balance)

    def step(args: tuple[int, CuratedSample, dict[str, Any]]
             ) -> tuple[dict[str, Any], CuratedBatch | None, bool]:
        partition, sample, state = args
        if partition not in balancers:
            balancers[partition] = Balancer(settings, client, partition)
        return balancers[partition].add(sample, state)

    @app.agent(topics.samples, name="sluice-balance")
    async def balance(stream: faust.StreamT) -> None:
        async for sample in stream:
            partition = stream.current_event.message.partition  # type: ignore[union-attr]
            metrics.count_in()
            metrics.counters[f"in.label.{sample['label']}"] += 1
            state, batch, fresh = await run(step, (partition, sample, dict(table[str(partition)])))
            table[str(partition)] = state  # reassigned: only assignment reaches the changelog
            if not fresh:
                metrics.counters["replayed"] += 1
            if batch is not None:
                await (await topics.batches.send(key=batch["batch_id"].encode(), value=batch))
                buffers = balancers[partition].buffers
                fill = await run(lambda b: (b.sizes(), b.evictions()), buffers)
                _batch_metrics(metrics, batch, *fill)


def _batch_metrics(metrics: StageMetrics, batch: CuratedBatch, sizes: dict[str, int],
                   evictions: dict[str, int]) -> None:
    metrics.counters["out"] += len(batch["samples"])
    metrics.counters["batches"] += 1
    for sample in batch["samples"]:
        metrics.counters[f"out.label.{sample['label']}"] += 1
        if sample["replay"]:
            metrics.counters["out.replay"] += 1
    for label, share in batch["class_shares"].items():
        metrics.gauges[f"share.ema.{label}"] = share
    for label, share in batch["target_shares"].items():
        metrics.gauges[f"share.target.{label}"] = share
    for label, factor in batch["difficulty"].items():
        metrics.gauges[f"difficulty.{label}"] = factor
    for sample in batch["samples"]:
        metrics.gauges[f"weight.{sample['label']}"] = sample["weight"]
    for label, size in sizes.items():
        metrics.gauges[f"buffer.{label}"] = float(size)
    for label, n in evictions.items():
        metrics.counters[f"evicted.{label}"] = int(n)


def declare_feedback(app: faust.App, topics: Topics, settings: Settings, client: redis.Redis,
                     metrics: StageMetrics) -> None:
    """The feedback agent over ``training-feedback``."""
    from agents.worker import Runner

    step = FeedbackStep(settings, client)
    run = Runner("feedback")

    @app.agent(topics.feedback, name="sluice-feedback")
    async def feedback(stream: faust.StreamT) -> None:
        async for record in stream:
            metrics.count_in()
            result = await run(step.process, record)
            metrics.counters["out"] += 1
            metrics.counters["hard"] += result["hard"]
            metrics.counters["replay.queued"] += result["queued"]
            if math.isfinite(result["threshold"]):
                metrics.gauges["hard.threshold"] = result["threshold"]
            for label, factor in result["difficulty"].items():
                metrics.gauges[f"difficulty.{label}"] = factor
