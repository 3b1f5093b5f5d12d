"""Poison on sluice's own topics: any client can write to ``sluice.candidates``,
``sluice.samples`` and ``training-feedback``. Faust acks a message whose value fails to
decode and then crashes the agent, so such a record used to end with no outcome; now each
is rejected with its reason (``invalid:tombstone``, ``invalid:undecodable``,
``invalid:unknown_schema``) and the agents go on with the good records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import KafkaProducer

from agents.normalize import content_digest, normalize
from schemas.records import Candidate
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.serde import encode
from tests.agents.pipeline_util import (
    OutcomeReader,
    corpus,
    isolated,
    raw_event,
    wait_for_group,
    workers,
)

pytestmark = pytest.mark.integration

WAIT_S = 180.0


def candidate(event_id: str, text: str) -> Candidate:
    content = normalize(text)
    return Candidate(
        id=event_id, source="stdlib", kind="CODE", language="python", label="python",
        content=content, timestamp=1_700_000_000_000, attributes={},
        digest=content_digest(content), quality_score=0.9, ingested_at=1_700_000_000_001,
        raw_partition=0, raw_offset=0, earlier_digest=None)


def test_poison_on_internal_topics_is_rejected_and_the_agents_go_on(stack: Settings,
                                                                    tmp_path: Path) -> None:
    settings = isolated(stack, partitions=1)
    t = settings.topics
    good = [candidate(f"good-{i}", s.text) for i, s in enumerate(corpus(4, start=20))]
    poison = {  # key: (topic, value, expected reason)
        "cand-tombstone": (t.candidates, None, "invalid:tombstone"),
        "cand-garbage": (t.candidates, b"\x00not avro at all", "invalid:undecodable"),
        "cand-raw-event": (t.candidates, encode("RawEvent", raw_event("x", "print(1)")),
                           "invalid:unknown_schema"),
        "sample-tombstone": (t.samples, None, "invalid:tombstone"),
        "sample-unknown-writer": (t.samples, b"\xc3\x01 not a known fingerprint",
                                  "invalid:unknown_schema"),
        "feedback-tombstone": (t.feedback, None, "invalid:tombstone"),
        "feedback-garbage": (t.feedback, b"{\"not\": \"avro\"}", "invalid:undecodable"),
    }
    with workers(settings, "dedup,balance,feedback", tmp_path) as started, \
            OutcomeReader(settings) as reader:
        wait_for_group(settings, 1, started)
        producer = KafkaProducer(**kafka_client_options(settings.kafka), acks="all")
        for key, (topic, value, _) in poison.items():
            producer.send(topic, key=key.encode(), value=value)
        for cand in good:
            producer.send(t.candidates, key=cand["id"].encode(),
                          value=encode("Candidate", cand))
        producer.flush()
        producer.close()
        got = reader.wait_for([*poison, *(c["id"] for c in good)], timeout_s=WAIT_S,
                              alive=lambda: all(w.alive for w in started))
        logs = started[0].log_tail()
        assert all(w.alive for w in started), logs
    for key, (_, _, reason) in poison.items():
        assert [s.reason for s in got.get(key, [])] == [reason], (key, got.get(key), logs)
    for cand in good:
        assert [s.role for s in got[cand["id"]]] == ["samples"], (cand["id"], logs)
