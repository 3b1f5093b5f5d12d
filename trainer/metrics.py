"""The trainer's counters and gauges: ``MetricSnapshot``s for ``sluice.metrics`` and a
Prometheus endpoint (names prefixed ``sluice_trainer_``), both read from one place.

Gauges over "the last interval" (loss, accuracy, samples/s, data-wait share) are computed
from what happened since the previous snapshot, so a dashboard sees the trainer now, not
its average since start.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from schemas.records import MetricSnapshot
from trainer.errors import TrainerError

PREFIX = "sluice_trainer_"


@dataclass
class _Window:
    started: float
    wait_s: float
    samples: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    correct: int = 0
    positions: int = 0


class TrainerMetrics:
    """Totals (``counters``) and current values (``gauges``) of one trainer process."""

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.labels = dict(labels or {})
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, float] = {}
        self._lock = threading.Lock()
        self._window = _Window(time.perf_counter(), 0.0)
        self._server: Any = None

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def set_counter(self, name: str, value: int) -> None:
        """Set a total kept elsewhere (the step, the source's record count)."""
        with self._lock:
            self.counters[name] = int(value)

    def gauge(self, name: str, value: float) -> None:
        """Set gauge ``name``."""
        with self._lock:
            self.gauges[name] = float(value)

    def trained(self, samples: int, loss: float, correct: int, positions: int) -> None:
        """Account one optimizer step's batches (loss: their mean, smoothed)."""
        with self._lock:
            w = self._window
            w.samples += samples
            w.loss_sum += loss
            w.loss_n += 1
            w.correct += correct
            w.positions += positions
            self.counters["samples"] = self.counters.get("samples", 0) + samples

    def snapshot(self, wait_s: float) -> MetricSnapshot:
        """Close the current window (``wait_s``: total data-wait so far) and report."""
        now = time.perf_counter()
        with self._lock:
            w = self._window
            wall = max(now - w.started, 1e-9)
            self.gauges["samples_per_s"] = w.samples / wall
            self.gauges["data_wait_share"] = min(1.0, max(0.0, (wait_s - w.wait_s) / wall))
            if w.loss_n:
                self.gauges["loss"] = w.loss_sum / w.loss_n
            if w.positions:
                self.gauges["accuracy"] = w.correct / w.positions
            self._window = _Window(now, wait_s)
            return MetricSnapshot(
                component="trainer",
                instance=self.instance,
                timestamp=int(time.time() * 1000),
                counters=dict(self.counters),
                gauges=dict(self.gauges),
                labels=dict(self.labels),
            )

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose the metrics for Prometheus on ``port`` (0: do nothing); returns the port."""
        if port == 0:
            return 0
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_Collector(self))
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            raise TrainerError(f"cannot serve Prometheus metrics on {addr}:{port}: {exc}") from exc
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the Prometheus endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def prometheus_name(name: str) -> str:
    """``eval.macro_f1`` → ``sluice_trainer_eval_macro_f1``."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", name)


class _Collector:
    """Reads the current counters and gauges at scrape time."""

    def __init__(self, metrics: TrainerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        with m._lock:
            counters, gauges = dict(m.counters), dict(m.gauges)
        label_names = sorted(m.labels)
        label_values = [m.labels[k] for k in label_names]
        for name, value in sorted(counters.items()):
            counter = CounterMetricFamily(prometheus_name(name), f"trainer total {name}",
                                          labels=label_names)
            counter.add_metric(label_values, value)
            yield counter
        for name, level in sorted(gauges.items()):
            gauge = GaugeMetricFamily(prometheus_name(name), f"trainer gauge {name}",
                                      labels=label_names)
            gauge.add_metric(label_values, level)
            yield gauge
