"""The feedback store (``LossStore``) against the session stack's Redis: one fold per
(batch id, step), whatever the redeliveries."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import redis

from agents.feedback import LossStore
from agents.keys import feedback_seen_key, loss_state_key
from schemas.records import Feedback
from sluice.settings import Settings
from streams.connections import redis_client
from tests.agents.pipeline_util import unique_id

pytestmark = pytest.mark.integration


def stored(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """The loss state as the store keeps it."""
    raw = client.get(loss_state_key(namespace))
    assert isinstance(raw, bytes)
    return dict(json.loads(raw))


def record(batch_id: str, step: int, losses: list[float]) -> Feedback:
    return Feedback(batch_id=batch_id, step=step, model="bow", created_at=0,
                    losses=[{"id": f"s{i}", "label": "python" if i % 2 else "docs",
                             "loss": loss, "correct": None} for i, loss in enumerate(losses)])


def test_the_same_feedback_twice_folds_once(stack: Settings, client: redis.Redis) -> None:
    namespace = unique_id()
    store = LossStore(client, namespace)
    first = record("0-3-abcdef012345", 7, [0.5, 1.5, 0.7, 2.0])
    store.fold(first, 0.9, 2.0)
    once = stored(client, namespace)
    assert store.fold(first, 0.9, 2.0) is None  # redelivered
    assert stored(client, namespace) == once
    # The same batch at another step is new feedback.
    assert store.fold(record("0-3-abcdef012345", 8, [0.5, 1.5]), 0.9, 2.0) is not None
    assert stored(client, namespace) != once


def test_the_memory_of_folded_pairs_is_bounded(stack: Settings, client: redis.Redis) -> None:
    namespace = unique_id()
    store = LossStore(client, namespace, seen_cap=3, seen_ttl_s=3600)
    for step in range(5):
        assert store.fold(record("1-0-abcdef012345", step, [0.5]), 0.9, 2.0) is not None
    seen = feedback_seen_key(namespace)
    assert [bytes(m).decode() for m in client.zrange(seen, 0, -1)] == [  # type: ignore[arg-type]
        f"1-0-abcdef012345#{step}" for step in (2, 3, 4)]
    # Past the TTL a pair is forgotten at the next fold.
    client.zadd(seen, {"1-0-abcdef012345#4": 1.0})
    store.fold(record("1-0-abcdef012345", 9, [0.5]), 0.9, 2.0)
    assert client.zscore(seen, "1-0-abcdef012345#4") is None


def test_two_workers_folding_the_same_record_fold_it_once(stack: Settings,
                                                          client: redis.Redis) -> None:
    """Two workers (a rebalance: the old owner still finishing, the new one starting over)
    fold one record at the same moment: the transaction lets one of them through."""
    namespace = unique_id()
    once = LossStore(client, unique_id())
    rec = record("2-5-abcdef012345", 3, [0.5, 1.5, 0.7, 2.0, 0.1])
    once.fold(rec, 0.9, 2.0)
    expected = stored(client, once.namespace)
    results: list[object] = []

    def fold() -> None:
        conn = redis_client(stack.redis)
        try:
            results.append(LossStore(conn, namespace).fold(rec, 0.9, 2.0))
        finally:
            conn.close()

    threads = [threading.Thread(target=fold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(r is not None for r in results) == 1 and len(results) == 4
    assert stored(client, namespace) == expected
