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

Under ``replay_policy = "reducible"`` the balance stage keeps a hash-chosen slice of the
curated samples out of batches (``LossStore.hold_out``); each worker fits the reference
model on them (``LossStore.reference``, again every ``reference_refit`` new ones), and a
record's irreducible losses come from the embeddings of its samples, read from the
partition's buffers. Until a reference model exists (two classes held out), the plain
``hard_k`` rule picks the replays, counted as ``reference_missing``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import redis

from agents.buffers import ClassBuffers
from agents.compose import partition_of
from agents.config import BalanceSettings
from agents.feedback_logic import (
    FeedbackOutcome,
    ReferenceModel,
    feedback_problem,
    process_feedback,
)
from agents.keys import difficulty_key, feedback_seen_key, holdout_key, loss_state_key
from agents.step import Item, Outcome, Step
from schemas.records import Feedback as FeedbackRecord

log = logging.getLogger(__name__)

_DEFAULT = BalanceSettings()

# HSET a held-out sample unless the hash is full; 1 when it is held out (now or before).
_HOLD_OUT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def in_holdout(sample_id: str, fraction: float) -> bool:
    """Whether an id falls in the held-out slice: a hash of the id, so every worker and
    every replay agree."""
    digest = hashlib.sha256(sample_id.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


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
        self._hold_out = client.register_script(_HOLD_OUT)
        self._reference: ReferenceModel | None = None
        self._fitted_on = 0  # held-out samples the cached reference model was fit on

    def hold_out(self, sample: Mapping[str, Any], cap: int) -> bool:
        """Keep ``sample`` (its label and float16 embedding) for the reference model, unless
        ``cap`` are kept already; True when it is held out (now or before)."""
        value = str(sample["label"]).encode() + b"\n" + bytes(sample["embedding"])
        return bool(self._hold_out(keys=[holdout_key(self.namespace)],
                                   args=[str(sample["id"]), value, int(cap)]))

    def reference(self, refit: int) -> ReferenceModel | None:
        """The reference model fit on the held-out samples, fit again once ``refit`` more
        were held out (None while they hold fewer than two classes)."""
        key = holdout_key(self.namespace)
        size = int(self.redis.hlen(key))
        if self._reference is not None and size - self._fitted_on < refit:
            return self._reference
        rows: dict[bytes, bytes] = self.redis.hgetall(key)  # type: ignore[assignment]
        parsed = [value.partition(b"\n") for value in rows.values()]
        # One dimension (the newest model's, if the embedding model changed): the most common.
        dims = Counter(len(blob) for _, _, blob in parsed if blob)
        if not dims:
            return self._reference
        dim = dims.most_common(1)[0][0]
        kept = [(label.decode(), blob) for label, _, blob in parsed if len(blob) == dim]
        if len({label for label, _ in kept}) < 2:
            return self._reference
        x = np.stack([np.frombuffer(blob, dtype="<f2").astype(np.float32) for _, blob in kept])
        self._reference = ReferenceModel.fit(x, [label for label, _ in kept])
        self._fitted_on = size
        return self._reference

    def difficulty(self) -> dict[str, float]:
        """The current difficulty factor per class (empty before any feedback)."""
        raw: dict[bytes, bytes] = self.redis.hgetall(  # type: ignore[assignment]
            difficulty_key(self.namespace))
        return {k.decode(): float(v) for k, v in raw.items()}

    def fold(self, feedback: FeedbackRecord, alpha: float, hard_k: float, *,
             max_classes: int | None = None, policy: str = "hard_k",
             irreducible: Mapping[str, float] | None = None) -> FeedbackOutcome | None:
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
                                       max_classes=max_classes, policy=policy,
                                       irreducible=irreducible)
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
        if b.replay_policy == "reducible":
            irreducible = self._irreducible(record)
            policy = "reducible" if irreducible is not None else "hard_k"
            if irreducible is None:
                self.counters["reference_missing"] += 1
            outcome = self.losses.fold(record, b.loss_alpha, b.hard_k,
                                       max_classes=b.max_labels + 1, policy=policy,
                                       irreducible=irreducible)
        else:
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


    def _irreducible(self, record: FeedbackRecord) -> dict[str, float] | None:
        """The reference model's loss of each sample of the record whose embedding the
        partition's buffers still hold (None: no reference model yet)."""
        model = self.losses.reference(self.settings.reference_refit)
        if model is None:
            return None
        buffers = self.buffers_of(partition_of(record["batch_id"]))
        pipe = buffers.redis.pipeline(transaction=False)
        for item in record["losses"]:
            pipe.hget(buffers.sample_key(item["id"]), "embedding")
        dim = model.weights.shape[0]
        found = [(item["id"], item["label"], blob) for item, blob
                 in zip(record["losses"], pipe.execute(), strict=True)
                 if isinstance(blob, bytes) and len(blob) == 2 * dim]
        if not found:
            return {}
        x = np.stack([np.frombuffer(blob, dtype="<f2").astype(np.float32)
                      for _, _, blob in found])
        losses = model.losses(x, [label for _, label, _ in found])
        return {i: float(v) for (i, _, _), v in zip(found, losses, strict=True)}


def _result(*, difficulty: dict[str, float] | None = None, hard: int = 0,
            threshold: float = math.inf, queued: int = 0, ignored: int = 0,
            replayed: bool = False) -> dict[str, Any]:
    return {"difficulty": difficulty or {}, "hard": hard, "threshold": threshold,
            "queued": queued, "ignored": ignored, "replayed": replayed}
