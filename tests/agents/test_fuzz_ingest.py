"""Fuzzing the ingest stage: hypothesis-generated raw events, Avro and JSON, valid and
mutated (truncated, bit-flipped, spliced, wrong types, odd Unicode, huge fields, huge or
binary keys, tombstones), through the real ingest steps (``build_pipeline(stages=
["ingest"])``) against the session's Redis.

Whatever arrives: no exception escapes, every message gets exactly one outcome, in order,
naming the message it came from, and every outcome encodes with its topic's schema (the
agent could send it) and fits the topic (a rejection carries at most ~72 KiB). No outcome
is an ``error:*``: a record that makes a step raise would be one, and it would mean a step
missed a rule. Bounded in time: a few hundred examples, no deadline per example.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.pipeline import Pipeline, build_pipeline
from agents.step import Coords, Item, Outcome
from sluice.settings import Settings
from streams.connections import redis_client
from streams.serde import encode
from tests.agents.pipeline_util import corpus, unique_id

pytestmark = pytest.mark.integration

MAX_EVENT_BYTES = 16 * 1024  # small, so that "huge" stays cheap to generate
MAX_ID_BYTES = 256
TOPIC = "raw-events"
SNIPPETS = [s.text for s in corpus(12, start=30)]
FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
REASONS = ("invalid:", "quality:", "exact_duplicate", "near_duplicate")
seen_reasons: Counter[str] = Counter()


@pytest.fixture(scope="module")
def ingest(stack: Settings) -> Iterator[Pipeline]:
    """The real ingest steps on a namespace of this module's own, with small limits."""
    conf = stack.model_copy(update={"ingest": stack.ingest.model_copy(update={
        "max_event_bytes": MAX_EVENT_BYTES, "max_id_bytes": MAX_ID_BYTES})})
    client: redis.Redis = redis_client(stack.redis)
    try:
        yield build_pipeline(conf, client, stages=["ingest"], namespace=unique_id())
    finally:
        client.close()
        print(f"\n[fuzz] outcomes by reason: {dict(sorted(seen_reasons.items()))}")


# -- what producers send -------------------------------------------------------------------

# Odd Unicode: combining marks, bidi controls, zero-width joiners, NUL, BOM, U+FFFF,
# astral emoji, CRLF and lone CRs; JSON may also carry lone surrogates (\ud800).
ODD = "\u0301\u202e\u200d\u0000\ufeff\uffff\U0001f600\r\n\r\u2028\u00e9e\u0301"
clean_text = st.text(st.characters(codec="utf-8") | st.sampled_from(ODD), max_size=40)
any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates too

def weighted(**choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, drawn with the given weights."""
    names = [name for name, (weight, _) in choices.items() for _ in range(weight)]
    return st.sampled_from(names).flatmap(lambda name: choices[name][1])


contents = weighted(
    snippet=(4, st.sampled_from(SNIPPETS)),
    edited=(3, st.builds(lambda s, extra: extra + s + extra, st.sampled_from(SNIPPETS),
                         clean_text)),
    text=(1, clean_text),
    blank=(1, st.sampled_from(["", " \n\t "])),
    huge=(1, st.builds(lambda n: "x = 1\n" * n,
                       st.integers(MAX_EVENT_BYTES // 8, MAX_EVENT_BYTES))),
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A RawEvent-shaped dict that Avro can encode (no surrogates, kind upper case)."""
    return {
        "id": draw(st.one_of(clean_text, st.just(""),
                             st.builds(lambda n: "i" * n, st.integers(MAX_ID_BYTES - 2,
                                                                      MAX_ID_BYTES + 2)))),
        "source": draw(clean_text),
        "kind": draw(st.sampled_from(["CODE", "TEXT"])),
        "language": draw(st.none() | clean_text),
        "label": draw(st.none() | clean_text),
        "content": draw(contents),
        "timestamp": draw(st.integers(-(2**63), 2**63 - 1)),
        "attributes": draw(st.dictionaries(clean_text, clean_text, max_size=3)),
    }


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text,
              st.just(float("nan"))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8)


