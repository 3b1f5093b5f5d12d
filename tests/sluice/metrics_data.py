"""A small, fully known set of MetricSnapshots (what the workers and the trainer publish),
shared by the feed, dashboard and monitor tests, and a way to publish them for real."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaProducer

from schemas.records import MetricSnapshot
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.serde import encode


def snap(component: str, instance: str, t: float, counters: dict[str, int] | None = None,
         gauges: dict[str, float] | None = None) -> MetricSnapshot:
    """A MetricSnapshot taken at ``t`` (seconds since the epoch)."""
    return MetricSnapshot(component=component, instance=instance, timestamp=int(t * 1000),
                          counters=dict(counters or {}), gauges=dict(gauges or {}), labels={})


def scenario(now: float) -> list[MetricSnapshot]:
    """Three snapshots 10 s apart (now-20, now-10, now) from two ingest workers, one dedup,
    one balance worker and a trainer. What they add up to is in ``EXPECTED``."""
    out: list[MetricSnapshot] = []
    for k, t in enumerate((now - 20, now - 10, now)):
        out += [
            # ingest on worker a: 20 events/s in, 2/s exact duplicates, 2/s too short
            snap("ingest", "a:1", t, {"in": 100 + 200 * k, "out": 80 + 160 * k,
                                      "rejected": 20 + 40 * k,
                                      "rejected.exact_duplicate": 10 + 20 * k,
                                      "rejected.quality:min_chars": 10 + 20 * k}),
            # ingest on worker b: 10 events/s, nothing rejected
            snap("ingest", "b:2", t, {"in": 50 + 100 * k, "out": 50 + 100 * k}),
            snap("dedup", "a:1", t, {"in": 130 + 260 * k, "out": 120 + 240 * k,
                                     "rejected": 10 + 20 * k,
                                     "rejected.semantic_duplicate": 10 + 20 * k},
                 {"latency_ms.p50": 100.0, "latency_ms.p95": 200.0, "latency_ms.p99": 300.0,
                  "index.size": 600.0}),
            snap("balance", "a:1", t, {"in": 120 + 240 * k, "in.label.python": 90 + 180 * k,
                                       "in.label.docs": 30 + 60 * k, "out": 64 + 128 * k,
                                       "out.label.python": 32 + 64 * k,
                                       "out.label.docs": 32 + 64 * k, "batches": 1 + 2 * k},
                 {"share.target.python": 0.5, "share.target.docs": 0.5,
                  "buffer.python": 40.0, "buffer.docs": 20.0}),
            snap("trainer", "gpu:7", t, {"samples": 64 * (k + 1), "batches": k + 1},
                 {"step": 10.0 * (k + 1), "loss": (2.0, 1.5, 1.2)[k],
                  "accuracy": (0.3, 0.4, 0.5)[k], "samples_per_s": 64.0,
                  "data_wait_share": 0.25, "lag": 2.0}),
        ]
    return out


EXPECTED: dict[str, Any] = {
    "ingest": {"in": 750, "out": 650, "rejected": 100, "in_per_s": 30.0, "out_per_s": 26.0},
    "dedup": {"in": 650, "out": 600, "rejected": 50, "in_per_s": 26.0},
    "balance": {"in": 600, "out": 320, "out_per_s": 12.8},
    "duplicate_rate": 100 / 750,          # 50 exact + 50 semantic of 750 entering
    "raw": {"python": 0.75, "docs": 0.25},
    "curated": {"python": 0.5, "docs": 0.5},
    "trainer": {"step": 30.0, "loss": 1.2, "accuracy": 0.5},
}


def publish(settings: Settings, topic: str, snapshots: Iterable[MetricSnapshot],
            raw: Iterable[bytes] = ()) -> None:
    """Send snapshots (keyed by component, stamped with their own time) and raw values."""
    producer = KafkaProducer(**kafka_client_options(settings.kafka))
    try:
        for s in snapshots:
            producer.send(topic, key=s["component"].encode(), value=encode("MetricSnapshot", s),
                          timestamp_ms=s["timestamp"])
        for value in raw:
            producer.send(topic, key=b"junk", value=value, timestamp_ms=int(time.time() * 1000))
        producer.flush(timeout=15)
    finally:
        producer.close()


def with_metrics_topic(settings: Settings, topic: str, **top: Any) -> Settings:
    """A copy of ``settings`` reading metrics from ``topic`` (and other top-level changes)."""
    topics = settings.topics.model_copy(update={"metrics": topic, **top.pop("topics", {})})
    return settings.model_copy(update={"topics": topics, **top})


def history(now: float, minutes: float = 5.0, interval_s: float = 5.0,
            seed: int = 7) -> list[MetricSnapshot]:
    """Minutes of plausible snapshots from two ingest workers, dedup, balance, feedback and
    a trainer (varying rates, a skewed raw class mix balanced toward equal shares)."""
    import random

    rng = random.Random(seed)
    mix = {"python": 0.55, "markdown": 0.25, "rust": 0.12, "docs": 0.08}
    totals: dict[tuple[str, str], dict[str, float]] = {}

    def bump(comp: str, inst: str, adds: dict[str, float]) -> dict[str, int]:
        """The instance's counters after adding ``adds`` (totals since it started)."""
        counters = totals.setdefault((comp, inst), {})
        for name, n in adds.items():
            counters[name] = counters.get(name, 0.0) + n
        return {name: int(v) for name, v in counters.items()}

    out: list[MetricSnapshot] = []
    steps = int(minutes * 60 / interval_s)
    for k in range(steps + 1):
        t = now - (steps - k) * interval_s
        wave = 1 + 0.3 * ((k % 24) / 12 - 1) ** 2
        passed_total = 0.0
        for inst in ("w1:101", "w2:102"):
            n = rng.gauss(400, 30) * wave
            exact, near, short = n * 0.06, n * 0.03, n * rng.uniform(0.01, 0.03)
            passed = n - exact - near - short
            passed_total += passed
            out.append(snap("ingest", inst, t, bump("ingest", inst, {
                "in": n, "out": passed, "rejected": exact + near + short,
                "rejected.exact_duplicate": exact, "rejected.near_duplicate": near,
                "rejected.quality:min_chars": short})))
        semantic = passed_total * rng.uniform(0.02, 0.05)
        kept = passed_total - semantic
        out.append(snap("dedup", "w1:101", t, bump("dedup", "w1:101", {
            "in": passed_total, "out": kept, "rejected": semantic,
            "rejected.semantic_duplicate": semantic}),
            {"latency_ms.p50": rng.gauss(180, 15), "latency_ms.p95": rng.gauss(420, 30),
             "latency_ms.p99": rng.gauss(650, 50), "index.size": 1000.0 + 40 * k}))
        batch_out = 256.0
        adds = {"in": kept, "out": batch_out, "batches": 4.0}
        adds.update({f"in.label.{c}": kept * p * rng.uniform(0.9, 1.1) for c, p in mix.items()})
        adds.update({f"out.label.{c}": batch_out / 4 * rng.uniform(0.9, 1.1) for c in mix})
        gauges = {f"share.target.{c}": 0.25 for c in mix}
        gauges.update({f"buffer.{c}": float(min(5000, 200 * k * p)) for c, p in mix.items()})
        out.append(snap("balance", "w1:101", t, bump("balance", "w1:101", adds), gauges))
        out.append(snap("feedback", "w1:101", t, bump("feedback", "w1:101",
                                                      {"in": 4, "out": 4})))
        step = 20.0 * (k + 1)
        out.append(snap("trainer", "gpu:201", t, bump("trainer", "gpu:201", {"samples": 256}),
                        {"step": step,
                         "loss": 1.9 * (1 + step / 300) ** -0.7 + rng.gauss(0, 0.02),
                         "accuracy": min(0.93, 0.25 + 0.68 * (1 - (1 + step / 400) ** -1.2)),
                         "samples_per_s": rng.gauss(51, 3), "data_wait_share": 0.08,
                         "lag": float(rng.randint(0, 6))}))
    return out
