"""The sink agents: balance (sluice.samples → curated-batches) and feedback (the trainer's
losses → difficulty factors and replays). Their steps (``Balance``, ``Feedback``) hold
the logic; the agents keep the Faust table and send what the steps emit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import faust
import redis
from kafka.admin import KafkaAdminClient

from agents.balance import Balance, sample_share
from agents.buffers import ClassBuffers, buffers_for
from agents.config import Curation
from agents.feedback import Feedback, LossStore
from agents.pacing import Pacer
from agents.policy import label_for
from agents.runner import Runner, decode_problem, item_of
from agents.step import Item, Outcome, Step, error_rejection
from schemas.records import CuratedBatch
from streams.app import Topics
from streams.connections import kafka_client_options
from streams.lag import unconsumed
from streams.metrics import (
    BATCHES,
    IN,
    OUT,
    REJECTED,
    StageMetrics,
    buffer_fill,
    class_difficulty,
    class_out,
    class_weight,
    dropped,
    evicted,
    evicted_unused,
    rejected,
    share_ema,
    share_target,
)

# Test-only fault injection: a worker started with SLUICETEST_EXIT_AT=<point> exits at once
# (no flush, no goodbye: as a SIGKILL would) when it reaches that point, so a test can
# crash it exactly between the draw and the send. Read once, at import.
EXIT_AT = os.environ.get("SLUICETEST_EXIT_AT", "")
EXIT_CODE = 86

log = logging.getLogger(__name__)


def _exit_at(point: str) -> None:
    if point == EXIT_AT:
        os._exit(EXIT_CODE)


def declare_balance(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                     metrics: StageMetrics) -> None:
    table = app.Table("sluice-balance-state", default=dict, partitions=config.topics.partitions,
                      key_type=str)  # values: JSON (the default serializer)
    losses = LossStore(client, config.redis.namespace)
    limit = config.topics.max_message_bytes
    sample_share(config.balance, limit)  # a batch size the message limit cannot hold: at start
    steps: dict[int, Balance] = {}
    run = Runner("balance")
    metrics.labels["policy"] = label_for(config.balance)
    trainer_paced = config.balance.pace == "trainer"
    pacer = Pacer(config.balance.ahead_batches)
    # One balance call at a time: the timer and the agent share the steps and the pacer.
    lock = asyncio.Lock()

    def step_of(partition: int, state: dict[str, Any]) -> Balance:
        """The partition's step, its state the table's (``_newest``)."""
        if partition not in steps:
            buffers = buffers_for(client, config.redis.namespace, partition, config.balance)
            steps[partition] = Balance(config.balance, buffers, losses, message_limit=limit)
        step = steps[partition]
        step.state = _newest(state, step.state)
        return step

    def balance_one(args: tuple[Item, dict[str, Any]]) -> tuple[Balance, list[CuratedBatch]]:
        item, state = args
        step = step_of(item.coords.partition, state)
        batches = [outcome.record for outcome in step.run([item])]
        if trainer_paced and pacer.budget() > len(batches):
            batches += step.paced(pacer.budget() - len(batches))
        return step, batches

    async def send_batches(step: Balance, key: str, batches: list[CuratedBatch]) -> None:
        try:
            for batch in batches:
                await (await topics.batches.send(key=batch["batch_id"].encode(),
                                                 value=batch))
                pacer.sent()
                await run(step.confirm, batch)
                fill = await run(lambda b: (b.sizes(), b.evictions(),
                                            b.evictions(unused=True)), step.buffers)
                _batch_metrics(metrics, batch, *fill)
        finally:
            # A batch whose send failed stays recorded: the next run re-sends it.
            step.release()

    @app.agent(topics.samples, name="sluice-balance")
    async def balance(stream: faust.StreamT) -> None:
        # Iterate values (stream.events() never yields in faust-streaming 0.15).
        async for _ in stream:
            item = item_of(stream.current_event)  # type: ignore[arg-type]
            metrics.count_in()
            key = str(item.coords.partition)
            problem = decode_problem("balance", item)
            if problem is not None:
                await _send_rejection(topics, metrics, problem)
                continue
            async with lock:
                try:
                    step, batches = await run(balance_one, (item, dict(table[key])))
                except Exception as exc:  # not the store (Runner waits that out): this record
                    await _reject(topics, metrics, "balance", item, exc)
                    continue
                if batches:
                    _exit_at("balance.before_send")
                table[key] = step.state  # reassigned: only assignment reaches the changelog
                await send_batches(step, key, batches)
                _pace_metrics(metrics, pacer, steps.values(), trainer_paced)
            _step_counters(metrics, steps.values())

    if not trainer_paced:
        return
    admin: list[KafkaAdminClient] = []  # made in the probe's thread, on first use

    def probe() -> int:
        if not admin:
            admin.append(KafkaAdminClient(**kafka_client_options(config.kafka)))
        return unconsumed(admin[0], config.balance.trainer_group, config.topics.batches,
                          config.topics.partitions)

    @app.timer(interval=config.balance.pace_interval_s)
    async def pace() -> None:
        """Serve a trainer that caught up even when no sample arrives: probe its position,
        then compose from the pools of the partitions this worker holds. A table write
        needs a stream event, so the state these batches advance (sequence, credit) is
        kept by the step and written with the partition's next sample (``_newest``)."""
        mark = pacer.mark()
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, probe)
        except Exception as exc:  # the broker cannot say now: compose nothing, ask again
            metrics.counters["pace.probe_failed"] += 1
            log.warning("balance: the trainer's position on %s is unknown: %s",
                        config.topics.batches, exc)
            return
        pacer.observe(found, mark)
        held = {tp.partition for tp in app.assignor.assigned_actives()
                if tp.topic == config.topics.samples}
        async with lock:
            for partition in sorted(held):
                if pacer.budget() <= 0:
                    break
                try:
                    # Read, never written here: a table write needs a stream event.
                    step = await run(lambda args: step_of(*args),
                                     (partition, dict(table[str(partition)])))
                    batches = await run(step.paced, pacer.budget())
                except Exception as exc:  # a bug, not the store: the next tick tries again
                    log.exception("balance: pacing partition %d failed: %s", partition, exc)
                    continue
                if batches:
                    _exit_at("balance.before_send")
                await send_batches(step, str(partition), batches)
            _pace_metrics(metrics, pacer, [steps[p] for p in held if p in steps], True)
        _step_counters(metrics, steps.values())


