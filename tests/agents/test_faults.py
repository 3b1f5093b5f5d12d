"""Faults, for real: a worker SIGKILLed mid-stream, Redis stopped under a running worker,
garbage among good events. Nothing is lost, no outcome changes, no worker stops.

`sluice worker` processes on the session's Kafka; the Redis outage test runs its own
Redis (the session's is shared by other tests) from the project's stack code.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agents.buffers import ClassBuffers
from agents.keys import vset_key
from sluice.ports import free_port
from sluice.settings import Settings
from sluice.stack import Stack
from streams.connections import redis_client
from streams.producer import EventProducer
from streams.serde import encode
from tests.agents.pipeline_util import (
    EDITS,
    OutcomeReader,
    Seen,
    WorkerProcess,
    corpus,
    isolated,
    missing,
    one_decision,
    plant,
    produce,
    raw_event,
    wait_for_group,
    workers,
)

pytestmark = pytest.mark.integration

WAIT_S = 240.0  # deadlines for failures only


def admitted_in_vset(client: redis.Redis, namespace: str, ids: list[str]) -> list[bool]:
    pipe = client.pipeline(transaction=False)
    for event_id in ids:
        pipe.execute_command("VISMEMBER", vset_key(namespace), event_id)
    return [bool(r) for r in pipe.execute()]


def buffered_ids(client: redis.Redis, settings: Settings) -> set[str]:
    """Every id the balance stage has taken into its Redis buffers, over all partitions."""
    out: set[str] = set()
    for partition in range(settings.topics.partitions):
        buffers = ClassBuffers(client, settings.redis.namespace, partition, 1, 1)
        out |= {k.decode() if isinstance(k, bytes) else k
                for k in client.hkeys(buffers.prefix + ":seen")}
    return out


def test_a_worker_killed_mid_stream_loses_nothing_and_changes_nothing(
        stack: Settings, tmp_path: Path) -> None:
    """SIGKILL a worker (ingest, dedup, balance) while events stream in, produce the rest
    while it is down, start it again in the same group. Every event id ends with exactly
    one decision (a replay may re-send a message, never change it); no id is admitted
    twice to the vector set; with reuse_cap 1, no sample enters two batches; every sample
    reached the balance buffers."""
    settings = isolated(stack, balance={"batch_size": 8, "reuse_cap": 1, "policy": "natural"})
    originals = [(f"k-{s.name}", s.text) for s in corpus()]
    copies = [(p.id, text) for p, text in plant(originals[::6], EDITS)]
    items = originals + copies
    events = [raw_event(i, t, label="python" if n % 3 else "tools")
              for n, (i, t) in enumerate(items)]
    ids = [e["id"] for e in events]
    first_part, rest = events[: len(events) // 2], events[len(events) // 2 :]
    with workers(settings, "ingest,dedup,balance", tmp_path) as [worker], \
            OutcomeReader(settings, ("samples", "rejected", "batches")) as reader:
        wait_for_group(settings, 1, [worker])
        # The model decides a few events a second: the kill lands with most of the first
        # part read or in flight, and offsets committed only every couple of seconds.
        produce(settings, first_part)
        decided_before = reader.wait_until(lambda r: len(r.by_id(["samples", "rejected"]))
                                           >= 12, WAIT_S)
        assert decided_before, worker.log_tail()
        worker.kill()
        before = len(reader.by_id(["samples", "rejected"]))
        produce(settings, rest)
        restarted = WorkerProcess(settings, "ingest,dedup,balance",
                                  tmp_path / "restarted.log").start()
        try:
            got = reader.wait_for(ids, WAIT_S, alive=lambda: restarted.alive)
            assert not missing(ids, got), f"lost: {missing(ids, got)}\n{restarted.log_tail()}"
            decided = one_decision(got)
            samples = sorted(i for i, d in decided.items() if d[0] == "kept")
            client = redis_client(settings.redis)
            try:
                # The balance stage catches up after the samples are out.
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline and not set(samples) <= buffered_ids(
                        client, settings):
                    time.sleep(1.0)
                buffered = buffered_ids(client, settings)
                reader.poll()
                vcard = int(client.execute_command("VCARD", vset_key(settings.redis.namespace)))
                in_vset = admitted_in_vset(client, settings.redis.namespace, samples)
            finally:
                client.close()
        finally:
            restarted.stop()
    resent = {i: len(v) for i, v in got.items() if len(v) > 1}
    batches: dict[str, dict[str, Any]] = {}
    for seen in reader.seen:
        if seen.role == "batches":
            prior = batches.setdefault(seen.id, seen.record)
            assert prior["content_digest"] == seen.record["content_digest"]
    uses = Counter(s["id"] for b in batches.values() for s in b["samples"])
    sequences = Counter((b["partition"], b["sequence"]) for b in batches.values())
    print(f"\n[faults] kill: {before} of {len(ids)} events decided before the SIGKILL; "
          f"{len(resent)} ids had their outcome re-sent after the restart (same decision); "
          f"{len(samples)} samples, {len(batches)} batches, "
          f"{sum(1 for n in sequences.values() if n > 1)} (partition, sequence) reused")
    assert vcard == len(samples) and all(in_vset)
    assert set(uses) <= set(samples)
    assert max(uses.values(), default=1) == 1, "a sample entered two batches"
    assert set(samples) <= buffered, f"samples never buffered: {set(samples) - buffered}"
    assert batches, "no batch was composed"


@pytest.fixture
def private_redis(stack: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Stack]]:
    """The session's Kafka with a Redis of this test's own (append-only, like `sluice up`),
    so stopping it disturbs no other test."""
    port = free_port()
    settings = stack.model_copy(update={
        "state_dir": tmp_path / "state",
        "stack": stack.stack.model_copy(update={"redis_port": port}),
        "redis": stack.redis.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"}),
    })
    own = Stack(settings)
    own.settings.state_dir.mkdir(parents=True)
    own.redis.start()
    try:
        yield settings, own
    finally:
        own.redis.stop()


def test_a_redis_outage_makes_the_worker_wait_then_resume_losing_nothing(
        private_redis: tuple[Settings, Stack], tmp_path: Path) -> None:
    base, own = private_redis
    settings = isolated(base)
    originals = [(f"o-{s.name}", s.text) for s in corpus(10, start=30)]
    planted = plant(originals[:6], ("whitespace", "comment"))
    original_of = {p.id: p.original for p, _ in planted}
    during = [(p.id, text) for p, text in planted]
    during += [(f"n-{s.name}", s.text) for s in corpus(6, start=40)]
    with workers(settings, "ingest,dedup", tmp_path) as [worker], \
            OutcomeReader(settings) as reader:
        wait_for_group(settings, 1, [worker])
        first = produce(settings, [raw_event(i, t) for i, t in originals])
        got = reader.wait_for(first, WAIT_S, alive=lambda: worker.alive)
        assert not missing(first, got), worker.log_tail()
        own.redis.stop()
        outage = time.monotonic()
        second = produce(settings, [raw_event(i, t) for i, t in during])
        time.sleep(6.0)
        decided_while_down = reader.wait_for(second, 0.5)
        assert worker.alive, worker.log_tail()
        own.redis.start()
        got = reader.wait_for(second, WAIT_S, alive=lambda: worker.alive)
        resumed_after = time.monotonic() - outage
        assert not missing(second, got), f"lost: {missing(second, got)}\n{worker.log_tail()}"
        assert worker.alive
        log = worker.log_path.read_text(errors="replace")
    assert not decided_while_down, "decided without Redis?"
    assert "Redis unreachable" in log, "the worker never met the outage"
    decided = one_decision(got)
    for event_id, _ in during:
        if event_id not in original_of:
            assert decided[event_id] == ("kept", None, None), event_id
        else:  # the indexes survived the restart (append-only file): copies still caught
            assert decided[event_id][1] in {"near_duplicate", "semantic_duplicate"}, event_id
            assert decided[event_id][2] == original_of[event_id], (event_id, decided[event_id])
    print(f"\n[faults] Redis down ≈ 6 s: {len(second)} events waited, all decided "
          f"{resumed_after:.1f} s after the outage began")


def garbage() -> list[tuple[bytes, bytes, str]]:
    """(key, value, expected reason) of bad raw messages."""
    good = encode("RawEvent", raw_event("x", corpus(1)[0].text))
    return [
        (b"junk-random", bytes(range(256)) * 3, "invalid:undecodable"),
        (b"junk-truncated", good[: len(good) // 2], "invalid:undecodable"),
        (b"junk-fingerprint", b"\xc3\x01" + b"\x01" * 8 + good[10:], "invalid:unknown_schema"),
        (b"junk-json", b'{"content": ', "invalid:invalid_json"),
        (b"junk-utf8", b'{"content": "\xff\xfe not utf-8"}', "invalid:invalid_utf8"),
        (b"junk-field", json.dumps({"content": "x = 1", "kind": "VIDEO"}).encode(),
         "invalid:invalid_field"),
        (b"junk-empty", json.dumps({"content": ""}).encode(), "invalid:empty_content"),
        (b"junk-huge", json.dumps({"content": "y = 2\n" * 200_000}).encode(), "invalid:too_large"),
        (b"junk-nothing", b"", "invalid:undecodable"),
    ]


def test_bad_input_never_stops_a_worker(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(stack)
    goods = [raw_event(f"ok-{s.name}", s.text) for s in corpus(12, start=60)]
    bad = garbage()
    with workers(settings, "ingest,dedup", tmp_path) as [worker], \
            OutcomeReader(settings) as reader:
        wait_for_group(settings, 1, [worker])
        with EventProducer(settings.kafka, settings.topics) as producer:
            for n, event in enumerate(goods):
                producer.send(event)
                if n < len(bad):
                    key, value, _ = bad[n]
                    producer.send_bytes(key, value)
        wanted = [e["id"] for e in goods] + [k.decode() for k, _, _ in bad]
        got = reader.wait_for(wanted, WAIT_S, alive=lambda: worker.alive)
        assert not missing(wanted, got), f"{missing(wanted, got)}\n{worker.log_tail()}"
        # Still working after all that: one more good event comes out.
        late = produce(settings, [raw_event(f"ok-late-{s.name}", s.text)
                                  for s in corpus(1, start=59)])
        assert not missing(late, reader.wait_for(late, WAIT_S, alive=lambda: worker.alive))
        assert worker.alive
    decided = one_decision(got)
    for event in goods:
        assert decided[event["id"]] == ("kept", None, None)
    for key, value, reason in bad:
        [seen] = got[key.decode()]
        assert isinstance(seen, Seen) and seen.reason == reason, (key, seen.record["detail"])
        assert seen.record["stage"] == "ingest"
        assert seen.record["raw"] == value[: 64 * 1024]
