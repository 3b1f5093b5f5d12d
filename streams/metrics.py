"""Metrics, one home for the stages and the trainer (CONVENTIONS §11).

- ``StageMetrics``: the counters, gauges and labels of one component, and the
  ``MetricSnapshot`` every stage and the trainer publish to ``sluice.metrics``.
- Names: a snapshot keys its numbers by name. Plain names (``in``, ``out``, ``rejected``,
  ``batches``, ``step``…) are written as they are; a name that carries a key (a reason, a
  class, a quantile, a step) is built by calling one of the ``Names`` below and parsed by the
  same object, so no other module spells its prefix::

      rejected("exact_duplicate")          # "rejected.exact_duplicate"
      rejected.key("rejected.near_dup")    # "near_dup"
      class_out.of(snapshot["counters"])   # {"python": 12, "docs": 3}

- ``SnapshotCollector``: snapshots rendered as Prometheus metrics at scrape time, so the topic
  and ``/metrics`` never disagree. ``STAGE_EXPOSITION`` gives the stages' names (README
  "Metrics"): ``sluice_events_{in,out,rejected}_total{component}``,
  ``sluice_rejections_total{component,reason}``,
  ``sluice_class_events_total{component,direction="in"|"out",label}``,
  ``sluice_latency_ms{component,quantile}``, ``sluice_step_seconds_total{component,step}``,
  ``sluice_busy_seconds_total{component}``,
  ``sluice_class_share{component,kind="ema"|"target",label}``,
  ``sluice_class_weight{component,label}``, ``sluice_class_difficulty{component,label}``,
  ``sluice_buffer_fill{component,label}``, ``sluice_buffer_evictions_total{component,label}``,
  ``sluice_source_events_total{component,direction,source}``,
  ``sluice_source_rejections_total{component,source,class}``,
  ``sluice_source_class_events_total{component,source,label}``,
  ``sluice_contaminated_total{component,method}``;
  any other name becomes ``sluice_<name>`` (dots as underscores), counters with ``_total``.
  The trainer uses its own ``Exposition``: ``sluice_trainer_<name>`` labelled with the
  snapshot's labels (``trainer/metrics.py``).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.records import MetricSnapshot

V = TypeVar("V")

# --- names ------------------------------------------------------------------------------

IN, OUT, REJECTED = "in", "out", "rejected"  # counters: events into a stage, passed, rejected
BATCHES = "batches"  # counter: curated batches emitted (balance), consumed (trainer)
INDEX_SIZE = "index.size"  # gauge: vectors in the semantic index (dedup)
ADMIT_HOLD_MAX_S = "admit.hold_s.max"  # gauge: longest recent admission-script call (dedup)
INDEX_AGED_OUT = "index.aged_out"  # counter: vectors the horizon removed (dedup)
INDEX_RACE_LOST = "index.race_lost"  # counter: admissions that gave way to a racing worker
RETRIES = "retries"  # counter: micro-batch attempts that failed for every record and waited
STALLED_S = "stalled_s"  # gauge: seconds the current micro-batch has waited (0: flowing)
BUSY_S = "busy_s"  # gauge (a running total): seconds the stage's executor ran its steps
LATENCY_QUANTILES = (50, 95, 99)  # the percentiles ``snapshot`` reports as ``latency_ms(q)``


@dataclass(frozen=True)
class Names:
    """The names ``<prefix><key>`` of one kind of number, one name per key."""

    prefix: str

    def __call__(self, key: object) -> str:
        """The name for ``key``."""
        return f"{self.prefix}{key}"

    def key(self, name: str) -> str | None:
        """The key inside ``name``; None when ``name`` is not one of these names."""
        return name[len(self.prefix):] if name.startswith(self.prefix) else None

    def of(self, values: Mapping[str, V]) -> dict[str, V]:
        """``{key: value}`` for the entries of ``values`` that are these names (name order)."""
        n = len(self.prefix)
        return {name[n:]: value for name, value in sorted(values.items())
                if name.startswith(self.prefix)}


# Counters of every stage
rejected = Names("rejected.")         # rejections by reason (exact_duplicate, quality:<rule>…)
class_in = Names("in.label.")         # events per class into a stage (balance)
class_out = Names("out.label.")       # events per class passed on
# Gauges of every stage
latency_ms = Names("latency_ms.p")    # event time → processed, by percentile: latency_ms(95)
step_seconds = Names("seconds.")      # seconds spent in each step so far (a running total)
# The balance stage: counter evicted, gauges share_ema … buffer_fill; difficulty also feedback
evicted = Names("evicted.")           # samples evicted from a full class buffer
evicted_unused = Names("unused_evicted.")  # of those, never in a batch (the pool overflowed)
share_ema = Names("share.ema.")       # EMA share of the stream per class
share_target = Names("share.target.")  # the policy's target share per class
class_weight = Names("weight.")       # importance weight per class
class_difficulty = Names("difficulty.")  # loss factor per class
buffer_fill = Names("buffer.")        # samples buffered per class
truncated = Names("truncated.")       # counter: contents cut to fit a batch, by kind
relabeled = Names("relabeled.")       # counter: samples put in the overflow class, by reason
RESENT = "batches.resent"             # counter: recorded batches re-sent after a crash or failure
# Per source (``StageMetrics.source``: at most ``max_sources`` names), counters of every
# stage; a two-part key is ``<source>|<rest>`` (``source_key``), a source never holds "|"
source_in = Names("source.in.")          # events of each source into a stage
source_out = Names("source.out.")        # events of each source passed on
source_rejected = Names("source.rejected.")  # "<source>|<class>": rejections by reason class
source_class = Names("source.label.")    # "<source>|<label>": passed on, by class
CONTAMINATED = "contaminated"            # the reason of an event that copies a protected doc
contaminated = Names("contaminated.")    # counter: contaminated events by the method that matched
# The trainer
dropped = Names("dropped.")           # counter: records dropped, by reason
skipped = Names("skipped.")           # counter: batches skipped, by reason
evaluation = Names("eval.")           # gauge: held-out evaluation results (macro_f1…)


SOURCE_SEP = "|"
UNKNOWN_SOURCE = "unknown"  # an event without a source (or none decoded)
MAX_SOURCE_CHARS = 64


def source_key(source: str, rest: str) -> str:
    """The key of a two-part per-source name: ``source_rejected(source_key(s, "quality"))``."""
    return f"{source}{SOURCE_SEP}{rest}"


def split_source_key(key: str) -> tuple[str, str]:
    """(source, rest) of a ``source_key``."""
    source, _, rest = key.partition(SOURCE_SEP)
    return source, rest


def reason_class(reason: str) -> str:
    """The class of a rejection reason: duplicate, quality, invalid, contaminated, error."""
    if reason.endswith("_duplicate"):
        return "duplicate"
    head = reason.split(":", 1)[0]
    return head if head in ("quality", "invalid", "error", CONTAMINATED) else "other"


# --- the snapshot builder ---------------------------------------------------------------

LATENCY_WINDOW = 2048  # most recent event-time → now latencies kept for percentiles


def instance_name() -> str:
    """host:pid, the identity of this process in the metrics."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class Decision(Protocol):
    """What ``StageMetrics.count_outcomes`` reads of a stage's decision about one record."""

    @property
    def rejected(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def record(self) -> Any: ...


class StageMetrics:
    """Counts in, out, rejected by reason; event-time latency; extra gauges and labels.

    Each outcome is also counted per source (``source_in``, ``source_out``,
    ``source_rejected`` by ``reason_class``, ``source_class``): the first ``max_sources``
    sources by name, later ones as ``overflow_source``, so the names stay bounded whatever
    producers send; every event has one outcome, so the per-source counters add up to the
    totals. A ``contaminated`` rejection also counts ``contaminated(<method>)``, the method
    being its detail's first word.

    Not thread-safe: a caller that reads from another thread (a Prometheus endpoint) holds
    its own lock around every call.
    """

    def __init__(self, component: str, labels: Mapping[str, str] | None = None, *,
                 max_sources: int = 64, overflow_source: str = "other") -> None:
        self.component = component
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}
        self.labels: dict[str, str] = dict(labels or {})
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.max_sources = max_sources
        self.overflow_source = overflow_source
        self._sources: set[str] = set()

    def source(self, record: Any) -> str:
        """The name ``record``'s source is counted under (bounded; see the class doc)."""
        raw = record.get("source") if isinstance(record, Mapping) else None
        name = str(raw or UNKNOWN_SOURCE)[:MAX_SOURCE_CHARS].replace(SOURCE_SEP, "_")
        if name in self._sources:
            return name
        if len(self._sources) < self.max_sources:
            self._sources.add(name)
            return name
        return self.overflow_source

    def count_in(self, n: int = 1) -> None:
        self.counters[IN] += n

    def count_outcomes(self, outcomes: Iterable[Decision], event_times_ms: Iterable[int] = ()
                       ) -> None:
        """Count each outcome as out (and ``class_out``) or rejected (and ``rejected``
        by reason), and record the latencies of ``event_times_ms``."""
        for outcome in outcomes:
            source = self.source(outcome.record)
            self.counters[source_in(source)] += 1
            if outcome.rejected:
                reason = str(outcome.reason)
                self.counters[REJECTED] += 1
                self.counters[rejected(reason)] += 1
                self.counters[source_rejected(source_key(source, reason_class(reason)))] += 1
                if reason == CONTAMINATED:
                    detail = str(outcome.record.get("detail") or "")
                    self.counters[contaminated(detail.split(":", 1)[0] or "unknown")] += 1
            else:
                self.counters[OUT] += 1
                self.counters[source_out(source)] += 1
                label = outcome.record.get("label")
                if label is not None:
                    self.counters[class_out(label)] += 1
                    self.counters[source_class(source_key(source, str(label)))] += 1
        now = _now_ms()
        self._latency_ms.extend(max(0, now - t) for t in event_times_ms)

    def add_seconds(self, seconds: Mapping[str, float]) -> None:
        """Time spent per sub-step so far (gauges ``step_seconds(step)``)."""
        for step, value in seconds.items():
            self.gauges[step_seconds(step)] = float(value)

    def snapshot(self) -> MetricSnapshot:
        """The current totals and gauges, ready for sluice.metrics."""
        gauges = dict(self.gauges)
        if self._latency_ms:
            lat = np.fromiter(self._latency_ms, dtype=float)
            for q in LATENCY_QUANTILES:
                gauges[latency_ms(q)] = float(np.percentile(lat, q))
        return MetricSnapshot(component=self.component, instance=instance_name(),
                              timestamp=_now_ms(), counters=dict(self.counters), gauges=gauges,
                              labels=dict(self.labels))