def _newest(table_state: dict[str, Any], step_state: dict[str, Any]) -> dict[str, Any]:
    """The partition's state: the table's, with the sequence, credit and measured flow
    (arrivals per drawn sample, ``agents.sustain.Flow``) of batches the timer composed since
    the table was last written (they are ahead of it)."""
    if int(step_state.get("sequence", 0)) <= int(table_state.get("sequence", 0)):
        return table_state
    newest = {**table_state, "sequence": step_state["sequence"],
              "credit": step_state.get("credit", {}), "pending": 0}
    if "flow" in step_state:
        newest["flow"] = step_state["flow"]
    return newest


def _pace_metrics(metrics: StageMetrics, pacer: Pacer, steps: Iterable[Balance],
                  trainer_paced: bool) -> None:
    """``batches_ahead`` (of the trainer's committed position) and ``trainer_starved``
    (1: the trainer is behind by less than ``ahead_batches`` and no pool this worker holds
    has a full batch for it), plus the ``starved`` count of such moments."""
    if not trainer_paced or pacer.ahead is None:
        return
    metrics.gauges["batches_ahead"] = float(pacer.ahead)
    stepped = list(steps)
    starved = pacer.budget() > 0 and bool(stepped) and all(s.starved for s in stepped)
    metrics.gauges["trainer_starved"] = float(starved)
    if starved:
        metrics.counters["starved"] += 1


async def _reject(topics: Topics, metrics: StageMetrics, stage: str, item: Item,
                  exc: Exception) -> None:
    """A record a sink step failed on becomes its ``error:<ExceptionClass>`` rejection on
    ``sluice.rejected`` (Kafka Streams' processing handler): an outcome, and the agent goes
    on with the next record instead of crash-looping on this one."""
    log.warning("%s: %s[%d]@%d rejected: %s: %s", stage, item.coords.topic,
                item.coords.partition, item.coords.offset,
                type(exc).__name__, exc, exc_info=exc)
    await _send_rejection(topics, metrics, error_rejection(stage, f"{stage} step", item, exc))


async def _send_rejection(topics: Topics, metrics: StageMetrics, outcome: Outcome) -> None:
    await (await topics.rejected.send(key=outcome.record["id"].encode(), value=outcome.record))
    metrics.counters[REJECTED] += 1
    metrics.counters[rejected(str(outcome.reason))] += 1


def _step_counters(metrics: StageMetrics, steps: Iterable[Step]) -> None:
    """The steps' own counters (replayed, resent, truncated, relabeled, per-class in) as
    the stage's totals; the stage counts in, out and batches itself."""
    total: Counter[str] = Counter()
    for step in steps:
        total.update(step.counters)
    for name, n in total.items():
        if name not in (IN, OUT, REJECTED):
            metrics.counters[name] = n


def _batch_metrics(metrics: StageMetrics, batch: CuratedBatch, sizes: dict[str, int],
                   evictions: dict[str, int], unused: dict[str, int]) -> None:
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
    for label, n in unused.items():
        metrics.counters[evicted_unused(label)] = int(n)


def declare_feedback(app: faust.App, topics: Topics, config: Curation, client: redis.Redis,
                      metrics: StageMetrics) -> None:
    buffers: dict[int, ClassBuffers] = {}

    def buffers_of(partition: int) -> ClassBuffers:
        if partition not in buffers:
            buffers[partition] = buffers_for(client, config.redis.namespace, partition,
                                             config.balance)
        return buffers[partition]

    b = config.balance
    store = LossStore(client, config.redis.namespace, seen_cap=b.feedback_dedup_cap,
                      seen_ttl_s=b.feedback_dedup_ttl_s)
    step = Feedback(b, store, buffers_of, partitions=config.topics.partitions)
    run = Runner("feedback")

    @app.agent(topics.feedback, name="sluice-feedback")
    async def feedback(stream: faust.StreamT) -> None:
        async for _ in stream:
            metrics.count_in()
            item = item_of(stream.current_event)  # type: ignore[arg-type]
            problem = decode_problem("feedback", item)
            if problem is not None:
                await _send_rejection(topics, metrics, problem)
                continue
            try:
                (outcome,) = await run(step.run, [item])
            except Exception as exc:  # not the store (Runner waits that out): this record
                await _reject(topics, metrics, "feedback", item, exc)
                continue
            if outcome.rejected:  # logged by the step with where it was read
                metrics.counters[dropped(str(outcome.reason))] += 1
                continue
            result = outcome.record
            metrics.counters[OUT] += 1
            metrics.counters["replayed"] += int(result["replayed"])
            metrics.counters["ignored"] += result["ignored"]
            metrics.counters["hard"] += result["hard"]
            metrics.counters["replay.queued"] += result["queued"]
            if math.isfinite(result["threshold"]):
                metrics.gauges["hard.threshold"] = result["threshold"]
            for label, factor in result["difficulty"].items():
                metrics.gauges[class_difficulty(label)] = factor
