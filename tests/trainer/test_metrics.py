"""The trainer's metrics: interval gauges, the MetricSnapshot record, the Prometheus page."""

from __future__ import annotations

import socket
import time
import urllib.request

from streams.serde import decode, encode
from trainer.metrics import TrainerMetrics, prometheus_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_snapshots_report_the_last_interval_and_encode_as_metric_snapshot() -> None:
    metrics = TrainerMetrics({"model": "embedding-classifier"})
    metrics.trained(samples=32, loss=2.0, correct=16, positions=32)
    metrics.trained(samples=32, loss=1.0, correct=32, positions=32)
    metrics.gauge("step", 2)
    time.sleep(0.1)
    first = metrics.snapshot(wait_s=0.05)
    assert first["component"] == "trainer" and first["counters"]["samples"] == 64
    assert first["gauges"]["loss"] == 1.5 and first["gauges"]["accuracy"] == 0.75
    assert 0.2 < first["gauges"]["data_wait_share"] < 0.55
    assert 0 < first["gauges"]["samples_per_s"] < 64 / 0.1
    assert decode(encode("MetricSnapshot", first), "MetricSnapshot") == first

    metrics.trained(samples=8, loss=0.5, correct=8, positions=8)
    second = metrics.snapshot(wait_s=0.05)  # no new waiting in this interval
    assert second["gauges"]["loss"] == 0.5 and second["gauges"]["data_wait_share"] == 0.0
    assert second["counters"]["samples"] == 72


def test_prometheus_endpoint_serves_prefixed_names() -> None:
    metrics = TrainerMetrics({"model": "byte-lm", "rank": "0"})
    port = metrics.serve(_free_port(), addr="127.0.0.1")
    try:
        metrics.count("checkpoints")
        metrics.gauge("eval.perplexity", 7.5)
        metrics.gauge("data_wait_share", 0.25)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        metrics.close()
    text = page.decode()
    assert 'sluice_trainer_checkpoints_total{model="byte-lm",rank="0"} 1.0' in text
    assert 'sluice_trainer_eval_perplexity{model="byte-lm",rank="0"} 7.5' in text
    assert "sluice_trainer_data_wait_share" in text
    assert prometheus_name("dropped.undecodable") == "sluice_trainer_dropped_undecodable"
    assert TrainerMetrics().serve(0) == 0
