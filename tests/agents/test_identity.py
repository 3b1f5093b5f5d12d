"""Identity is (id, content digest) — DESIGN.md's guarantee, issue 10 finding 4.

The same pair again is a replay and changes nothing; the same id with new content is a new
version: it goes through every dedup layer (it may be a copy of something else, or of its
own earlier version), says so in its record (``earlier_digest``), and reaches balance as a
new sample. Real stdlib code, the real model, the session's Redis.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from agents.balance import Balance
from agents.buffers import buffers_for
from agents.embed import Embedder
from agents.feedback import LossStore
from agents.normalize import content_digest, normalize
from agents.pipeline import Pipeline, build_pipeline
from agents.step import Coords, Item, Outcome
from sluice.settings import Settings
from streams.serde import encode
from tests.agents.pipeline_util import comment_edit, corpus, raw_event, unique_id

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedder(stack: Settings) -> Embedder:
    return Embedder(stack.dedup)


@pytest.fixture
def curate(stack: Settings, client: redis.Redis, embedder: Embedder
           ) -> Iterator[tuple[Pipeline, Balance]]:
    """Ingest and dedup on a fresh namespace, and the balance step behind them."""
    namespace = unique_id()
    pipeline = build_pipeline(stack, client, namespace=namespace, embedder=embedder)
    balance = Balance(stack.balance, buffers_for(client, namespace, 0, stack.balance),
                      LossStore(client, namespace))
    yield pipeline, balance
    balance.buffers.clear()


def run(pipeline: Pipeline, balance: Balance, event_id: str, text: str, offset: int
        ) -> tuple[Outcome, bool]:
    """One event through ingest, dedup and balance: its outcome, and whether balance took
    it as a new sample (False: a replay, which changes nothing)."""
    value = encode("RawEvent", raw_event(event_id, text))
    [outcome] = pipeline.run([Item(value, Coords("raw-events", 0, offset), event_id.encode())])
    if outcome.rejected:
        return outcome, False
    replayed = balance.counters["replayed"]
    balance.run([Item(outcome.record, Coords("sluice.samples", 0, offset))])
    return outcome, balance.counters["replayed"] == replayed


def test_the_same_pair_again_is_a_replay(curate: tuple[Pipeline, Balance]) -> None:
    pipeline, balance = curate
    text = corpus(1)[0].text
    first, fresh = run(pipeline, balance, "doc-1", text, 0)
    assert not first.rejected and fresh
    assert first.record.get("earlier_digest") is None
    again, fresh_again = run(pipeline, balance, "doc-1", text, 1)
    assert not again.rejected  # the same outcome as the first time
    assert not fresh_again  # and balance changes nothing


def test_the_same_id_with_new_content_is_a_new_version(curate: tuple[Pipeline, Balance]
                                                       ) -> None:
    pipeline, balance = curate
    old, new = (s.text for s in corpus(2, start=3))
    first, _ = run(pipeline, balance, "data.jsonl:7", old, 0)
    assert not first.rejected
    second, fresh = run(pipeline, balance, "data.jsonl:7", new, 1)
    assert not second.rejected, second.record
    assert second.record["earlier_digest"] == content_digest(normalize(old))
    assert fresh, "balance dropped the new version as a replay"
    # The new version replayed is a replay of the new version.
    third, fresh_again = run(pipeline, balance, "data.jsonl:7", new, 2)
    assert not third.rejected and not fresh_again


def test_a_new_version_is_curated_against_everything(curate: tuple[Pipeline, Balance]) -> None:
    """A new version that copies another record is that record's duplicate, and one that
    barely changes its own earlier version is a duplicate of it, not a silent pass."""
    pipeline, balance = curate
    original, other = (s.text for s in corpus(2, start=10))
    run(pipeline, balance, "a", original, 0)
    run(pipeline, balance, "b", other, 1)
    copied, _ = run(pipeline, balance, "b", comment_edit(original), 2)
    assert copied.rejected and copied.record["duplicate_of"] == "a", copied.record
    # Another small edit than b's (b's exact content has its claim, though b was rejected).
    edit = comment_edit(original).replace("kept as is", "left unchanged")
    edited, _ = run(pipeline, balance, "a", edit, 3)
    assert edited.rejected and edited.record["duplicate_of"] == "a", edited.record
    assert edited.record["reason"] in ("near_duplicate", "semantic_duplicate")
