"""Every record type survives encode → Kafka → decode unchanged; the producer's contract.

Through the real embedded broker (the session ``stack``), with kafka-python as a plain
client: what sluice writes is ordinary Kafka data that any consumer can read.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer

import schemas
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.producer import EventProducer, RateLimiter
from streams.serde import decode, decode_raw_event, encode
from tests.streams.kafka_io import consume_all, create_topic

T0 = 1767225600000  # 2026-01-01T00:00:00Z in ms
CODE = 'def greet(name: str) -> str:\n    """Say hello."""\n    return f"Hello, {name}!"\n'
TEXT = "Rivers carry gravel downstream; a sluice box keeps the heavy grains — like gold."


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _embedding(seed: int, dim: int = 384) -> bytes:
    vector = np.random.default_rng(seed).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).astype("<f2").tobytes()


def sample_records() -> dict[str, list[dict[str, Any]]]:
    """Realistic values of every record type, optional fields both set and unset."""
    raw: list[dict[str, Any]] = [
        {"id": "evt-1", "source": "github.com/acme/app/greet.py", "kind": "CODE",
         "language": "python", "label": "python", "content": CODE, "timestamp": T0,
         "attributes": {"repo": "acme/app", "license": "MIT"}},
        {"id": "evt-2", "source": "feed://rivers", "kind": "TEXT", "language": None,
         "label": None, "content": TEXT, "timestamp": T0 + 1, "attributes": {}},
    ]
    candidates: list[dict[str, Any]] = [
        {**raw[0], "digest": _digest(CODE), "quality_score": 0.93, "ingested_at": T0 + 40,
         "raw_partition": 3, "raw_offset": 123_456_789_012, "earlier_digest": None},
        {**raw[1], "label": "unlabeled", "digest": _digest(TEXT), "quality_score": 1.0,
         "ingested_at": T0 + 41, "raw_partition": -1, "raw_offset": -1,
         "earlier_digest": _digest(CODE)},
    ]
    samples: list[dict[str, Any]] = [
        {**candidates[0], "embedding": _embedding(1), "embedding_dim": 384,
         "model": "all-MiniLM-L6-v2", "nearest_similarity": 0.8123, "admitted_at": T0 + 90},
        {**candidates[1], "embedding": _embedding(2), "embedding_dim": 384,
         "model": "all-MiniLM-L6-v2", "nearest_similarity": None, "admitted_at": T0 + 91},
    ]
    for s in samples:
        del s["ingested_at"], s["raw_partition"], s["raw_offset"]
    batch_samples = [
        {"id": s["id"], "label": s["label"], "kind": s["kind"], "source": s["source"],
         "content": s["content"], "embedding": s["embedding"], "embedding_dim": 384,
         "weight": w, "replay": r}
        for s, w, r in zip(samples, (0.5, 2.25), (False, True), strict=True)
    ]
    batches: list[dict[str, Any]] = [{
        "batch_id": "2-17-9f86d081", "partition": 2, "sequence": 17, "created_at": T0 + 120,
        "policy": "power(tau=0.5)", "samples": batch_samples,
        "class_shares": {"python": 0.8, "unlabeled": 0.2},
        "target_shares": {"python": 0.5, "unlabeled": 0.5},
        "difficulty": {"python": 1.1}, "content_digest": _digest(CODE + TEXT),
    }]
    feedback: list[dict[str, Any]] = [{
        "batch_id": "2-17-9f86d081", "step": 4242, "model": "embedding-classifier",
        "created_at": T0 + 300,
        "losses": [{"id": "evt-1", "label": "python", "loss": 0.0123, "correct": True},
                   {"id": "evt-2", "label": "unlabeled", "loss": 2.5, "correct": None}],
    }]
    rejections: list[dict[str, Any]] = [
        {"id": "raw-events-0-77", "stage": "ingest", "reason": "invalid:undecodable",
         "detail": "not Avro single-object encoding", "duplicate_of": None,
         "similarity": None, "source": None, "kind": None, "label": None,
         "topic": "raw-events", "partition": 0, "offset": 77, "raw": b"\x00\xffgarbage\xc3",
         "timestamp": T0 + 5},
        {"id": "evt-9", "stage": "dedup", "reason": "semantic_duplicate", "detail": None,
         "duplicate_of": "evt-1", "similarity": 0.9871, "source": "gh/x.py", "kind": "CODE",
         "label": "python", "topic": "sluice.candidates", "partition": 1, "offset": 8,
         "raw": None, "timestamp": T0 + 6},
    ]
    metrics: list[dict[str, Any]] = [{
        "component": "dedup", "instance": "worker-1:4242", "timestamp": T0 + 5000,
        "counters": {"in": 10_000_000_000, "out": 9_000, "rejected.semantic_duplicate": 12},
        "gauges": {"latency_ms.p50": 12.5, "share.raw.python": 0.8},
        "labels": {"model": "all-MiniLM-L6-v2"},
    }]
    return {"RawEvent": raw, "Candidate": candidates, "CuratedSample": samples,
            "CuratedBatch": batches, "Feedback": feedback, "Rejection": rejections,
            "MetricSnapshot": metrics}


def test_samples_cover_every_record_type() -> None:
    assert set(sample_records()) == set(schemas.NAMES)


@pytest.mark.parametrize("name", schemas.NAMES)
def test_encode_decode_is_identity(name: str) -> None:
    for record in sample_records()[name]:
        data = encode(name, record)
        assert data[:2] == b"\xc3\x01"
        assert data[2:10] == schemas.latest(name).fingerprint
        assert decode(data, name) == record


@pytest.mark.integration
def test_every_record_type_round_trips_through_kafka(stack: Settings) -> None:
    topic = create_topic(stack, "roundtrip")
    sent = [(name, record) for name, recs in sample_records().items() for record in recs]
    producer = KafkaProducer(**kafka_client_options(stack.kafka), acks="all",
                             compression_type="gzip", max_request_size=8 * 1024 * 1024)
    try:
        for i, (name, record) in enumerate(sent):
            producer.send(topic, key=f"{name}:{i}".encode(), value=encode(name, record))
        producer.flush(timeout=30)
    finally:
        producer.close()
    got = consume_all(stack, topic, len(sent))
    assert len(got) == len(sent)
    for message, (name, record) in zip(got, sent, strict=True):
        assert message.key.decode().split(":")[0] == name
        assert decode(message.value, name) == record


# --- the producer behind `sluice produce` -----------------------------------------------

@pytest.mark.integration
def test_event_producer_keys_by_id_and_keeps_order(stack: Settings) -> None:
    topic = create_topic(stack, "producer")
    events: list[dict[str, Any]] = [
        {"id": f"evt-{i:03d}", "source": f"docs/page-{i}.md", "kind": "TEXT", "language": "en",
         "label": "docs", "content": f"Page {i}: {TEXT}", "timestamp": T0 + i,
         "attributes": {"n": str(i)}} for i in range(40)]
    json_event = json.dumps({"id": "json-1", "kind": "code", "content": CODE}).encode()
    with EventProducer(stack.kafka, stack.topics, topic=topic) as producer:
        sizes = [producer.send(e) for e in events]  # type: ignore[arg-type]
        producer.send_bytes(b"json-1", json_event)
    assert producer.stats.events == 40
    assert producer.stats.bytes == sum(sizes)
    got = consume_all(stack, topic, 41)
    assert [m.key for m in got] == [e["id"].encode() for e in events] + [b"json-1"]
    assert [decode_raw_event(m.value, 1 << 20) for m in got[:-1]] == events
    assert got[-1].value == json_event
    assert decode_raw_event(got[-1].value, 1 << 20)["kind"] == "CODE"


def test_rate_limiter_spaces_calls() -> None:
    limiter = RateLimiter(200.0)
    began = time.monotonic()
    for _ in range(21):
        limiter.wait()
    assert time.monotonic() - began >= 20 / 200 * 0.9
    unlimited = RateLimiter(None)
    began = time.monotonic()
    for _ in range(1000):
        unlimited.wait()
    assert time.monotonic() - began < 0.05
