"""A record a later step fails on (``error:*``) leaves nothing behind in the fuzzy indexes
(issue 10): it never becomes a sample, so a later copy of it must not be rejected as its
duplicate. A replay, admitted before as a sample, keeps its entry."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence

import pytest
import redis

from agents.fuzzy import CodeFuzzyDedup, FuzzyDedup
from agents.identity import store_id
from agents.pipeline import Pipeline, build_pipeline
from agents.step import Coords, Item, Outcome, Step, rejection
from sluice.settings import Settings, load_settings
from streams.connections import redis_client
from tests.agents.pipeline_util import corpus, whitespace_edit

pytestmark = pytest.mark.integration


class RejectIds(Step):
    """A last step that rejects the records whose id it is given (as a failing store or
    a later layer would)."""

    name = "reject"
    stage = "test"

    def __init__(self, ids: set[str]) -> None:
        super().__init__()
        self.ids = ids

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        return [rejection(self.stage, "error:Boom", i.coords, event=dict(i.record))
                if i.record["id"] in self.ids else Outcome(i.record, rejected=False)
                for i in items]


def item(event_id: str, text: str, offset: int) -> Item:
    event = {"id": event_id, "source": f"test/{event_id}.py", "kind": "CODE",
             "language": "python", "label": "python", "content": text}
    return Item(json.dumps(event).encode(), Coords("raw-events", 0, offset))


@pytest.fixture
def client(stack: Settings) -> Iterator[redis.Redis]:
    conn = redis_client(stack.redis)
    yield conn
    conn.close()


@pytest.fixture
def ingest(client: redis.Redis) -> Iterator[tuple[Pipeline, set[str]]]:
    namespace = uuid.uuid4().hex
    failing: set[str] = set()
    steps = build_pipeline(load_settings(dedup={"enabled": False}), client,
                           stages=["ingest"], namespace=namespace).steps
    yield Pipeline([*steps, RejectIds(failing)]), failing
    for key in client.scan_iter(match=f"sluice:*{namespace}*"):
        client.unlink(key)


def in_indexes(pipeline: Pipeline, key: str) -> list[bool]:
    """Whether each fuzzy layer's index (words, code tokens) holds ``key``."""
    return [key in step.index for step in pipeline.steps  # type: ignore[attr-defined]
            if isinstance(step, FuzzyDedup | CodeFuzzyDedup)]


def test_a_record_rejected_after_the_fuzzy_layers_is_taken_out_of_them(
        ingest: tuple[Pipeline, set[str]]) -> None:
    pipeline, failing = ingest
    original = corpus(1)[0].text
    failing.add("first")
    [first] = pipeline.run([item("first", original, 0)])
    assert first.rejected and first.reason == "error:Boom"
    assert in_indexes(pipeline, "first") == [False, False]

    failing.clear()
    [copy] = pipeline.run([item("copy", whitespace_edit(original), 1)])
    assert not copy.rejected, copy.record  # not a near-duplicate of a record never kept
    assert in_indexes(pipeline, store_id(copy.record)) == [True, True]


def test_a_replay_rejected_later_keeps_the_entry_of_its_admission(
        ingest: tuple[Pipeline, set[str]]) -> None:
    pipeline, failing = ingest
    original = corpus(2)[1].text
    [kept] = pipeline.run([item("kept", original, 0)])
    assert not kept.rejected
    failing.add("kept")
    [again] = pipeline.run([item("kept", original, 1)])
    assert again.rejected
    assert in_indexes(pipeline, store_id(kept.record)) == [True, True]
