"""What a person watching sluice wants to see, derived from MetricSnapshot histories.

Pure functions over ``{(component, instance): [Sample, ...]}`` (oldest first), shared by the
web dashboard and ``sluice monitor``, tested without Kafka. The rules:

- Counters are totals since a process started; a component's total is the sum of the latest
  snapshot of each of its instances (a restarted worker is a new instance, so nothing is lost).
- A rate is the increase of a counter inside a sliding window divided by the time its samples
  span, per instance (a drop counts as a restart from zero, as in Prometheus), summed over
  instances.
- A gauge comes only from instances that published recently ("fresh"); instances are
  combined by ``GAUGE_RULES`` (latency: the worst instance; trainer step: the furthest; ...).
- Class shares compare what the balancer received (``balance`` ``class_in``; ``ingest``
  ``class_out`` when no balancer runs) with what it put into batches (``balance``
  ``class_out``).
- The duplicate rate is the share of the events entering the pipeline (ingest ``in``) that
  were rejected as ``*_duplicate`` (exact, near, semantic).
- Per source (the filter stages count them): events in at the first filter stage, kept by
  the last one, rejections by class over both, the class mix of what was kept, and the
  source's part of all duplicates (which producer sends them). Contaminated events are
  counted by the method that matched.

Metric names are built and parsed only by ``streams.metrics``; functions here that take a
``prefix`` take the ``prefix`` of one of its ``Names``.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from agents.config import AGENTS
from schemas.records import MetricSnapshot
from streams.metrics import (
    BATCHES,
    IN,
    INDEX_SIZE,
    LATENCY_QUANTILES,
    OUT,
    REJECTED,
    Names,
    buffer_fill,
    class_in,
    class_out,
    contaminated,
    evaluation,
    latency_ms,
    rejected,
    share_target,
    source_class,
    source_in,
    source_out,
    source_rejected,
    split_source_key,
)

Key = tuple[str, str]  # (component, instance)
TRAINER = "trainer"
FILTER_STAGES = AGENTS[:2]  # the stages that count per source (ingest, dedup)
TRAINER_GAUGES = ("step", "loss", "accuracy", "samples_per_s", "data_wait_share", "lag", "lr")


@dataclass(frozen=True)
class Sample:
    """One snapshot of one instance, reduced to what the derivations read."""

    t: float  # seconds since the epoch (the snapshot's own timestamp)
    counters: Mapping[str, int]
    gauges: Mapping[str, float]
    labels: Mapping[str, str] = field(default_factory=dict)


def sample_of(snapshot: MetricSnapshot) -> Sample:
    """A ``Sample`` from a decoded MetricSnapshot."""
    return Sample(snapshot["timestamp"] / 1000.0, dict(snapshot["counters"]),
                  dict(snapshot["gauges"]), dict(snapshot.get("labels") or {}))


Histories = Mapping[Key, Sequence[Sample]]


# --- counters ---------------------------------------------------------------------------

def window(samples: Sequence[Sample], start: float, end: float) -> Sequence[Sample]:
    """The samples with ``start <= t <= end`` (samples are in time order)."""
    lo = bisect_left(samples, start, key=_time)
    hi = bisect_right(samples, end, key=_time)
    return samples[lo:hi]


def _time(sample: Sample) -> float:
    return sample.t


def counter_increase(values: Sequence[float]) -> float:
    """Total increase over consecutive values of a counter; a drop is a restart from zero."""
    return sum((b - a if b >= a else b) for a, b in pairwise(values))


def counter_rate(samples: Sequence[Sample], name: str, start: float, end: float
                 ) -> float | None:
    """Per-second increase of counter ``name`` between ``start`` and ``end`` (inclusive);
    None when fewer than two samples fall inside. A missing counter is zero so far."""
    inside = window(samples, start, end)
    if len(inside) < 2 or inside[-1].t <= inside[0].t:
        return None
    values = [float(s.counters.get(name, 0)) for s in inside]
    return counter_increase(values) / (inside[-1].t - inside[0].t)


def component_rate(histories: Histories, component: str, name: str, start: float,
                   end: float) -> float | None:
    """``counter_rate`` summed over the instances of ``component`` (None: no instance had
    two samples in the window)."""
    rates = [counter_rate(samples, name, start, end)
             for (comp, _), samples in histories.items() if comp == component]
    known = [r for r in rates if r is not None]
    return sum(known) if known else None


def labelled_rates(histories: Histories, component: str, prefix: str, start: float,
                   end: float) -> dict[str, float]:
    """Per-second rate of every counter ``<prefix><label>`` of ``component``, by label."""
    names = Names(prefix)
    labels = {label for (comp, _), samples in histories.items() if comp == component
              for s in window(samples, start, end) for label in names.of(s.counters)}
    out = {}
    for label in sorted(labels):
        rate = component_rate(histories, component, names(label), start, end)
        if rate is not None:
            out[label] = rate
    return out


def totals(histories: Histories, component: str) -> Counter[str]:
    """The component's counters: the latest snapshot of each instance, summed."""
    out: Counter[str] = Counter()
    for (comp, _), samples in histories.items():
        if comp == component and samples:
            out.update(samples[-1].counters)
    return out


