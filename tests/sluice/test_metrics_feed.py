"""The metrics derivations (pure, no Kafka) and the feed that reads the real metrics topic."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, NoError
from kafka.structs import OffsetAndMetadata

from sluice.metrics_feed import DOWN, LIVE, MetricsFeed, MetricsStore, group_lag
from sluice.metrics_view import (
    Sample,
    View,
    component_rate,
    counter_increase,
    counter_rate,
    gauges_at,
    raw_source,
    shares,
    totals,
)
from sluice.ports import free_port
from sluice.settings import Settings, load_settings
from streams.connections import kafka_client_options
from tests.sluice.metrics_data import EXPECTED, publish, scenario, snap, with_metrics_topic
from tests.streams.kafka_io import create_topic


def store_of(snapshots: list) -> dict:
    store = MetricsStore()
    for s in snapshots:
        store.add(s)
    return store.histories()


def samples(*points: tuple[float, int]) -> list[Sample]:
    return [Sample(t, {"in": v}, {}) for t, v in points]


# --- counters -------------------------------------------------------------------------

def test_counter_increase_counts_a_drop_as_a_restart() -> None:
    assert counter_increase([0, 10, 25, 5, 15]) == 10 + 15 + 5 + 10
    assert counter_increase([7]) == 0


def test_counter_rate_over_a_window() -> None:
    s = samples((0, 0), (5, 50), (10, 100), (15, 100))
    assert counter_rate(s, "in", 0, 10) == pytest.approx(10.0)
    assert counter_rate(s, "in", 0, 15) == pytest.approx(100 / 15)
    assert counter_rate(s, "in", 9, 12) is None           # one sample: no rate
    assert counter_rate(s, "missing", 0, 15) == 0.0        # absent counter: zero so far


def test_rates_sum_over_instances_and_totals_use_each_latest() -> None:
    h = store_of([snap("ingest", "a", 0, {"in": 0}), snap("ingest", "a", 10, {"in": 100}),
                  snap("ingest", "b", 0, {"in": 1000}), snap("ingest", "b", 10, {"in": 1050}),
                  snap("ingest", "old", -500, {"in": 7})])   # a stopped worker still counts
    assert component_rate(h, "ingest", "in", -5, 10) == pytest.approx(15.0)
    assert totals(h, "ingest")["in"] == 100 + 1050 + 7
    assert component_rate(h, "dedup", "in", -5, 10) is None


def test_gauges_combine_fresh_instances_by_rule() -> None:
    h = store_of([
        snap("dedup", "a", 100, gauges={"latency_ms.p99": 300.0, "loss": 1.0}),
        snap("dedup", "b", 95, gauges={"latency_ms.p99": 500.0, "loss": 3.0}),
        snap("dedup", "gone", 10, gauges={"latency_ms.p99": 9999.0}),   # stale: ignored
        snap("trainer", "r0", 100, gauges={"step": 40.0, "samples_per_s": 10.0}),
        snap("trainer", "r1", 100, gauges={"step": 42.0, "samples_per_s": 12.0}),
    ])
    dedup = gauges_at(h, "dedup", 100, stale_s=20)
    assert dedup == {"latency_ms.p99": 500.0, "loss": 2.0}   # worst latency, mean otherwise
    assert gauges_at(h, "trainer", 100, 20) == {"step": 42.0, "samples_per_s": 22.0}
    assert gauges_at(h, "dedup", 50, 20) == {}                # nothing fresh at t=50


def test_shares() -> None:
    assert shares({"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
    assert shares({"a": 0}) == {}


def test_raw_shares_fall_back_to_ingest_without_a_balancer() -> None:
    assert raw_source(store_of([snap("ingest", "a", 0), snap("balance", "a", 0)])) == (
        "balance", "in.label.")
    assert raw_source(store_of([snap("ingest", "a", 0)])) == ("ingest", "out.label.")
    assert raw_source(store_of([snap("trainer", "a", 0)])) is None


# --- the store ------------------------------------------------------------------------

def test_store_orders_ignores_replays_and_prunes_all_but_the_latest() -> None:
    store = MetricsStore(keep_s=100)
    for t in (10, 30, 20, 30, 200):
        store.add(snap("ingest", "a", t, {"in": t}))
    assert [s.t for s in store.histories()[("ingest", "a")]] == [10, 20, 30, 200]
    store.add(snap("dedup", "a", 5, {"in": 1}))
    store.prune(now=250)
    assert [s.t for s in store.histories()[("ingest", "a")]] == [200]
    assert [s.t for s in store.histories()[("dedup", "a")]] == [5]    # its totals still count


# --- the view -------------------------------------------------------------------------

def test_view_of_a_known_scenario() -> None:
    now = 1_700_000_000.0
    view = View(window_s=30, span_s=60, step_s=5, stale_s=20)
    state = view.build(store_of(scenario(now)), now, lag=[(now - 1, {"raw-events": 12})])

    stages = {row["component"]: row for row in state["stages"]}
    assert list(stages) == ["ingest", "dedup", "balance"]
    for comp, expected in EXPECTED.items():
        if comp in stages:
            for key, value in expected.items():
                assert stages[comp][key] == pytest.approx(value), (comp, key)
    assert stages["ingest"]["instances"] == 2 and stages["ingest"]["fresh"] == 2
    assert stages["dedup"]["latency_ms"] == {"p50": 100.0, "p95": 200.0, "p99": 300.0}

    reasons = {(r["component"], r["reason"]): r for r in state["rejections"]}
    assert reasons[("ingest", "exact_duplicate")]["total"] == 50
    assert reasons[("ingest", "exact_duplicate")]["per_s"] == pytest.approx(2.0)
    assert reasons[("dedup", "semantic_duplicate")]["share"] == pytest.approx(50 / 750, 1e-3)
    assert state["duplicates"]["rate"] == pytest.approx(EXPECTED["duplicate_rate"], 1e-3)

    classes = {c["label"]: c for c in state["classes"]}
    for label in ("python", "docs"):
        assert classes[label]["raw"] == pytest.approx(EXPECTED["raw"][label])
        assert classes[label]["curated"] == pytest.approx(EXPECTED["curated"][label])
        assert classes[label]["target"] == 0.5
    assert classes["python"]["buffer"] == 40.0

    trainer = state["trainer"]
    for key, value in EXPECTED["trainer"].items():
        assert trainer[key] == pytest.approx(value)
    assert trainer["samples"] == 192 and trainer["lr"] is None   # missing gauges: None
    assert state["lag"] == {"raw-events": 12}


def test_view_series_follow_the_counters() -> None:
    now = 1_700_000_000.0
    view = View(window_s=30, span_s=60, step_s=5, stale_s=20)
    series = view.build(store_of(scenario(now)), now)["series"]
    assert series["t"][-1] == now and series["t"][1] - series["t"][0] == 5
    assert len(series["t"]) == 13
    assert series["throughput"]["ingest in"][-1] == pytest.approx(30.0)
    assert series["throughput"]["ingest in"][0] is None          # before any data: a gap
    assert series["rejections"]["exact_duplicate"][-1] == pytest.approx(2.0)
    assert series["duplicates"]["all duplicates"][-1] == pytest.approx(4.0 / 30.0, rel=1e-4)
    assert series["share_raw"]["python"][-1] == pytest.approx(0.75)
    assert series["share_curated"]["python"][-1] == pytest.approx(0.5)
    assert series["latency"]["dedup p99"][-1] == 300.0
    assert series["training"]["loss"][-1] == 1.2
    assert series["training"]["loss"][-3] == 1.5               # now-10 s
    assert series["lag"]["trainer"][-1] == 2.0


def test_view_of_nothing() -> None:
    state = View().build({}, 1_700_000_000.0)
    assert state["stages"] == [] and state["trainer"] is None and state["last_snapshot"] is None
    assert state["duplicates"]["rate"] is None
    assert all(not v for k, v in state["series"].items() if k != "t")


# --- the feed -------------------------------------------------------------------------

def test_feed_reports_an_unreachable_broker() -> None:
    settings = load_settings(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    with MetricsFeed(settings, retry_s=0.2) as feed:
        assert feed.wait_caught_up(10)
        state = feed.state()
    assert state["status"] == DOWN
    assert "cannot reach Kafka" in state["error"]
    assert state["stages"] == []


def commit_offset(settings: Settings, group: str, tp: TopicPartition, offset: int) -> None:
    """Commit ``offset`` for ``group`` as a worker would (retrying while a fresh broker
    creates its offsets topic and elects the group coordinator)."""
    admin = KafkaAdminClient(**kafka_client_options(settings.kafka))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                result = admin.alter_group_offsets(group, {tp: OffsetAndMetadata(offset, "", -1)})
                if all(error is NoError for error in result.values()):
                    return
                problem: object = result
            except KafkaError as exc:
                problem = exc
            if time.monotonic() > deadline:
                raise AssertionError(f"could not commit an offset for {group}: {problem}")
            time.sleep(0.5)
    finally:
        admin.close()


@pytest.mark.integration
def test_feed_reads_the_topic_and_the_workers_lag(stack: Settings) -> None:
    topic = create_topic(stack, "metrics")
    raw = create_topic(stack, "raw")
    group = f"workers-{uuid.uuid4().hex[:8]}"
    settings = with_metrics_topic(stack, topic, topics={"raw": raw}, app_id=group)
    now = time.time()
    ancient = snap("ingest", "a:1", now - 7200, {"in": 10**9})  # before the lookback
    publish(settings, topic, [ancient, *scenario(now)], raw=[b"not avro"])
    # The workers' group has read 2 of the 5 events on raw-events: 3 behind.
    publish(settings, raw, [], raw=[b"{}"] * 5)
    commit_offset(settings, group, TopicPartition(raw, 0), 2)

    with MetricsFeed(settings, lookback_s=600, lag_every_s=0.5) as feed:
        assert feed.wait_caught_up(20)
        deadline = time.monotonic() + 15
        while feed.state()["lag"] != {raw: 3} and time.monotonic() < deadline:
            time.sleep(0.2)
        state = feed.state()
    assert state["status"] == LIVE
    assert state["undecodable"] == 1
    ingest = next(row for row in state["stages"] if row["component"] == "ingest")
    assert ingest["in"] == EXPECTED["ingest"]["in"]            # the ancient one was skipped
    assert ingest["in_per_s"] == pytest.approx(EXPECTED["ingest"]["in_per_s"], rel=0.02)
    assert state["trainer"]["step"] == 30
    assert state["lag"] == {raw: 3}
    assert state["source"] == {"bootstrap": stack.bootstrap_servers, "topic": topic,
                               "group": group}


@pytest.mark.integration
def test_group_lag_on_live_multi_partition_topics(stack: Settings) -> None:
    """The lag probe as the dashboard meets it while a pipeline starts: the workers' group
    commits on raw-events first, on the samples topic later, and the probe asks again. Every
    partition of every topic counts and nothing raises (the probe used to ask a consumer
    assigned to the metrics topic, whose ``end_offsets`` in kafka-python 3.0.12 left out the
    partitions of a topic it had not seen yet and raised ``KeyError`` on them)."""
    metrics = create_topic(stack, "metrics")
    raw = create_topic(stack, "raw", partitions=4)
    samples = create_topic(stack, "samples", partitions=3)
    group = f"workers-{uuid.uuid4().hex[:8]}"
    # Records on every partition: raw p holds 5 + p records, samples p holds 3 + p.
    producer = KafkaProducer(**kafka_client_options(stack.kafka))
    try:
        for topic, count, base in ((raw, 4, 5), (samples, 3, 3)):
            for p in range(count):
                for n in range(base + p):
                    producer.send(topic, value=b"x%d" % n, partition=p)
        producer.flush(timeout=15)
    finally:
        producer.close()
    on_raw = {TopicPartition(raw, 0): 1, TopicPartition(raw, 1): 6, TopicPartition(raw, 2): 0,
              TopicPartition(raw, 3): 2}
    on_samples = {TopicPartition(samples, 0): 3, TopicPartition(samples, 1): 1,
                  TopicPartition(samples, 2): 4}
    raw_lag = (5 - 1) + (6 - 6) + (7 - 0) + (8 - 2)
    samples_lag = (3 - 3) + (4 - 1) + (5 - 4)
    topics = {raw, samples, metrics}

    admin = KafkaAdminClient(**kafka_client_options(stack.kafka))
    try:
        for tp, offset in on_raw.items():
            commit_offset(stack, group, tp, offset)
        assert group_lag(admin, f"nobody-{uuid.uuid4().hex[:8]}", topics) == {}
        assert group_lag(admin, group, topics) == {raw: raw_lag}
        for tp, offset in on_samples.items():
            commit_offset(stack, group, tp, offset)
        for _ in range(2):
            assert group_lag(admin, group, topics) == {raw: raw_lag,
                                                                 samples: samples_lag}
        assert group_lag(admin, group, {samples}) == {samples: samples_lag}
    finally:
        admin.close()
