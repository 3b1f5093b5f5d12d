"""The balance agent across a crash between the draw and the send, and under the broker's
message limit: real ``sluice worker`` processes on the session's Kafka and Redis.

The samples go straight to ``sluice.samples`` (the worker runs the balance agent alone), so
the test knows every id and can account for every use: with ``reuse_cap = 1`` and
``replay_fraction = 0`` each sample enters exactly one batch, and N samples make N / B
batches.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from agents.normalize import content_digest, normalize
from agents.sink_agents import EXIT_CODE
from schemas.records import CuratedSample
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.serde import encode
from streams.topics import ensure_topics
from tests.agents.pipeline_util import OutcomeReader, Seen, WorkerProcess, corpus, isolated

pytestmark = pytest.mark.integration

WAIT_S = 180.0  # deadlines for failures only
BATCH = 8


def curated(i: int, content: str | None = None, label: str | None = None) -> CuratedSample:
    """A CuratedSample of real code (a stdlib function) with a small unit embedding."""
    snippets = corpus()
    text = normalize(content if content is not None
                     else f"{snippets[i % len(snippets)].text}\n# variant {i}")
    vector = np.random.default_rng(i).standard_normal(8).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return CuratedSample(
        id=f"r{i:05d}", source="test", kind="CODE" if content is None else "TEXT",
        language=None, label=label or ("python" if i % 4 else "tools"), content=text,
        timestamp=1_700_000_000_000 + i, attributes={}, digest=content_digest(text),
        quality_score=0.9, embedding=vector.astype("<f2").tobytes(), embedding_dim=8,
        model="test", nearest_similarity=None, admitted_at=1_700_000_000_000 + i)


def produce_samples(settings: Settings, samples: Iterable[CuratedSample]) -> list[str]:
    """Send the samples to the samples topic, keyed by id; returns their ids."""
    producer = KafkaProducer(**kafka_client_options(settings.kafka), acks="all",
                             max_request_size=settings.topics.max_message_bytes)
    ids = []
    try:
        for s in samples:
            producer.send(settings.topics.samples, key=s["id"].encode(),
                          value=encode("CuratedSample", s))
            ids.append(s["id"])
        producer.flush(30)
    finally:
        producer.close()
    return ids


def batches_seen(reader: OutcomeReader) -> list[Seen]:
    return [s for s in reader.seen if s.role == "batches"]


def wait_for_uses(reader: OutcomeReader, n: int, worker: WorkerProcess) -> None:
    """Poll until the batches hold ``n`` sample uses, then a few seconds more (a duplicate
    re-send would come right after)."""
    def enough(r: OutcomeReader) -> bool:
        return sum(len(s.record["samples"]) for s in batches_seen(r)) >= n or not worker.alive

    assert reader.wait_until(enough, WAIT_S), worker.log_tail()
    settle = time.monotonic() + 5.0
    while time.monotonic() < settle:
        reader.poll()


def test_a_worker_killed_between_the_draw_and_the_send_loses_no_batch(
        stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first worker exits the moment it has drawn its first batch, before the send and
    before its table write (SLUICETEST_EXIT_AT). A new worker re-sends that batch from the
    record kept next to the buffers: every batch arrives exactly once by id, every sample
    is used exactly once (none of the uses the draw consumed is lost), and the sequences
    run 0, 1, … without a gap or a reuse."""
    settings = isolated(stack, partitions=1, balance={
        "batch_size": BATCH, "reuse_cap": 1, "policy": "natural", "replay_fraction": 0.0})
    settings = settings.model_copy(update={"state_dir": tmp_path / "state"})
    ids = produce_samples(settings, (curated(i) for i in range(BATCH)))
    monkeypatch.setenv("SLUICETEST_EXIT_AT", "balance.before_send")
    crashing = WorkerProcess(settings, "balance", tmp_path / "crashing.log").start()
    monkeypatch.delenv("SLUICETEST_EXIT_AT")
    assert crashing.proc is not None
    try:
        code = crashing.proc.wait(WAIT_S)
    finally:
        crashing.kill()
    assert code == EXIT_CODE, crashing.log_tail()
    ids += produce_samples(settings, (curated(i) for i in range(BATCH, 3 * BATCH)))
    restarted = WorkerProcess(settings, "balance", tmp_path / "restarted.log").start()
    with OutcomeReader(settings, ("batches",)) as reader:
        try:
            wait_for_uses(reader, len(ids), restarted)
        finally:
            restarted.stop()
        seen = batches_seen(reader)
    by_id = Counter(s.id for s in seen)
    uses = Counter(x["id"] for s in seen for x in s.record["samples"])
    sequences = sorted(s.record["sequence"] for s in seen)
    print(f"\n[balance recovery] {len(ids)} samples, {len(seen)} batch messages, "
          f"{len(by_id)} batch ids, sequences {sequences}")
    assert max(by_id.values()) == 1, f"a batch was sent twice: {by_id}"
    assert sequences == list(range(len(ids) // BATCH)), sequences
    # Batch 0 is the draw made before the crash: the first BATCH samples.
    [first] = [s for s in seen if s.record["sequence"] == 0]
    assert {x["id"] for x in first.record["samples"]} == set(ids[:BATCH])
    assert uses == Counter(ids), (
        f"lost uses: {sorted(set(ids) - set(uses))}; twice: "
        f"{sorted(i for i, n in uses.items() if n > 1)}\n{restarted.log_tail()}")


def test_long_texts_reach_the_batches_topic_within_the_broker_s_limit(
        stack: Settings, tmp_path: Path) -> None:
    """Finding 2 on the real broker: topics made with max.message.bytes = 64 KiB, samples
    of 30 KB text, batches of 8 (≈ 240 KB unfitted). Every batch arrives, within the limit,
    every sample used once, the long contents cut to a common length."""
    limit = 64 * 1024
    settings = isolated(stack, partitions=1, create=False, balance={
        "batch_size": BATCH, "reuse_cap": 1, "policy": "natural", "replay_fraction": 0.0})
    settings = settings.model_copy(update={
        "state_dir": tmp_path / "state",
        "topics": settings.topics.model_copy(update={"max_message_bytes": limit})})
    ensure_topics(settings.kafka, settings.topics)
    words = " ".join(f"word{n}" for n in range(4000))  # ≈ 31 KB
    ids = produce_samples(settings, (curated(i, content=f"{words} {i}", label="docs")
                                     for i in range(2 * BATCH)))
    worker = WorkerProcess(settings, "balance", tmp_path / "worker.log").start()
    with OutcomeReader(settings, ("batches",)) as reader:
        try:
            wait_for_uses(reader, len(ids), worker)
        finally:
            worker.stop()
        seen = batches_seen(reader)
    sizes = [len(encode("CuratedBatch", s.record)) for s in seen]
    print(f"\n[balance bounds] batches of {sizes} bytes on a {limit}-byte topic")
    assert len(seen) == 2, worker.log_tail()
    assert all(size <= limit for size in sizes)
    assert Counter(x["id"] for s in seen for x in s.record["samples"]) == Counter(ids)
    assert all(len(x["content"]) < len(words) for s in seen for x in s.record["samples"])
