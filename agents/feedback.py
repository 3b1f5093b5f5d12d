"""The feedback step: fold the trainer's per-sample losses into the loss statistics shared
by all workers (in Redis), publish the difficulty factors, and re-queue hard examples on
the buffers of the partition whose batch they came from. The decision itself is the pure
``agents.feedback_logic.process_feedback``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import redis

from agents.buffers import ClassBuffers
from agents.compose import partition_of
from agents.config import BalanceSettings
from agents.feedback_logic import FeedbackOutcome, process_feedback
from agents.keys import difficulty_key, loss_state_key
from agents.step import Item, Outcome, Step
from schemas.records import Feedback as FeedbackRecord


class LossStore:
    """The shared ``LossEMA`` state and the difficulty factor per class, in Redis."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.redis = client
        self.namespace = namespace

    def difficulty(self) -> dict[str, float]:
        """The current difficulty factor per class (empty before any feedback)."""
        raw: dict[bytes, bytes] = self.redis.hgetall(  # type: ignore[assignment]
            difficulty_key(self.namespace))
        return {k.decode(): float(v) for k, v in raw.items()}

    def fold(self, feedback: FeedbackRecord, alpha: float, hard_k: float) -> FeedbackOutcome:
        """Fold one record in, in an optimistic transaction (workers share the state)."""
        key = loss_state_key(self.namespace)

        def update(pipe: redis.client.Pipeline) -> FeedbackOutcome:
            raw = pipe.get(key)
            state = json.loads(raw) if raw else None
            outcome = process_feedback(state, feedback, alpha=alpha, hard_k=hard_k)
            pipe.multi()
            pipe.set(key, json.dumps(outcome.state))
            if outcome.difficulty:
                pipe.hset(difficulty_key(self.namespace),
                          mapping=dict(outcome.difficulty))  # type: ignore[arg-type]
            return outcome

        outcome: FeedbackOutcome = self.redis.transaction(  # type: ignore[assignment]
            update, key, value_from_callable=True)  # type: ignore[arg-type]
        return outcome


class Feedback(Step):
    """Feedback records in; per record, what changed (a sink step): ``{"difficulty",
    "hard", "threshold", "queued"}``."""

    name = "feedback"

    def __init__(self, settings: BalanceSettings, losses: LossStore,
                 buffers_of: Callable[[int], ClassBuffers]) -> None:
        super().__init__()
        self.settings = settings
        self.losses = losses
        self.buffers_of = buffers_of

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """Fold each record; re-queue its hard examples."""
        results = []
        for item in items:
            record: FeedbackRecord = item.record
            outcome = self.losses.fold(record, self.settings.loss_alpha, self.settings.hard_k)
            queued = 0
            if outcome.hard_ids:
                queued = self.buffers_of(partition_of(record["batch_id"])).push_replay(
                    outcome.hard_ids)
            results.append(Outcome({"difficulty": outcome.difficulty,
                                    "hard": len(outcome.hard_ids),
                                    "threshold": outcome.threshold, "queued": queued},
                                   rejected=False))
        return results