# --- Prometheus -------------------------------------------------------------------------

def _quantile(key: str) -> str:
    return str(int(key) / 100)  # latency_ms.p95 → quantile="0.95"


@dataclass(frozen=True)
class Exported:
    """``names`` as one Prometheus metric: ``metric{<label>="<key>", **fixed}``."""

    names: Names
    metric: str
    help: str
    label: str
    fixed: tuple[tuple[str, str], ...] = ()
    counter: bool = False  # a Prometheus counter (else a gauge)
    label_value: Callable[[str], str] = str  # the key as the label's value
    second: str | None = None  # a ``source_key``: ``label`` is the source, this the rest


@dataclass(frozen=True)
class Exposition:
    """How snapshots become Prometheus metrics.

    ``exact``: plain names with a metric of their own, as (name, metric, help), counters;
    ``families``: the ``Names`` rendered as one labelled metric each; any other name becomes
    ``prefix + name`` (dots as underscores), a counter when it is a snapshot counter.
    Each sample is labelled ``component`` (``component_label``) and with the snapshot's
    labels (``snapshot_labels``).
    """

    prefix: str = "sluice_"
    exact: tuple[tuple[str, str, str], ...] = ()
    families: tuple[Exported, ...] = ()
    component_label: bool = True
    snapshot_labels: bool = False

    def metric_name(self, name: str) -> str:
        """``eval.macro_f1`` → ``<prefix>eval_macro_f1``."""
        return self.prefix + re.sub(r"[^a-zA-Z0-9_]", "_", name)

    def metrics(self, snapshots: Iterable[MetricSnapshot]) -> list[Metric]:
        """The Prometheus metric families of ``snapshots``."""
        out = _Families()
        for snap in snapshots:
            base: dict[str, str] = {}
            if self.snapshot_labels:
                base.update(snap.get("labels") or {})
            if self.component_label:
                base["component"] = snap["component"]
            for name, count in sorted(snap["counters"].items()):
                self._add(out, base, name, float(count), counter=True)
            for name, value in sorted(snap["gauges"].items()):
                self._add(out, base, name, float(value), counter=False)
        return list(out.families.values())

    def _add(self, out: _Families, base: dict[str, str], name: str, value: float,
             counter: bool) -> None:
        for plain, metric, help_text in self.exact:
            if name == plain:
                out.add(True, metric, help_text, base, value)
                return
        for f in self.families:
            key = f.names.key(name)
            if key is not None:
                if f.second is not None:
                    source, rest = split_source_key(key)
                    labels = base | dict(f.fixed) | {f.label: source, f.second: rest}
                else:
                    labels = base | dict(f.fixed) | {f.label: f.label_value(key)}
                out.add(f.counter, f.metric, f.help, labels, value)
                return
        kind = "Counter" if counter else "Gauge"
        out.add(counter, self.metric_name(name), f"{kind} {name}.", base, value)