@st.composite
def json_messages(draw: st.DrawFn) -> bytes:
    """JSON objects: valid, with wrong types, unknown or missing fields, odd Unicode (lone
    surrogates included), huge integers, deep nesting, or huge fields."""
    obj: dict[str, Any] = draw(events())
    obj["kind"] = draw(st.sampled_from(["code", "Text", obj["kind"], "VIDEO"]))
    for field in draw(st.lists(st.sampled_from([*obj, "colour"]), max_size=2)):
        obj[field] = draw(json_values | any_text)
    if draw(st.booleans()):
        obj.pop(draw(st.sampled_from(sorted(obj))), None)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    special = draw(st.sampled_from(["", "bigint", "deep", "huge"]))
    if special == "bigint":
        text = text[:-1] + ', "timestamp": ' + "7" * draw(st.integers(19, 6000)) + "}"
    elif special == "deep":
        depth = draw(st.integers(500, 5000))
        text = '{"content": ' + "[" * depth + "]" * depth + "}"
    elif special == "huge":
        text = text[:-1] + ', "label": "' + "L" * (MAX_EVENT_BYTES + 1) + '"}'
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate unescaped: send what a sloppy writer would
        return text.encode("utf-8", errors="surrogatepass")


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """Truncated, bit-flipped, spliced with random bytes, or left alone."""
    how = draw(st.sampled_from(["keep"] * 4 + ["truncate", "flip", "splice"]))
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
    if how == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(max_size=16)) + data[at:]
    return data


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    """(key, value) of one raw-events message."""
    kind = draw(st.sampled_from(["avro"] * 4 + ["json"] * 4 + ["bytes", "tombstone"]))
    if kind == "avro":
        value: bytes | None = mutate(encode("RawEvent", draw(events())), draw)
    elif kind == "json":
        value = mutate(draw(json_messages()), draw)
    elif kind == "bytes":
        value = draw(st.binary(max_size=256))
    else:
        value = None
    key = draw(weighted(
        none=(2, st.none()), text=(4, clean_text.map(lambda t: t.encode("utf-8"))),
        binary=(2, st.binary(max_size=24)),
        big=(1, st.integers(MAX_ID_BYTES - 1, 4 * MAX_ID_BYTES).map(lambda n: b"K" * n))))
    return key, value


# -- the properties ------------------------------------------------------------------------


def check(items: list[Item], outcomes: list[Outcome]) -> None:
    assert len(outcomes) == len(items), "one outcome per message"
    for item, outcome in zip(items, outcomes, strict=True):
        record = outcome.record
        if outcome.rejected:
            reason = record["reason"]
            seen_reasons[reason if reason.startswith("invalid:") else reason.split(":")[0]] += 1
            assert reason.startswith(REASONS), (reason, record["detail"])
            assert (record["topic"], record["offset"]) == (TOPIC, item.coords.offset)
            data = encode("Rejection", record)
            assert len(data) + len(record["id"].encode()) < 80 * 1024
        else:
            seen_reasons["candidate"] += 1
            assert record["raw_offset"] == item.coords.offset
            encode("Candidate", record)
            assert len(record["id"].encode()) <= MAX_ID_BYTES


@FUZZ
@given(st.lists(messages(), min_size=1, max_size=6), st.integers(0, 10**6))
def test_every_message_gets_exactly_one_outcome_that_encodes(
        ingest: Pipeline, batch: list[tuple[bytes | None, bytes | None]], first: int) -> None:
    items = [Item(value, Coords(TOPIC, 0, first + n), key)
             for n, (key, value) in enumerate(batch)]
    check(items, ingest.run(items))


@FUZZ
@given(st.lists(st.builds(lambda e: e, events()), min_size=2, max_size=8))
def test_valid_events_and_their_replays_get_the_same_outcomes(
        ingest: Pipeline, batch: list[dict[str, Any]]) -> None:
    """Valid Avro events (odd Unicode, huge fields, ids at the limit) decide the same way
    when the micro-batch is read again: nothing a producer sends breaks idempotence."""
    items = [Item(encode("RawEvent", e), Coords(TOPIC, 1, n), e["id"].encode() or None)
             for n, e in enumerate(batch)]
    first = ingest.run(items)
    check(items, first)
    again = ingest.run(items)
    assert [(o.rejected, o.reason, o.record.get("duplicate_of") if o.rejected else None)
            for o in again] == [
        (o.rejected, o.reason, o.record.get("duplicate_of") if o.rejected else None)
        for o in first]
