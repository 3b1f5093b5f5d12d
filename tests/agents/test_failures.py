"""Failures, sorted as Kafka Streams sorts them (issue 10, finding 1; finding 9 is
``test_admission_hold``).

- A record's own problem is that record's rejection and the rest of the micro-batch goes on
  (``Step.run``/``isolate``: ``error:<ExceptionClass>``), and a rejection always fits its
  topic, whatever the record carried.
- A store that fails for everyone (Redis OOM, NOPERM, unreachable…) is waited out in place:
  no outcome, no commit (the lag shows it), ``retries`` and ``stalled_s`` in the metrics,
  and everything is decided once the store is back; a worker stopped while it waits commits
  nothing, and the exact-digest claims that batch made never turn a later copy into a
  duplicate of an event that was never decided.

The pure parts run without services; the rest against the session's Kafka, with a Redis of
the test's own where a test breaks it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from kafka import KafkaConsumer, TopicPartition
from redis._parsers.base import BaseParser

from agents import runner as runner_module
from agents.exact import ExactClaims
from agents.filter_agents import release_failed_claims
from agents.index import VectorIndexError
from agents.keys import exact_key
from agents.normalize import content_digest, normalize
from agents.pipeline import Pipeline, build_pipeline
from agents.runner import Runner
from agents.step import Coords, Item, Outcome, Step, bounded_id, rejection, systemic
from sluice.ports import free_port
from sluice.processes import RedisProcess
from sluice.settings import Settings
from streams.connections import kafka_client_options, redis_client
from streams.metrics import BUSY_S, RETRIES, STALLED_S, SnapshotCollector, StageMetrics
from streams.serde import encode
from tests.agents.pipeline_util import (
    OutcomeReader,
    WorkerProcess,
    corpus,
    exact_edit,
    isolated,
    missing,
    one_decision,
    produce,
    raw_event,
    unique_id,
    wait_for_group,
    workers,
)
from tests.streams.test_metrics import exposition

TOPIC = "raw-events"
WAIT_S = 240.0  # deadlines for failures only
STALL_S = 8.0  # how long a test lets a worker wait on a failing store


# -- which failures are systemic -------------------------------------------------------------


@pytest.mark.parametrize("reply", [
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "NOPERM User default has no permissions to run the 'set' command",
    "LOADING Redis is loading the dataset in memory",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
])
def test_a_store_error_for_everyone_is_systemic(reply: str) -> None:
    exc = BaseParser.parse_error(reply)
    assert systemic(exc) == f"Redis {reply.split()[0]}"
    # Raised from inside a store that wraps it, or annotated by a pipeline: the same.
    try:
        raise VectorIndexError("admission failed") from exc
    except VectorIndexError as wrapped:
        assert systemic(wrapped) is not None
    annotated = redis.ResponseError(f"Command # 1 (SET a b) of pipeline caused error: {reply}")
    assert systemic(annotated) is not None


@pytest.mark.parametrize("exc", [
    redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
    redis.TimeoutError("Timeout reading from socket"),
])
def test_an_unreachable_store_is_systemic(exc: Exception) -> None:
    assert systemic(exc) == "Redis unreachable"


@pytest.mark.parametrize("exc", [
    BaseParser.parse_error("WRONGTYPE Operation against a key holding the wrong kind of value"),
    redis.ResponseError("ERR value is not an integer or out of range"),
    ValueError("Exceeds the limit (4300 digits) for integer string conversion"),
    RecursionError("maximum recursion depth exceeded"),
    KeyError("content"),
])
def test_a_records_own_failure_is_not_systemic(exc: Exception) -> None:
    assert systemic(exc) is None


# -- the processing handler ------------------------------------------------------------------


def items(n: int) -> list[Item]:
    return [Item({"id": f"e{i}", "label": "x"}, Coords(TOPIC, 0, i), f"e{i}".encode())
            for i in range(n)]


class Fragile(Step):
    """A filter step that raises ``error`` whenever a batch holds one of ``bad``."""

    name = "fragile"
    stage: ClassVar[str | None] = "fuzzy"

    def __init__(self, bad: set[str], error: Exception) -> None:
        super().__init__()
        self.bad, self.error, self.calls = bad, error, 0

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        self.calls += 1
        if any(item.record["id"] in self.bad for item in items):
            raise self.error
        return [Outcome(item.record, rejected=False) for item in items]


def test_a_record_that_makes_a_step_raise_is_its_rejection_and_the_batch_goes_on() -> None:
    step = Fragile({"e5", "e77"}, RecursionError("maximum recursion depth exceeded"))
    outcomes = step.run(items(128))
    assert [o.record["id"] for o in outcomes] == [f"e{i}" for i in range(128)]
    failed = {o.record["id"]: o.record for o in outcomes if o.rejected}
    assert set(failed) == {"e5", "e77"}
    for record in failed.values():
        assert record["reason"] == "error:RecursionError"
        assert record["stage"] == "fuzzy"
        assert record["detail"] == "fragile: maximum recursion depth exceeded"
        encode("Rejection", record)
    assert step.counters["rejected.error:RecursionError"] == 2
    assert step.counters["out"] == 126
    # Bisection: two bad records in 128 cost a few dozen calls, not 128.
    assert step.calls <= 2 * 2 * 7 + 1, step.calls


@pytest.mark.parametrize("error", [
    BaseParser.parse_error("OOM command not allowed when used memory > 'maxmemory'."),
    redis.ConnectionError("Connection refused"),
])
def test_a_systemic_failure_is_raised_for_the_caller_to_retry(error: Exception) -> None:
    step = Fragile({"e3"}, error)
    with pytest.raises(type(error)):
        step.run(items(8))
    assert step.calls == 1  # not bisected: no record is to blame


def test_a_sink_step_failure_is_raised_to_its_agent() -> None:
    class Sink(Fragile):
        stage = None

    with pytest.raises(KeyError):
        Sink({"e1"}, KeyError("label")).run(items(4))


def test_a_rejection_always_fits_its_topic_whatever_the_record_carried() -> None:
    huge = "k" * (5 * 1024 * 1024)
    record = rejection("ingest", "invalid:too_large", Coords(TOPIC, 3, 7),
                       event={"id": huge, "source": huge, "kind": huge, "label": huge},
                       detail=huge, duplicate_of=huge, raw=huge.encode()).record
    size = len(encode("Rejection", record)) + len(record["id"].encode())  # value + key
    assert size < 80 * 1024, size
    # A cut id stays unique and names what was sent.
    assert record["id"] == bounded_id(huge) != bounded_id(huge[:-1] + "j")
    assert record["id"].startswith("k" * 128 + "…sha256:")
    assert bounded_id("short-id") == "short-id"


# -- the runner: retry in place, count it, show it -------------------------------------------


def test_the_runner_waits_out_a_systemic_failure_and_shows_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "FIRST_DELAY_S", 0.01)
    metrics = StageMetrics("ingest")
    failures = [BaseParser.parse_error("OOM command not allowed"),
                BaseParser.parse_error("BUSY Redis is busy running a script."),
                redis.ConnectionError("Connection refused")]
    stalled_seen: list[float] = []

    def flaky(batch: list[Item]) -> list[Outcome]:
        stalled_seen.append(metrics.gauges.get(STALLED_S, 0.0))
        if failures:
            raise failures.pop(0)
        return [Outcome(item.record, rejected=False) for item in batch]

    outcomes = asyncio.run(Runner("t", metrics)(flaky, items(3)))
    assert len(outcomes) == 3
    assert metrics.counters[RETRIES] == 3
    assert stalled_seen[-1] > 0  # while it waited
    assert metrics.gauges[STALLED_S] == 0.0  # flowing again


def test_the_runner_counts_the_seconds_its_stage_was_busy() -> None:
    metrics = StageMetrics("dedup")
    run = Runner("t", metrics)

    def slow(batch: list[Item]) -> list[Outcome]:
        time.sleep(0.05)
        return [Outcome(item.record, rejected=False) for item in batch]

    async def twice_with_a_pause() -> None:
        await run(slow, items(2))
        await asyncio.sleep(0.2)  # idle: not busy
        await run(slow, items(2))

    asyncio.run(twice_with_a_pause())
    assert 0.1 <= run.busy_s < 0.25
    assert metrics.gauges[BUSY_S] == run.busy_s
    text = exposition(SnapshotCollector(lambda: [metrics.snapshot()]))
    assert f'sluice_busy_seconds_total{{component="dedup"}} {run.busy_s}' in text


def test_the_runners_processing_handler_rejects_what_a_whole_pipeline_cannot_decide() -> None:
    def pipeline(batch: Sequence[Item]) -> list[Outcome]:
        if any(item.record["id"] == "e2" for item in batch):
            raise TypeError("object of type 'NoneType' has no len()")
        return [Outcome(item.record, rejected=False) for item in batch]

    outcomes = asyncio.run(Runner("t").decide(pipeline, items(5), "ingest"))
    assert [o.reason for o in outcomes] == [None, None, "error:TypeError", None, None]
    assert "no len()" in outcomes[2].record["detail"]


# -- claims of records that never became samples ---------------------------------------------


@pytest.mark.integration
def test_a_record_that_failed_after_its_exact_claim_gives_the_claim_back(
        stack: Settings, client: redis.Redis) -> None:
    namespace = unique_id()
    ingest = build_pipeline(stack, client, stages=["ingest"], namespace=namespace)
    snippets = corpus(3, start=50)
    doomed = raw_event("doomed", snippets[0].text)
    # Fails where a fuzzy layer's lexer would: after the exact claim, before any insert.
    validate, exact, *rest = ingest.steps
    pipeline = Pipeline([validate, exact, Fragile({"doomed"}, UnicodeError("a lexer")), *rest])
    values = [encode("RawEvent", raw_event(f"ok-{i}", s.text)) for i, s in
              enumerate(snippets[1:])] + [encode("RawEvent", doomed)]
    outcomes = pipeline.run([Item(v, Coords(TOPIC, 0, n)) for n, v in enumerate(values)])
    assert [o.reason for o in outcomes] == [None, None, "error:UnicodeError"]
    digest = content_digest(normalize(doomed["content"]))
    assert client.get(exact_key(namespace, digest)) == b"doomed"  # claimed, then failed

    release_failed_claims((ExactClaims(client, namespace), outcomes))
    assert client.get(exact_key(namespace, digest)) is None
    later = [raw_event("copy-of-doomed", exact_edit(doomed["content"])),
             raw_event("copy-of-ok-0", exact_edit(snippets[1].text))]
    again = ingest.run([Item(encode("RawEvent", e), Coords(TOPIC, 0, 10 + n))
                        for n, e in enumerate(later)])
    assert [(o.reason, o.record.get("duplicate_of")) for o in again] == [
        (None, None), ("exact_duplicate", "ok-0")]


# -- a real worker against a Redis that fails for everyone -----------------------------------


@pytest.fixture
def own_redis(stack: Settings, tmp_path: Path) -> Iterator[tuple[Settings, redis.Redis]]:
    """The session's Kafka with a Redis of this test's own (the project's stack code), which
    the test may break; and an admin client on it."""
    port = free_port()
    settings = stack.model_copy(update={
        "state_dir": tmp_path / "state",
        "stack": stack.stack.model_copy(update={"redis_port": port}),
        "redis": stack.redis.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"}),
    })
    settings.state_dir.mkdir(parents=True)
    server = RedisProcess(settings)
    server.start()
    admin = redis_client(settings.redis)
    try:
        yield settings, admin
    finally:
        admin.close()
        server.stop()


def committed(settings: Settings) -> int:
    """Messages of this test's own raw-events that the workers' group has committed (the
    lag is what was produced minus this)."""
    consumer = KafkaConsumer(**kafka_client_options(settings.kafka), group_id=settings.app_id,
                             enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(settings.topics.raw, p)) or 0
                   for p in range(settings.topics.partitions))
    finally:
        consumer.close()


def wait_committed(settings: Settings, at_least: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    done = committed(settings)
    while done < at_least and time.monotonic() < deadline:
        time.sleep(1.0)
        done = committed(settings)
    return done


def latest_snapshot(reader: OutcomeReader, component: str) -> dict[str, Any]:
    reader.poll()
    snaps = [s.record for s in reader.seen if s.role == "metrics"
             and s.record["component"] == component]
    return snaps[-1] if snaps else {"counters": {}, "gauges": {}}


@pytest.mark.integration
def test_a_store_failing_for_everyone_stalls_unacked_and_then_everything_is_decided(
        own_redis: tuple[Settings, redis.Redis], tmp_path: Path) -> None:
    """Redis out of memory, then refusing SET to the worker's user (NOPERM): the ingest
    worker decides nothing, commits nothing (the lag holds every waiting event), counts its
    retries and shows how long it has waited; when Redis is fixed, every event is decided
    once. Before the fix the OOM crashed the agent and Faust acked the batch: lost."""
    base, admin = own_redis
    settings = isolated(base, metrics={"interval_s": 1.0})
    first = [raw_event(f"a-{s.name}", s.text) for s in corpus(4, start=10)]
    waiting = [raw_event(f"b-{s.name}", s.text) for s in corpus(6, start=14)]
    ids = [e["id"] for e in waiting]
    with workers(settings, "ingest", tmp_path) as [worker], \
            OutcomeReader(settings, ("candidates", "rejected", "metrics")) as reader:
        wait_for_group(settings, 1, [worker])
        produce(settings, first)
        assert not missing([e["id"] for e in first], reader.wait_for(
            [e["id"] for e in first], WAIT_S, ("candidates", "rejected"), lambda: worker.alive))
        assert wait_committed(settings, len(first)) == len(first)
        admin.config_set("maxmemory", 1)  # noeviction: every write is OOM
        produce(settings, waiting)
        time.sleep(STALL_S)
        during_oom = reader.wait_for(ids, 0.5, ("candidates", "rejected"))
        lag_oom = len(first) + len(waiting) - committed(settings)
        snap_oom = latest_snapshot(reader, "ingest")
        admin.config_set("maxmemory", 0)
        admin.acl_setuser("default", enabled=True, commands=["-set"], reset=False)
        # The next retry (the backoff has grown to a few seconds by now) meets NOPERM.
        deadline = time.monotonic() + 30.0
        while "Redis NOPERM" not in worker.log_path.read_text(errors="replace") and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        during_noperm = reader.wait_for(ids, 0.5, ("candidates", "rejected"))
        lag_noperm = len(first) + len(waiting) - committed(settings)
        alive_while_stalled = worker.alive
        fixed = time.monotonic()
        admin.acl_setuser("default", enabled=True, commands=["+@all"], reset=False)
        got = reader.wait_for(ids, WAIT_S, ("candidates", "rejected"), lambda: worker.alive)
        resumed_s = time.monotonic() - fixed
        lag_after = len(first) + len(waiting) - wait_committed(
            settings, len(first) + len(waiting))
        log = worker.log_path.read_text(errors="replace")
    assert alive_while_stalled, log[-3000:]
    assert not during_oom and not during_noperm, "decided while Redis refused every write?"
    assert lag_oom >= len(waiting) and lag_noperm >= len(waiting), (lag_oom, lag_noperm)
    assert snap_oom["counters"].get(RETRIES, 0) >= 1, snap_oom
    assert snap_oom["gauges"].get(STALLED_S, 0) > 0, snap_oom
    assert "Redis OOM" in log and "Redis NOPERM" in log
    assert not missing(ids, got), f"lost: {missing(ids, got)}\n{log[-3000:]}"
    assert all(d == ("kept", None, None) for d in one_decision(got).values())
    assert lag_after == 0
    print(f"\n[failures] OOM {STALL_S:.0f} s, then NOPERM: lag held at "
          f"{lag_oom}/{lag_noperm}, {snap_oom['counters'][RETRIES]} retries counted, "
          f"all {len(ids)} decided {resumed_s:.1f} s after the fix")


@pytest.mark.integration
def test_a_worker_stopped_while_it_waits_commits_nothing_and_leaves_no_false_duplicate(
        own_redis: tuple[Settings, redis.Redis], tmp_path: Path) -> None:
    """The fuzzy layer's reads are refused (NOPERM) after the exact-digest claims of the
    batch were made. The worker is stopped (SIGTERM) while it waits: the batch's outcomes
    were never sent, so its offsets must not be committed. A new worker decides every
    event as an original (never a duplicate of itself), and a later copy is a duplicate of
    an event that did become a candidate."""
    base, admin = own_redis
    settings = isolated(base)
    originals = [raw_event(f"o-{s.name}", s.text) for s in corpus(5, start=20)]
    ids = [e["id"] for e in originals]
    namespace = settings.redis.namespace
    with OutcomeReader(settings, ("candidates", "rejected")) as reader:
        with workers(settings, "ingest", tmp_path) as [worker]:
            wait_for_group(settings, 1, [worker])
            admin.acl_setuser("default", enabled=True, commands=["-hmget"], reset=False)
            produce(settings, originals)
            deadline = time.monotonic() + WAIT_S
            claimed: list[Any] = []
            while time.monotonic() < deadline:
                claimed = [admin.get(exact_key(namespace, content_digest(normalize(
                    e["content"])))) for e in originals]
                if all(claimed):
                    break
                time.sleep(0.5)
            time.sleep(2.0)
            assert not reader.wait_for(ids, 0.5, ("candidates", "rejected")), \
                "decided without the fuzzy index?"
            stopping = time.monotonic()
            worker.stop()
            stop_s = time.monotonic() - stopping
            log = worker.log_path.read_text(errors="replace")
        assert [c.decode() if c else None for c in claimed] == ids  # claims made, unsent
        lag = len(originals) - committed(settings)
        admin.acl_setuser("default", enabled=True, commands=["+@all"], reset=False)
        restarted = WorkerProcess(settings, "ingest", tmp_path / "restarted.log").start()
        try:
            got = reader.wait_for(ids, WAIT_S, alive=lambda: restarted.alive,
                                  roles=("candidates", "rejected"))
            copies = produce(settings, [raw_event(f"copy-{e['id']}", exact_edit(e["content"]))
                                        for e in originals])
            copied = reader.wait_for(copies, WAIT_S, alive=lambda: restarted.alive,
                                     roles=("candidates", "rejected"))
        finally:
            restarted.stop()
    assert "Redis NOPERM" in log
    assert stop_s < 15.0, f"the stop waited for the stalled batch ({stop_s:.0f} s)"
    assert lag >= len(originals), f"committed without outcomes (lag {lag})\n{log[-3000:]}"
    assert not missing(ids, got), f"lost: {missing(ids, got)}\n{restarted.log_tail()}"
    assert all(d == ("kept", None, None) for d in one_decision(got).values())
    assert {c: d for c, d in one_decision(copied).items()} == {
        f"copy-{i}": ("rejected", "exact_duplicate", i) for i in ids}
    print(f"\n[failures] stopped while waiting: {len(ids)} claims made, lag {lag} kept, "
          f"stop took {stop_s:.1f} s; after the restart all {len(ids)} kept, copies duplicates")
