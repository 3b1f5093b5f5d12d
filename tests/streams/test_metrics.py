"""The shared metrics module: names, the snapshot builder, the Prometheus exposition."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from schemas.records import MetricSnapshot
from streams import metrics
from streams.metrics import (
    Exposition,
    Names,
    SnapshotCollector,
    StageMetrics,
    instance_name,
)
from streams.serde import decode, encode

# --- names ------------------------------------------------------------------------------

WIRE_NAMES = [  # (Names, key, the name in a snapshot)
    (metrics.rejected, "quality:min_words", "rejected.quality:min_words"),
    (metrics.class_in, "python", "in.label.python"),
    (metrics.class_out, "docs", "out.label.docs"),
    (metrics.evicted, "rust", "evicted.rust"),
    (metrics.evicted_unused, "rust", "unused_evicted.rust"),
    (metrics.latency_ms, 95, "latency_ms.p95"),
    (metrics.step_seconds, "embed", "seconds.embed"),
    (metrics.share_ema, "python", "share.ema.python"),
    (metrics.share_target, "python", "share.target.python"),
    (metrics.class_weight, "python", "weight.python"),
    (metrics.class_difficulty, "python", "difficulty.python"),
    (metrics.buffer_fill, "python", "buffer.python"),
    (metrics.dropped, "undecodable", "dropped.undecodable"),
    (metrics.skipped, "empty", "skipped.empty"),
    (metrics.evaluation, "macro_f1", "eval.macro_f1"),
]


@pytest.mark.parametrize(("names", "key", "name"), WIRE_NAMES)
def test_names_write_and_parse_the_wire_names(names: Names, key: object, name: str) -> None:
    assert names(key) == name
    assert names.key(name) == str(key)
    assert names.key("in") is None and names.key("x." + name) is None


def test_no_two_kinds_of_names_claim_the_same_name() -> None:
    for names, _, name in WIRE_NAMES:
        claims = [other for other, _, _ in WIRE_NAMES if other.key(name) is not None]
        assert claims == [names], name
    assert [n for n, _, _ in WIRE_NAMES if n.key(metrics.INDEX_SIZE) is not None] == []


def test_of_picks_the_names_by_key_in_name_order() -> None:
    counters = {"in": 9, "out.label.rust": 1, "rejected.x": 2, "out.label.docs": 3,
                "out.replay": 4}
    assert metrics.class_out.of(counters) == {"docs": 3, "rust": 1}
    assert list(metrics.class_out.of(counters)) == ["docs", "rust"]
    assert metrics.rejected.of({}) == {}


# --- the snapshot builder ---------------------------------------------------------------

@dataclass(frozen=True)
class Decided:
    record: Any
    rejected: bool

    @property
    def reason(self) -> str | None:
        return str(self.record["reason"]) if self.rejected else None


def test_stage_metrics_count_outcomes_and_report_a_metric_snapshot() -> None:
    m = StageMetrics("dedup", {"model": "all-MiniLM-L6-v2"})
    m.count_in(4)
    m.count_in()
    outcomes = [Decided({"label": "python"}, False), Decided({"label": "python"}, False),
                Decided({"label": None}, False),
                Decided({"reason": "semantic_duplicate"}, True),
                Decided({"reason": "quality:min_words"}, True)]
    m.count_outcomes(outcomes)
    m.add_seconds({"embed": 1.5, "admit": 0.25})
    m.gauges[metrics.INDEX_SIZE] = 12.0
    m.labels["policy"] = "sqrt"
    snap = m.snapshot()
    assert snap["component"] == "dedup" and snap["instance"] == instance_name()
    assert snap["counters"] == {"in": 5, "out": 3, "out.label.python": 2, "rejected": 2,
                                "rejected.semantic_duplicate": 1,
                                "rejected.quality:min_words": 1,
                                # Per source (none named here: "unknown"); they add up.
                                "source.in.unknown": 5, "source.out.unknown": 3,
                                "source.label.unknown|python": 2,
                                "source.rejected.unknown|duplicate": 1,
                                "source.rejected.unknown|quality": 1}
    assert snap["gauges"] == {"seconds.embed": 1.5, "seconds.admit": 0.25, "index.size": 12.0}
    assert snap["labels"] == {"model": "all-MiniLM-L6-v2", "policy": "sqrt"}
    assert decode(encode("MetricSnapshot", snap), "MetricSnapshot") == snap


def test_latency_percentiles_match_numpy() -> None:
    m = StageMetrics("ingest")
    now_ms = metrics._now_ms()
    ages = np.random.default_rng(7).integers(0, 5_000, size=500)
    m.count_outcomes([], (int(now_ms - a) for a in ages))
    gauges = m.snapshot()["gauges"]
    assert set(gauges) == {"latency_ms.p50", "latency_ms.p95", "latency_ms.p99"}
    for q in (50, 95, 99):   # measured a little later than ``now_ms``: up to a second older
        assert np.percentile(ages, q) <= gauges[f"latency_ms.p{q}"] <= np.percentile(ages, q) + 1000


def test_the_latency_window_keeps_the_most_recent() -> None:
    m = StageMetrics("dedup")
    now_ms = metrics._now_ms()
    m.count_outcomes([], [now_ms - 60_000] * metrics.LATENCY_WINDOW)
    m.count_outcomes([], [now_ms] * metrics.LATENCY_WINDOW)
    assert m.snapshot()["gauges"]["latency_ms.p99"] < 1000


def test_instance_name_is_host_and_pid() -> None:
    assert instance_name() == f"{socket.gethostname()}:{os.getpid()}"


# --- Prometheus -------------------------------------------------------------------------

def stage_snapshot(component: str = "balance") -> MetricSnapshot:
    return MetricSnapshot(
        component=component, instance="w:1", timestamp=0, labels={"policy": "sqrt"},
        counters={"in": 10, "out": 8, "rejected": 2, "rejected.exact_duplicate": 2,
                  "in.label.python": 6, "out.label.python": 5, "evicted.python": 1,
                  "unused_evicted.python": 1,
                  "batches": 3, "out.replay": 1},
        gauges={"latency_ms.p50": 12.0, "latency_ms.p95": 30.0, "seconds.embed": 2.5,
                "share.ema.python": 0.6, "share.target.python": 0.5, "weight.python": 1.2,
                "difficulty.python": 1.1, "buffer.python": 40.0, "index.size": 100.0,
                "hard.threshold": 0.7})


def exposition(collector: SnapshotCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_stage_snapshots_render_with_the_readme_names() -> None:
    text = exposition(SnapshotCollector(lambda: [stage_snapshot(), stage_snapshot("dedup")]))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    b = (("component", "balance"),)
    expected = {
        ("sluice_events_in_total", b): 10, ("sluice_events_out_total", b): 8,
        ("sluice_events_rejected_total", b): 2,
        ("sluice_rejections_total", (*b, ("reason", "exact_duplicate"))): 2,
        ("sluice_class_events_total", (*b, ("direction", "in"), ("label", "python"))): 6,
        ("sluice_class_events_total", (*b, ("direction", "out"), ("label", "python"))): 5,
        ("sluice_buffer_evictions_total", (*b, ("label", "python"))): 1,
        ("sluice_buffer_evictions_unused_total", (*b, ("label", "python"))): 1,
        ("sluice_batches_total", b): 3, ("sluice_out_replay_total", b): 1,
        ("sluice_latency_ms", (*b, ("quantile", "0.5"))): 12.0,
        ("sluice_latency_ms", (*b, ("quantile", "0.95"))): 30.0,
        ("sluice_step_seconds_total", (*b, ("step", "embed"))): 2.5,
        ("sluice_class_share", (*b, ("kind", "ema"), ("label", "python"))): 0.6,
        ("sluice_class_share", (*b, ("kind", "target"), ("label", "python"))): 0.5,
        ("sluice_class_weight", (*b, ("label", "python"))): 1.2,
        ("sluice_class_difficulty", (*b, ("label", "python"))): 1.1,
        ("sluice_buffer_fill", (*b, ("label", "python"))): 40.0,
        ("sluice_index_size", b): 100.0, ("sluice_hard_threshold", b): 0.7,
    }
    for key, value in expected.items():
        assert samples[key] == value, key
    assert len(samples) == 2 * len(expected)   # dedup's the same; nothing else
    assert "# TYPE sluice_rejections_total counter" in text
    assert "# TYPE sluice_step_seconds_total counter" in text
    assert "# TYPE sluice_class_share gauge" in text


def test_an_exposition_with_a_prefix_and_the_snapshot_labels() -> None:
    trainer = Exposition(prefix="sluice_trainer_", component_label=False, snapshot_labels=True)
    snap = MetricSnapshot(component="trainer", instance="t:1", timestamp=0,
                          labels={"model": "byte-lm", "rank": "0"},
                          counters={"checkpoints": 2, "rejected.x": 1},
                          gauges={"eval.perplexity": 7.5})
    text = exposition(SnapshotCollector(lambda: [snap], trainer))
    assert 'sluice_trainer_checkpoints_total{model="byte-lm",rank="0"} 2.0' in text
    assert 'sluice_trainer_rejected_x_total{model="byte-lm",rank="0"} 1.0' in text
    assert 'sluice_trainer_eval_perplexity{model="byte-lm",rank="0"} 7.5' in text
    assert trainer.metric_name("dropped.undecodable") == "sluice_trainer_dropped_undecodable"
