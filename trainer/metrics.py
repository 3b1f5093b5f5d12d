"""The trainer's part of the metrics (``streams.metrics`` holds the rest): ``MetricSnapshot``s
for ``sluice.metrics`` and a Prometheus endpoint (names prefixed ``sluice_trainer_``), both
read from one place.

Gauges over "the last interval" (loss, accuracy, samples/s, data-wait share) are computed
from what happened since the previous snapshot, so a dashboard sees the trainer now, not
its average since start.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from schemas.records import MetricSnapshot
from streams.metrics import Exposition, SnapshotCollector, StageMetrics, instance_name
from trainer.errors import TrainerError

COMPONENT = "trainer"
PREFIX = "sluice_trainer_"
# One metric per name, labelled with the trainer's labels (model, rank), no component label.
EXPOSITION = Exposition(prefix=PREFIX, component_label=False, snapshot_labels=True)


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
        self._metrics = StageMetrics(COMPONENT, labels)
        self.instance = instance_name()
        self.labels = self._metrics.labels
        self.counters = self._metrics.counters
        self.gauges = self._metrics.gauges
        self._lock = threading.Lock()  # the Prometheus endpoint reads from its own thread
        self._window = _Window(time.perf_counter(), 0.0)
        self._server: Any = None

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        with self._lock:
            self.counters[name] += n

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
            self.counters["samples"] += samples

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
            return self._metrics.snapshot()

    def current(self) -> MetricSnapshot:
        """The numbers as they are now, without closing the window (what a scrape reads)."""
        with self._lock:
            return self._metrics.snapshot()

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose the metrics for Prometheus on ``addr:port`` (port 0: do nothing); returns
        the port. Loopback by default: the endpoint has no authentication."""
        if port == 0:
            return 0
        registry = CollectorRegistry(auto_describe=True)
        registry.register(SnapshotCollector(lambda: [self.current()], EXPOSITION))
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
    return EXPOSITION.metric_name(name)