class _Families:
    """Collects samples into metric families, creating each family once."""

    def __init__(self) -> None:
        self.families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def add(self, counter: bool, name: str, help_text: str, labels: dict[str, str],
            value: float) -> None:
        # prometheus_client names a counter family without its _total suffix.
        name = name.removesuffix("_total") if counter else name
        if name not in self.families:
            factory = CounterMetricFamily if counter else GaugeMetricFamily
            self.families[name] = factory(name, help_text, labels=sorted(labels))
        self.families[name].add_metric([labels[k] for k in sorted(labels)], value)


_CLASS_EVENTS = "Events per class."
_CLASS_SHARE = "Class share."
_SOURCE_EVENTS = "Events per source."

STAGE_EXPOSITION = Exposition(
    exact=(
        (IN, "sluice_events_in_total", "Events in."),
        (OUT, "sluice_events_out_total", "Events out."),
        (REJECTED, "sluice_events_rejected_total", "Events rejected."),
        (BUSY_S, "sluice_busy_seconds_total",
         "Seconds the stage spent running its steps (its utilization: the rate of this)."),
    ),
    families=(
        Exported(rejected, "sluice_rejections_total", "Rejections by reason.", "reason",
                 counter=True),
        Exported(class_in, "sluice_class_events_total", _CLASS_EVENTS, "label",
                 (("direction", "in"),), counter=True),
        Exported(class_out, "sluice_class_events_total", _CLASS_EVENTS, "label",
                 (("direction", "out"),), counter=True),
        Exported(evicted, "sluice_buffer_evictions_total",
                 "Samples evicted from a full class buffer.", "label", counter=True),
        Exported(evicted_unused, "sluice_buffer_evictions_unused_total",
                 "Samples evicted from a full class buffer before any batch used them "
                 "(the stream outran training).", "label", counter=True),
        Exported(step_seconds, "sluice_step_seconds_total", "Seconds spent per step.", "step",
                 counter=True),
        Exported(latency_ms, "sluice_latency_ms", "Event time to processed, percentiles.",
                 "quantile", label_value=_quantile),
        Exported(share_ema, "sluice_class_share", _CLASS_SHARE, "label", (("kind", "ema"),)),
        Exported(share_target, "sluice_class_share", _CLASS_SHARE, "label",
                 (("kind", "target"),)),
        Exported(class_weight, "sluice_class_weight", "Importance weight per class.", "label"),
        Exported(class_difficulty, "sluice_class_difficulty", "Loss factor per class.",
                 "label"),
        Exported(buffer_fill, "sluice_buffer_fill", "Samples buffered per class.", "label"),
        Exported(source_in, "sluice_source_events_total", _SOURCE_EVENTS, "source",
                 (("direction", "in"),), counter=True),
        Exported(source_out, "sluice_source_events_total", _SOURCE_EVENTS, "source",
                 (("direction", "out"),), counter=True),
        Exported(source_rejected, "sluice_source_rejections_total",
                 "Rejections per source by reason class.", "source", counter=True,
                 second="class"),
        Exported(source_class, "sluice_source_class_events_total",
                 "Events passed on per source and class.", "source", counter=True,
                 second="label"),
        Exported(contaminated, "sluice_contaminated_total",
                 "Events that copy a protected document, by the method that matched.",
                 "method", counter=True),
    ),
)


class SnapshotCollector(Collector):
    """A prometheus_client collector over live snapshot sources, read at scrape time."""

    def __init__(self, sources: Callable[[], Iterable[MetricSnapshot]],
                 exposition: Exposition = STAGE_EXPOSITION) -> None:
        self.sources = sources
        self.exposition = exposition

    def collect(self) -> Iterator[Metric]:
        yield from self.exposition.metrics(self.sources())
