"""The ingest stage's steps (``build_pipeline(stages=["ingest"])``) called directly (no
Faust) with the session stack's Redis.

Every class of bad input becomes a rejection with its reason; quality rejections name the
rule and the threshold; a mixed batch yields one outcome per input, in order; exact and
MinHash near-copies of real stdlib functions are caught; replays are idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from agents.normalize import content_digest, normalize
from agents.pipeline import Pipeline, build_pipeline
from agents.step import Coords, Item, Outcome
from schemas.records import RawEvent
from sluice.settings import Settings
from streams.serde import encode
from tests.agents.pipeline_util import corpus, exact_edit, raw_event, unique_id, whitespace_edit

pytestmark = pytest.mark.integration

MAX_EVENT_BYTES = 4096
TOPIC = "raw-events"


@pytest.fixture
def ingest(stack: Settings, client: redis.Redis) -> Pipeline:
    """The ingest steps on a fresh namespace, with a small event size limit."""
    settings = stack.model_copy(update={
        "ingest": stack.ingest.model_copy(update={"max_event_bytes": MAX_EVENT_BYTES})})
    return build_pipeline(settings, client, stages=["ingest"], namespace=unique_id())


def incoming(values: Sequence[tuple[bytes | None, bytes]], first_offset: int = 0) -> list[Item]:
    """Messages as the agent builds them: value, where they were read, and key."""
    return [Item(value, Coords(TOPIC, 0, first_offset + i), key)
            for i, (key, value) in enumerate(values)]


def avro(event: RawEvent) -> tuple[bytes, bytes]:
    return event["id"].encode(), encode("RawEvent", event)


def as_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode("utf-8")


def good_code(i: int) -> RawEvent:
    snippet = corpus(1, start=i)[0]
    return raw_event(f"good-{i}", snippet.text)


def invalid_utf8_avro() -> bytes:
    """A RawEvent whose content string is not UTF-8 (same length as the valid one)."""
    data = encode("RawEvent", raw_event("bad-utf8-avro", "caf\u00e9 " + good_code(0)["content"]))
    assert data.count(b"caf\xc3\xa9") == 1
    return data.replace(b"caf\xc3\xa9", b"caf\xff\xfe")


def bad_inputs() -> list[tuple[str, bytes | None, bytes]]:
    """(expected reason, key, value) for every class of bad input DESIGN.md names."""
    content = good_code(1)["content"]
    truncated = encode("RawEvent", raw_event("bad-truncated", content))[:-12]
    candidate = encode("Candidate", {
        "id": "c", "source": "s", "kind": "CODE", "language": None, "label": "x",
        "content": content, "timestamp": 0, "attributes": {}, "digest": "d",
        "quality_score": 1.0, "ingested_at": 0, "raw_partition": 0, "raw_offset": 0})
    return [
        ("invalid:undecodable", b"bad-garbage", b"\x00\x17 definitely not an event \xff"),
        ("invalid:undecodable", b"bad-truncated", truncated),
        ("invalid:undecodable", None, b""),
        ("invalid:unknown_schema", b"bad-fingerprint",
         b"\xc3\x01" + bytes.fromhex("deadbeefdeadbeef") + b"\x02ab"),
        ("invalid:unknown_schema", b"bad-record-type", candidate),
        ("invalid:invalid_field", b"bad-kind", as_json({"content": content, "kind": "BINARY"})),
        ("invalid:invalid_field", b"bad-unknown-field", as_json({"content": content,
                                                                  "colour": "red"})),
        ("invalid:invalid_field", b"bad-timestamp", as_json({"content": content,
                                                              "timestamp": "yesterday"})),
        ("invalid:invalid_field", b"bad-no-content", as_json({"id": "x", "kind": "CODE"})),
        ("invalid:invalid_utf8", b"bad-utf8-json",
         b'{"id": "bad-utf8-json", "content": "caf\xe9 au lait"}'),
        ("invalid:invalid_utf8", b"bad-utf8-avro", invalid_utf8_avro()),
        ("invalid:invalid_json", b"bad-json", b'{"content": "never closed'),
        ("invalid:empty_content", b"bad-empty-json", as_json({"content": "  \n\t "})),
        ("invalid:empty_content", b"bad-empty-avro",
         encode("RawEvent", raw_event("bad-empty-avro", ""))),
        ("invalid:too_large", b"bad-huge",
         as_json({"id": "bad-huge", "content": "x = 1\n" * (MAX_EVENT_BYTES // 6 + 10)})),
    ]


def check_encodable(outcomes: list[Outcome]) -> None:
    """Every outcome must fit its topic's schema (the agent would fail to send it)."""
    for outcome in outcomes:
        encode("Rejection" if outcome.rejected else "Candidate", outcome.record)


