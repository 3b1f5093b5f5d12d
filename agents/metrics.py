"""Per-stage counters and latency, published as MetricSnapshot records (CONVENTIONS §11)."""

from __future__ import annotations

import os
import socket
from collections import Counter, deque
from collections.abc import Iterable, Mapping

import numpy as np

from agents.outcome import Outcome, now_ms
from schemas.records import MetricSnapshot

LATENCY_WINDOW = 2048  # most recent event-time → now latencies kept for percentiles


def instance_name() -> str:
    """host:pid, the identity of this process in the metrics."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StageMetrics:
    """Counts in, out, rejected by reason; event-time latency; extra gauges."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}
        self.labels: dict[str, str] = {}
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def count_in(self, n: int = 1) -> None:
        self.counters["in"] += n

    def count_outcomes(self, outcomes: Iterable[Outcome], event_times_ms: Iterable[int] = ()
                       ) -> None:
        """Count each outcome as out or rejected.<reason> and record latencies."""
        for outcome in outcomes:
            if outcome.rejected:
                self.counters["rejected"] += 1
                self.counters[f"rejected.{outcome.reason}"] += 1
            else:
                self.counters["out"] += 1
                label = outcome.record.get("label")
                if label is not None:
                    self.counters[f"out.label.{label}"] += 1
        now = now_ms()
        self._latency_ms.extend(max(0, now - t) for t in event_times_ms)

    def add_seconds(self, seconds: Mapping[str, float]) -> None:
        """Time spent per sub-step (exported as gauges seconds.<step>)."""
        for step, value in seconds.items():
            self.gauges[f"seconds.{step}"] = float(value)

    def snapshot(self) -> MetricSnapshot:
        """The current totals and gauges, ready for sluice.metrics."""
        gauges = dict(self.gauges)
        if self._latency_ms:
            lat = np.fromiter(self._latency_ms, dtype=float)
            for q in (50, 95, 99):
                gauges[f"latency_ms.p{q}"] = float(np.percentile(lat, q))
        return MetricSnapshot(component=self.component, instance=instance_name(),
                              timestamp=now_ms(), counters=dict(self.counters), gauges=gauges,
                              labels=dict(self.labels))
