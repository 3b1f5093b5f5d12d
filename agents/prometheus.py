"""MetricSnapshots as Prometheus metric families, with stable ``sluice_`` names.

The same snapshots that go to ``sluice.metrics`` are rendered at scrape time, so the topic
and ``/metrics`` never disagree. Names and labels (README "Metrics"):

- ``sluice_events_in_total{component}``, ``sluice_events_out_total{component}``,
  ``sluice_events_rejected_total{component}``
- ``sluice_rejections_total{component,reason}``
- ``sluice_class_events_total{component,direction="in"|"out",label}``
- ``sluice_latency_ms{component,quantile}`` (event time → processed)
- ``sluice_step_seconds_total{component,step}`` (time inside each step)
- ``sluice_class_share{component,kind="ema"|"target",label}``,
  ``sluice_class_weight{component,label}``, ``sluice_class_difficulty{component,label}``
- ``sluice_buffer_fill{component,label}``, ``sluice_buffer_evictions_total{component,label}``
- anything else: ``sluice_<name>`` (dots become underscores), counters with ``_total``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.records import MetricSnapshot

_LABELLED_COUNTERS = {  # prefix → (metric, help, label name, fixed labels)
    "rejected.": ("sluice_rejections_total", "Rejections by reason.", "reason", {}),
    "in.label.": ("sluice_class_events_total", "Events per class.", "label", {"direction": "in"}),
    "out.label.": ("sluice_class_events_total", "Events per class.", "label",
                   {"direction": "out"}),
    "evicted.": ("sluice_buffer_evictions_total", "Samples evicted from a full class buffer.",
                 "label", {}),
}
_LABELLED_GAUGES = {
    "latency_ms.p": ("sluice_latency_ms", "Event time to processed, percentiles.", "quantile", {}),
    "share.ema.": ("sluice_class_share", "Class share.", "label", {"kind": "ema"}),
    "share.target.": ("sluice_class_share", "Class share.", "label", {"kind": "target"}),
    "weight.": ("sluice_class_weight", "Importance weight per class.", "label", {}),
    "difficulty.": ("sluice_class_difficulty", "Loss factor per class.", "label", {}),
    "buffer.": ("sluice_buffer_fill", "Samples buffered per class.", "label", {}),
}
_PLAIN_COUNTERS = {"in": "sluice_events_in_total", "out": "sluice_events_out_total",
                   "rejected": "sluice_events_rejected_total"}


def _metric_name(name: str) -> str:
    return "sluice_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


class _Families:
    """Collects samples into families, creating each family once."""

    def __init__(self) -> None:
        self.families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def add(self, factory: Callable[..., CounterMetricFamily | GaugeMetricFamily], name: str,
            help_text: str, labels: dict[str, str], value: float) -> None:
        if name not in self.families:
            self.families[name] = factory(name, help_text, labels=sorted(labels))
        family = self.families[name]
        family.add_metric([labels[k] for k in sorted(labels)], value)


def families(snapshots: Iterable[MetricSnapshot]) -> list[Metric]:
    """Prometheus families for the given snapshots (one per component)."""
    out = _Families()
    for snap in snapshots:
        base = {"component": snap["component"]}
        for name, count in snap["counters"].items():
            _add_counter(out, base, name, float(count))
        for name, value in snap["gauges"].items():
            _add_gauge(out, base, name, float(value))
    return list(out.families.values())


def _add_counter(out: _Families, base: dict[str, str], name: str, value: float) -> None:
    # prometheus_client names counter families without their _total suffix.
    if name in _PLAIN_COUNTERS:
        metric = _PLAIN_COUNTERS[name].removesuffix("_total")
        out.add(CounterMetricFamily, metric, f"Events {name}.", base, value)
        return
    for prefix, (metric, help_text, key, fixed) in _LABELLED_COUNTERS.items():
        if name.startswith(prefix):
            labels = base | fixed | {key: name[len(prefix):]}
            out.add(CounterMetricFamily, metric.removesuffix("_total"), help_text, labels, value)
            return
    out.add(CounterMetricFamily, _metric_name(name), f"Counter {name}.", base, value)


def _add_gauge(out: _Families, base: dict[str, str], name: str, value: float) -> None:
    if name.startswith("seconds."):
        labels = base | {"step": name.removeprefix("seconds.")}
        out.add(CounterMetricFamily, "sluice_step_seconds", "Seconds spent per step.", labels,
                value)
        return
    for prefix, (metric, help_text, key, fixed) in _LABELLED_GAUGES.items():
        if name.startswith(prefix):
            suffix = name[len(prefix):]
            if key == "quantile":
                suffix = str(int(suffix) / 100)
            out.add(GaugeMetricFamily, metric, help_text, base | fixed | {key: suffix}, value)
            return
    out.add(GaugeMetricFamily, _metric_name(name), f"Gauge {name}.", base, value)


class SnapshotCollector(Collector):
    """A prometheus_client collector over live snapshot sources."""

    def __init__(self, sources: Callable[[], Iterable[MetricSnapshot]]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        yield from families(self.sources())