@pytest.mark.parametrize(("reason", "key", "value"), bad_inputs(),
                         ids=[f"{r}-{(k or b'nokey').decode()}" for r, k, _ in bad_inputs()])
def test_each_bad_input_class_is_a_rejection_with_its_reason(
        ingest: Pipeline, reason: str, key: bytes | None, value: bytes) -> None:
    [outcome] = ingest.run(incoming([(key, value)], first_offset=41))
    check_encodable([outcome])
    record = outcome.record
    assert outcome.rejected
    assert record["reason"] == reason, record["detail"]
    assert record["stage"] == "ingest"
    assert record["detail"]
    # The undecodable bytes travel with the rejection (cut at 64 KiB), with their lineage.
    assert record["raw"] == value
    assert (record["topic"], record["partition"], record["offset"]) == (TOPIC, 0, 41)
    # The message key is the event id; without one, the coordinates name it.
    assert record["id"] == (key.decode() if key else f"{TOPIC}-0-41")


@pytest.mark.parametrize(
    ("kind", "content", "rule", "threshold"),
    [
        ("CODE", "def f():\n    return '" + "x" * 1500 + "'\n", "max_line_length", "1000"),
        ("CODE", "x=1", "min_chars", "20"),
        ("CODE", "# Code generated by protoc-gen-go. DO NOT EDIT.\n" + good_code(2)["content"],
         "autogenerated", "first 5 lines"),
        ("CODE", "\n".join(["{}[]();:,.<>!? = x"] * 20), "min_alnum_fraction", "0.250"),
        ("TEXT", "Too short to be a document.", "min_words", "20"),
        ("TEXT", "The parser reads tokens from the stream and builds a tree. " * 3
         + "#release " * 10, "max_symbol_word_ratio", "0.100"),
        ("TEXT", "\n".join(["the same line of text, again and again"] * 20),
         "max_duplicate_line_fraction", "0.300"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_quality_rejections_name_the_rule_and_the_threshold(
        ingest: Pipeline, kind: str, content: str, rule: str, threshold: str) -> None:
    event = raw_event(f"q-{rule}", content, kind=kind, label="docs" if kind == "TEXT" else "py")
    [outcome] = ingest.run(incoming([avro(event)]))
    check_encodable([outcome])
    assert outcome.rejected
    assert outcome.reason == f"quality:{rule}"
    assert threshold in outcome.record["detail"], outcome.record["detail"]
    # A decoded event keeps who it was in the rejection; its bytes are not needed.
    assert (outcome.record["id"], outcome.record["kind"], outcome.record["label"]) == (
        event["id"], kind, event["label"])
    assert outcome.record["raw"] is None


def test_a_mixed_batch_yields_one_outcome_per_input_in_order(ingest: Pipeline) -> None:
    bad = bad_inputs()
    goods = [good_code(i) for i in range(10, 10 + len(bad))]
    values: list[tuple[bytes | None, bytes]] = []
    expected: list[tuple[str, str | None]] = []  # (id, reason) per input
    for i, (reason, key, value) in enumerate(bad):
        values.append(avro(goods[i]))
        expected.append((goods[i]["id"], None))
        values.append((key, value))
        expected.append((key.decode() if key else f"{TOPIC}-0-{len(values) - 1}", reason))
    outcomes = ingest.run(incoming(values))
    check_encodable(outcomes)
    assert [(o.record["id"], o.reason) for o in outcomes] == expected
    # Each outcome names its own message: a candidate by raw_offset, a rejection by offset.
    for offset, outcome in enumerate(outcomes):
        assert outcome.record["raw_offset" if not outcome.rejected else "offset"] == offset


def test_candidates_are_normalized_labelled_and_keep_their_lineage(ingest: Pipeline) -> None:
    text = corpus(1, start=3)[0].text
    unlabeled = raw_event("", exact_edit(text))
    unlabeled["label"] = None
    labelled = good_code(4)
    outcomes = ingest.run(incoming([avro(labelled), (None, as_json(dict(unlabeled)))],
                                       first_offset=7))
    check_encodable(outcomes)
    first, second = (o.record for o in outcomes)
    assert not any(o.rejected for o in outcomes)
    assert (first["id"], first["label"], first["raw_offset"]) == ("good-4", "python", 7)
    assert first["content"] == normalize(labelled["content"])
    # No id: derived from the digest of the normalized content; no label: "unlabeled".
    assert second["content"] == normalize(text)
    assert second["digest"] == content_digest(normalize(text))
    assert second["id"] == "sha256:" + second["digest"][:32]
    assert (second["label"], second["raw_offset"]) == ("unlabeled", 8)
    assert 0.5 <= second["quality_score"] <= 1.0


def test_exact_and_minhash_copies_are_caught_in_one_batch_and_across_batches(
        ingest: Pipeline) -> None:
    originals = corpus(4, start=20)
    first = [raw_event(f"orig-{i}", s.text) for i, s in enumerate(originals)]
    # In the same micro-batch as their originals: an exact and a whitespace copy of #0.
    same_batch = [raw_event("copy-exact-0", exact_edit(originals[0].text)),
                  raw_event("copy-ws-0", whitespace_edit(originals[0].text))]
    outcomes = ingest.run(incoming([avro(e) for e in first + same_batch]))
    check_encodable(outcomes)
    assert [o.reason for o in outcomes] == [None] * 4 + ["exact_duplicate", "near_duplicate"]
    assert [o.record["duplicate_of"] for o in outcomes[4:]] == ["orig-0", "orig-0"]
    assert outcomes[4].record["similarity"] == 1.0
    assert outcomes[5].record["similarity"] >= 0.8
    # A later batch: copies of #1..#3 are caught against what Redis remembers.
    later = [raw_event(f"copy-exact-{i}", exact_edit(originals[i].text)) for i in (1, 2)]
    later.append(raw_event("copy-ws-3", whitespace_edit(originals[3].text)))
    outcomes = ingest.run(incoming([avro(e) for e in later], first_offset=100))
    assert [(o.reason, o.record["duplicate_of"]) for o in outcomes] == [
        ("exact_duplicate", "orig-1"), ("exact_duplicate", "orig-2"),
        ("near_duplicate", "orig-3")]


def test_a_replay_gets_the_same_outcomes(ingest: Pipeline) -> None:
    """Re-processing the same messages (a consumer restarted before its commit) changes no
    decision: an id already admitted is never a duplicate of itself."""
    originals = corpus(3, start=30)
    events = [raw_event(f"r-{i}", s.text) for i, s in enumerate(originals)]
    events.append(raw_event("r-copy", whitespace_edit(originals[0].text)))
    events.append(raw_event("r-exact", exact_edit(originals[1].text)))
    values = [avro(e) for e in events] + [(b"r-bad", b"\x00junk")]
    first = ingest.run(incoming(values))
    replay = ingest.run(incoming(values))
    split = ingest.run(incoming(values[3:])) + ingest.run(incoming(values[:3]))

    def decisions(outcomes: list[Outcome]) -> dict[str, tuple[Any, ...]]:
        return {o.record["id"]: (o.reason, o.record.get("duplicate_of") if o.rejected else None)
                for o in outcomes}

    assert decisions(first) == decisions(replay) == decisions(split)
    assert decisions(first) == {
        "r-0": (None, None), "r-1": (None, None), "r-2": (None, None),
        "r-copy": ("near_duplicate", "r-0"), "r-exact": ("exact_duplicate", "r-1"),
        "r-bad": ("invalid:undecodable", None)}