def labelled(counters: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``{label: value}`` for the counters or gauges named ``<prefix><label>``."""
    return {label: float(v) for label, v in Names(prefix).of(counters).items()}


def shares(counts: Mapping[str, float]) -> dict[str, float]:
    """Each value's fraction of the total (empty when the total is zero)."""
    total = sum(v for v in counts.values() if v > 0)
    if total <= 0:
        return {}
    return {k: max(v, 0.0) / total for k, v in counts.items()}


# --- gauges -----------------------------------------------------------------------------

def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# How the instances of one component combine, by gauge-name prefix (first match wins).
GAUGE_RULES: tuple[tuple[str, Callable[[list[float]], float]], ...] = (
    (latency_ms.prefix, max),   # the slowest instance is what a user waits for
    ("step", max),              # ranks advance together; the furthest is the step
    ("samples_per_s", sum),
    ("lag", sum),               # each trainer rank reads its own partitions
    (buffer_fill.prefix, sum),  # buffers are per partition
    (INDEX_SIZE, max),          # one shared index, every instance sees it whole
    ("", _mean),
)


def combine(name: str, values: list[float]) -> float:
    """Instances' values of gauge ``name`` combined by ``GAUGE_RULES``."""
    for prefix, rule in GAUGE_RULES:
        if name.startswith(prefix):
            return rule(values)
    return _mean(values)  # pragma: no cover - the "" rule always matches


def gauges_at(histories: Histories, component: str, t: float, stale_s: float
              ) -> dict[str, float]:
    """The component's gauges as of time ``t``: from each instance, its last sample at or
    before ``t`` if not older than ``stale_s``; combined across instances."""
    seen: dict[str, list[float]] = {}
    for (comp, _), samples in histories.items():
        if comp != component:
            continue
        last = _last_before(samples, t)
        if last is None or t - last.t > stale_s:
            continue
        for name, value in last.gauges.items():
            if math.isfinite(value):
                seen.setdefault(name, []).append(float(value))
    return {name: combine(name, values) for name, values in seen.items()}


def _last_before(samples: Sequence[Sample], t: float) -> Sample | None:
    i = bisect_right(samples, t, key=_time)
    return samples[i - 1] if i else None


# --- the view ---------------------------------------------------------------------------

def components(histories: Histories) -> list[str]:
    """Components present, pipeline stages first in flow order, the trainer last."""
    present = {comp for comp, _ in histories}
    ordered = [c for c in AGENTS if c in present]  # stream order
    ordered += sorted(present - set(AGENTS) - {TRAINER})
    if TRAINER in present:
        ordered.append(TRAINER)
    return ordered


def entry_component(histories: Histories) -> str | None:
    """The first pipeline stage present: where events enter."""
    stages = [c for c in components(histories) if c != TRAINER]
    return stages[0] if stages else None


def raw_source(histories: Histories) -> tuple[str, str] | None:
    """(component, counter prefix) of the class counts before balancing."""
    present = {comp for comp, _ in histories}
    if "balance" in present:
        return "balance", class_in.prefix
    if "ingest" in present:
        return "ingest", class_out.prefix
    return None


def _r(value: float | None, digits: int = 5) -> float | None:
    """Round to ``digits`` significant digits for JSON (keeps payloads small); None and
    non-finite values become None."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class View:
    """Builds the JSON-ready state from histories.

    ``window_s``: the sliding window of rates and windowed shares; ``span_s``: how far back
    the time series go; ``step_s``: their resolution; ``stale_s``: how old an instance's
    last snapshot may be for its gauges to count.
    """

    window_s: float = 30.0
    span_s: float = 600.0
    step_s: float = 5.0
    stale_s: float = 20.0

    @classmethod
    def for_interval(cls, interval_s: float, span_s: float = 600.0) -> View:
        """Defaults fitted to the publishers' ``metrics.interval_s``."""
        step = max(1.0, interval_s)
        return cls(window_s=max(30.0, 6 * interval_s), span_s=span_s, step_s=step,
                   stale_s=3 * interval_s + 5.0)

    def grid(self, now: float) -> list[float]:
        """Series times: every ``step_s`` up to ``now``, aligned so they do not jitter."""
        end = math.floor(now / self.step_s) * self.step_s
        n = int(self.span_s // self.step_s)
        return [end - (n - k) * self.step_s for k in range(n + 1)]

    def build(self, histories: Histories, now: float,
              lag: Sequence[tuple[float, Mapping[str, int]]] = ()) -> dict[str, Any]:
        """Current tables and time series (``now`` in seconds since the epoch); ``lag``:
        the consumer-lag probes, oldest first, as (time, {topic: messages behind})."""
        last = max((s[-1].t for s in histories.values() if s), default=None)
        return {
            "last_snapshot": None if last is None else int(last * 1000),
            "window_s": self.window_s,
            "stages": self.stage_rows(histories, now),
            "rejections": self.rejection_rows(histories, now),
            "duplicates": self.duplicate_summary(histories, now),
            "classes": self.class_rows(histories, now),
            "sources": self.source_rows(histories),
            "contamination": self.contamination(histories),
            "trainer": self.trainer_row(histories, now),
            "lag": dict(lag[-1][1]) if lag and now - lag[-1][0] <= self.stale_s else None,
            "series": self.series(histories, now, lag),
        }

    def stage_rows(self, histories: Histories, now: float) -> list[dict[str, Any]]:
        """Per stage: totals, rates over the window ending now, latency, instances."""
        start = now - self.window_s
        rows = []
        for comp in components(histories):
            if comp == TRAINER:
                continue
            tot = totals(histories, comp)
            gauges = gauges_at(histories, comp, now, self.stale_s)
            mine = [s for (c, _), s in histories.items() if c == comp and s]
            row: dict[str, Any] = {
                "component": comp,
                "instances": len(mine),
                "fresh": sum(1 for s in mine if now - s[-1].t <= self.stale_s),
                "age_s": _r(now - max(s[-1].t for s in mine), 3),
            }
            for name in (IN, OUT, REJECTED):
                row[name] = int(tot.get(name, 0))
                row[f"{name}_per_s"] = _r(component_rate(histories, comp, name, start, now))
            row["latency_ms"] = {f"p{q}": _r(gauges.get(latency_ms(q)))
                                 for q in LATENCY_QUANTILES}
            rows.append(row)
        return rows

    def rejection_rows(self, histories: Histories, now: float) -> list[dict[str, Any]]:
        """Per rejection reason: where, total, rate, share of the events that entered."""
        start = now - self.window_s
        entry = entry_component(histories)
        entered = totals(histories, entry).get(IN, 0) if entry else 0
        rows: list[dict[str, Any]] = []
        for comp in components(histories):
            if comp == TRAINER:
                continue
            rates = labelled_rates(histories, comp, rejected.prefix, start, now)
            for reason, total in labelled(totals(histories, comp), rejected.prefix).items():
                rows.append({"reason": reason, "component": comp, "total": int(total),
                             "per_s": _r(rates.get(reason)),
                             "share": _r(total / entered) if entered else None})
        rows.sort(key=lambda r: -r["total"])
        return rows

    def duplicate_summary(self, histories: Histories, now: float) -> dict[str, Any]:
        """Duplicates as a share of the events that entered: overall and by layer."""
        entry = entry_component(histories)
        entered = totals(histories, entry).get(IN, 0) if entry else 0
        by_reason: dict[str, int] = {}
        for comp in components(histories):
            for reason, total in labelled(totals(histories, comp), rejected.prefix).items():
                if reason.endswith("_duplicate"):
                    by_reason[reason] = by_reason.get(reason, 0) + int(total)
        found = sum(by_reason.values())
        return {"entered": int(entered), "duplicates": found,
                "rate": _r(found / entered) if entered else None,
                "by_reason": {k: _r(v / entered) if entered else None
                              for k, v in sorted(by_reason.items())}}

    def class_rows(self, histories: Histories, now: float) -> list[dict[str, Any]]:
        """Per class: share before balancing, in batches, the policy's target, buffer fill
        (shares over all counted so far)."""
        source = raw_source(histories)
        raw = shares(labelled(totals(histories, source[0]), source[1])) if source else {}
        curated = shares(labelled(totals(histories, "balance"), class_out.prefix))
        gauges = gauges_at(histories, "balance", now, self.stale_s)
        target = labelled(gauges, share_target.prefix)
        buffered = labelled(gauges, buffer_fill.prefix)
        names = sorted(set(raw) | set(curated) | set(target))
        return [{"label": n, "raw": _r(raw.get(n)), "curated": _r(curated.get(n)),
                 "target": _r(target.get(n)), "buffer": _r(buffered.get(n))}
                for n in names]

    def source_rows(self, histories: Histories) -> list[dict[str, Any]]:
        """Per source, most events first: in (first filter stage), kept (last filter stage)
        and its share, duplicate rate, the source's part of all duplicates, rejections by
        class, class mix of the kept (totals so far)."""
        stages = [c for c in components(histories) if c in FILTER_STAGES]
        if not stages:
            return []
        entered = labelled(totals(histories, stages[0]), source_in.prefix)
        kept = labelled(totals(histories, stages[-1]), source_out.prefix)
        by_class: dict[str, Counter[str]] = {}
        for comp in stages:
            for key, n in labelled(totals(histories, comp), source_rejected.prefix).items():
                source, cls = split_source_key(key)
                by_class.setdefault(source, Counter())[cls] += int(n)
        mix: dict[str, dict[str, float]] = {}
        for key, n in labelled(totals(histories, stages[-1]), source_class.prefix).items():
            source, label = split_source_key(key)
            mix.setdefault(source, {})[label] = n
        duplicates = sum(c["duplicate"] for c in by_class.values())
        rows = []
        for source in sorted(set(entered) | set(kept) | set(by_class),
                             key=lambda name: (-entered.get(name, 0), name)):
            n_in, n_kept = entered.get(source, 0.0), kept.get(source, 0.0)
            classes = by_class.get(source, Counter())
            rows.append({
                "source": source, "in": int(n_in), "kept": int(n_kept),
                "kept_share": _r(n_kept / n_in) if n_in else None,
                "duplicate_rate": _r(classes["duplicate"] / n_in) if n_in else None,
                "duplicate_part": _r(classes["duplicate"] / duplicates) if duplicates else None,
                "rejected": dict(sorted(classes.items())),
                "classes": {k: _r(v) for k, v in sorted(shares(mix.get(source, {})).items())},
            })
        return rows

    def contamination(self, histories: Histories) -> dict[str, int]:
        """Events that copy a protected document, by the method that matched (all stages)."""
        found: Counter[str] = Counter()
        for comp in components(histories):
            for method, n in labelled(totals(histories, comp), contaminated.prefix).items():
                found[method] += int(n)
        return dict(sorted(found.items()))

    def trainer_row(self, histories: Histories, now: float) -> dict[str, Any] | None:
        """The trainer's latest step, loss, accuracy, speed (None: no trainer seen)."""
        if not any(comp == TRAINER for comp, _ in histories):
            return None
        # The last values seen, even if the trainer has stopped since (say so by age).
        mine = [s for (c, _), s in histories.items() if c == TRAINER and s]
        latest_t = max(s[-1].t for s in mine)
        gauges = gauges_at(histories, TRAINER, latest_t, self.stale_s)
        row: dict[str, Any] = {name: _r(gauges.get(name)) for name in TRAINER_GAUGES}
        tot = totals(histories, TRAINER)
        row["samples"] = int(tot.get("samples", 0))
        row["batches"] = int(tot.get(BATCHES, 0))
        row["age_s"] = _r(now - latest_t, 3)
        row["evals"] = {k: _r(v) for k, v in labelled(gauges, evaluation.prefix).items()}
        return row

    def series(self, histories: Histories, now: float,
               lag: Sequence[tuple[float, Mapping[str, int]]] = ()) -> dict[str, Any]:
        """Time series on ``grid(now)``; None where nothing was known (a gap)."""
        grid = self.grid(now)
        comps = components(histories)
        stages = [c for c in comps if c != TRAINER]
        out: dict[str, Any] = {"t": grid}
        w = self.window_s

        def throughput(t: float) -> dict[str, float]:
            rates = {f"{c} {n}": component_rate(histories, c, n, t - w, t)
                     for c in stages for n in (IN, OUT)}
            return {k: v for k, v in rates.items() if v is not None}

        def latency(t: float) -> dict[str, float]:
            out: dict[str, float] = {}
            for c in stages:
                gauges = gauges_at(histories, c, t, self.stale_s)
                out.update({f"{c} p{q}": gauges[latency_ms(q)] for q in LATENCY_QUANTILES
                            if latency_ms(q) in gauges})
            return out

        def rejections(t: float) -> dict[str, float]:
            return _merge(labelled_rates(histories, c, rejected.prefix, t - w, t)
                          for c in stages)

        source = raw_source(histories)

        def share_raw(t: float) -> dict[str, float]:
            if source is None:
                return {}
            return shares(labelled_rates(histories, source[0], source[1], t - w, t))

        def share_curated(t: float) -> dict[str, float]:
            return shares(labelled_rates(histories, "balance", class_out.prefix, t - w, t))

        def training(t: float) -> dict[str, float]:
            gauges = gauges_at(histories, TRAINER, t, self.stale_s)
            return {n: gauges[n] for n in ("loss", "accuracy") if n in gauges}

        out["throughput"] = _labelled_series(grid, throughput)
        out["rejections"] = _labelled_series(grid, rejections)
        out["duplicates"] = self._duplicate_series(histories, grid)
        out["latency"] = _labelled_series(grid, latency)
        out["share_raw"] = _labelled_series(grid, share_raw)
        out["share_curated"] = _labelled_series(grid, share_curated)
        out["training"] = _labelled_series(grid, training)
        out["lag"] = self._lag_series(histories, grid, lag)
        return out

    def _duplicate_series(self, histories: Histories, grid: list[float]
                          ) -> dict[str, list[float | None]]:
        entry = entry_component(histories)
        stages = [c for c in components(histories) if c != TRAINER]
        w = self.window_s

        def at(t: float) -> dict[str, float]:
            entered = component_rate(histories, entry, IN, t - w, t) if entry else None
            if not entered:
                return {}
            dup = {k: v for k, v in _merge(labelled_rates(histories, c, rejected.prefix, t - w, t)
                                           for c in stages).items()
                   if k.endswith("_duplicate")}
            result = {k: v / entered for k, v in dup.items()}
            result["all duplicates"] = sum(dup.values()) / entered
            return result

        return _labelled_series(grid, at)

    def _lag_series(self, histories: Histories, grid: list[float],
                    lag: Sequence[tuple[float, Mapping[str, int]]]
                    ) -> dict[str, list[float | None]]:
        def at(t: float) -> dict[str, float]:
            result: dict[str, float] = {}
            probe = next((p for p in reversed(lag) if p[0] <= t), None)
            if probe is not None and t - probe[0] <= self.stale_s:
                result.update({topic: float(n) for topic, n in probe[1].items()})
            trainer = gauges_at(histories, TRAINER, t, self.stale_s).get("lag")
            if trainer is not None:
                result["trainer"] = trainer
            return result

        return _labelled_series(grid, at)


def _merge(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _labelled_series(grid: Sequence[float], at: Callable[[float], Mapping[str, float]]
                     ) -> dict[str, list[float | None]]:
    """``{label: [value at each grid time]}`` from a function giving ``{label: value}``."""
    points = [at(t) for t in grid]
    names = sorted({k for p in points for k in p})
    return {n: [_r(p.get(n)) for p in points] for n in names}
