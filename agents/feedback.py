"""The feedback step: fold the trainer's per-sample losses into the loss statistics shared
by all workers (in Redis), publish the difficulty factors, and re-queue hard examples on
the buffers of the partition whose batch they came from. The decision itself is the pure
``agents.feedback_logic.process_feedback``.

Idempotent by (batch id, step): the pairs already folded are kept in a bounded sorted set
(``feedback_dedup_cap`` newest, none older than ``feedback_dedup_ttl_s``) checked and
written in the same transaction as the fold, so a redelivered record (a worker restarted
before its commit, a trainer that re-sends after its own restart) changes nothing. A record
that cannot be folded (``feedback_problem``) is a counted skip, logged with where it was
read. One window is left: a crash after the fold and before its hard examples are queued
loses those replays (the losses themselves are folded exactly once).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from agents.buffers import ClassBuffers
from agents.compose import partition_of
from agents.config import BalanceSettings
from agents.feedback_logic import FeedbackOutcome, feedback_problem, process_feedback
from agents.keys import difficulty_key, feedback_seen_key, loss_state_key
from agents.step import Item, Outcome, Step
from schemas.records import Feedback as FeedbackRecord

log = logging.getLogger(__name__)

_DEFAULT = BalanceSettings()


class LossStore:
    """The shared ``LossEMA`` state, the difficulty factor per class, and the (batch id,
    step) pairs already folded, in Redis."""

    def __init__(self, client: redis.Redis, namespace: str, *,
                 seen_cap: int = _DEFAULT.feedback_dedup_cap,
                 seen_ttl_s: int = _DEFAULT.feedback_dedup_ttl_s) -> None:
        self.redis = client
        self.namespace = namespace
        self.seen_cap = int(seen_cap)
        self.seen_ttl_s = int(seen_ttl_s)

    def difficulty(self) -> dict[str, float]:
        """The current difficulty factor per class (empty before any feedback)."""
        raw: dict[bytes, bytes] = self.redis.hgetall(  # type: ignore[assignment]
            difficulty_key(self.namespace))
        return {k.decode(): float(v) for k, v in raw.items()}

    def fold(self, feedback: FeedbackRecord, alpha: float, hard_k: float, *,
             max_classes: int | None = None) -> FeedbackOutcome | None:
        """Fold one record in, in an optimistic transaction (workers share the state);
        None when its (batch id, step) was folded before."""
        key = loss_state_key(self.namespace)
        seen = feedback_seen_key(self.namespace)
        pair = f"{feedback['batch_id']}#{int(feedback['step'])}"

        def update(pipe: redis.client.Pipeline) -> FeedbackOutcome | None:
            if pipe.zscore(seen, pair) is not None:
                return None
            raw = pipe.get(key)
            state = json.loads(raw) if raw else None
            outcome = process_feedback(state, feedback, alpha=alpha, hard_k=hard_k,
                                       max_classes=max_classes)
            now = time.time()
            pipe.multi()
            pipe.set(key, json.dumps(outcome.state))
            if outcome.difficulty:
                pipe.hset(difficulty_key(self.namespace),
                          mapping=dict(outcome.difficulty))  # type: ignore[arg-type]
            pipe.zadd(seen, {pair: now})
            pipe.zremrangebyscore(seen, "-inf", now - self.seen_ttl_s)
            pipe.zremrangebyrank(seen, 0, -(self.seen_cap + 1))
            return outcome

        outcome: FeedbackOutcome | None = self.redis.transaction(  # type: ignore[assignment]
            update, key, seen, value_from_callable=True)  # type: ignore[arg-type]
        return outcome


class Feedback(Step):
    """Feedback records in; per record, what changed (a sink step): ``{"difficulty",
    "hard", "threshold", "queued", "ignored", "replayed"}``, or a rejection (``reason``,
    ``detail``) for a record that cannot be folded.

    ``partitions`` (the samples topic's) bounds the partition a batch id may name.
    Counters: ``replayed`` (records folded before), ``ignored`` (losses of classes beyond
    the bound), ``rejected.<reason>``.
    """

    name = "feedback"

    def __init__(self, settings: BalanceSettings, losses: LossStore,
                 buffers_of: Callable[[int], ClassBuffers], *,
                 partitions: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.losses = losses
        self.buffers_of = buffers_of
        self.partitions = partitions

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """Fold each record; re-queue its hard examples."""
        return [self._one(item) for item in items]

    def _one(self, item: Item) -> Outcome:
        record: FeedbackRecord = item.record
        problem = feedback_problem(record, self.partitions)
        if problem is not None:
            reason, detail = problem
            c = item.coords
            log.warning("feedback for batch %.80r skipped (%s[%d]@%d): %s: %s",
                        record.get("batch_id"), c.topic, c.partition, c.offset, reason, detail)
            return Outcome({"reason": reason, "detail": detail}, rejected=True)
        b = self.settings
        outcome = self.losses.fold(record, b.loss_alpha, b.hard_k,
                                   max_classes=b.max_labels + 1)
        if outcome is None:
            self.counters["replayed"] += 1
            return Outcome(_result(replayed=True), rejected=False)
        self.counters["ignored"] += outcome.ignored
        queued = 0
        if outcome.hard_ids:
            queued = self.buffers_of(partition_of(record["batch_id"])).push_replay(
                outcome.hard_ids)
        return Outcome(_result(difficulty=outcome.difficulty, hard=len(outcome.hard_ids),
                               threshold=outcome.threshold, queued=queued,
                               ignored=outcome.ignored), rejected=False)


def _result(*, difficulty: dict[str, float] | None = None, hard: int = 0,
            threshold: float = math.inf, queued: int = 0, ignored: int = 0,
            replayed: bool = False) -> dict[str, Any]:
    return {"difficulty": difficulty or {}, "hard": hard, "threshold": threshold,
            "queued": queued, "ignored": ignored, "replayed": replayed}
