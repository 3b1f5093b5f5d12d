"""Sources as first-class: per-source counters that add up to the totals (the real ingest
pipeline over the session Redis, counted by ``StageMetrics`` as the worker counts), their
bound, their Prometheus names, and source priorities in the balance targets."""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from agents.pipeline import build_pipeline
from agents.policy import target_shares, update_priority
from agents.step import Coords, Item, Outcome, rejection
from schemas.records import CuratedSample
from sluice.errors import SettingsError
from sluice.metrics_view import View, sample_of
from sluice.settings import Settings, load_settings, settings_env
from streams.metrics import (
    CONTAMINATED,
    IN,
    OUT,
    REJECTED,
    STAGE_EXPOSITION,
    StageMetrics,
    class_out,
    reason_class,
    rejected,
    source_class,
    source_in,
    source_key,
    source_out,
    source_rejected,
    split_source_key,
)
from streams.serde import encode
from tests.agents.pipeline_util import corpus, exact_edit, raw_event, unique_id, whitespace_edit
from tests.agents.test_balance_step import (
    BATCH,
    MIX,
    WARMUP,
    balancer,
    cleanup,
    feed,
    imbalanced_stream,
    pooled_shares,
)


def mixed_stream() -> list[bytes]:
    """Raw messages from three producers: originals, exact and near copies (some of another
    source's originals), a too-short one, and bytes that do not decode."""
    snippets = corpus(12, start=30)
    sources = ["github", "gitlab", "scrape"]
    events = [raw_event(f"o{n}", s.text, source=sources[n % 3], label=("a", "b")[n % 2])
              for n, s in enumerate(snippets)]
    events += [raw_event(f"x{n}", exact_edit(s.text), source="scrape")
               for n, s in enumerate(snippets[:4])]
    events += [raw_event(f"w{n}", whitespace_edit(s.text), source="gitlab", label="b")
               for n, s in enumerate(snippets[4:7])]
    events += [raw_event("short", "x = 1", source="github")]
    return [encode("RawEvent", e) for e in events] + [b"\x00not an event", b"{broken json"]


def per_source(counters: Counter[str]) -> dict[str, Any]:
    """The per-source counters, summed over sources (and over classes for the pairs)."""
    rejected_by: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for key, n in source_rejected.of(counters).items():
        rejected_by[split_source_key(key)[1]] += n
    for key, n in source_class.of(counters).items():
        labels[split_source_key(key)[1]] += n
    return {"in": sum(source_in.of(counters).values()),
            "out": sum(source_out.of(counters).values()),
            "rejected": rejected_by, "labels": labels}


def check_adds_up(counters: Counter[str]) -> None:
    sums = per_source(counters)
    assert sums["in"] == counters[IN]
    assert sums["out"] == counters[OUT]
    assert sum(sums["rejected"].values()) == counters[REJECTED]
    by_class: Counter[str] = Counter()
    for reason, n in rejected.of(counters).items():
        by_class[reason_class(reason)] += n
    assert sums["rejected"] == by_class
    assert sums["labels"] == Counter(class_out.of(counters))


@pytest.mark.integration
@pytest.mark.parametrize("max_sources", [64, 2])
def test_per_source_counters_add_up_to_the_totals(stack: Settings, client: redis.Redis,
                                                  max_sources: int) -> None:
    config = stack.model_copy(update={
        "redis": stack.redis.model_copy(update={"namespace": unique_id()})})
    pipeline = build_pipeline(config, client, stages=["ingest"])
    metrics = StageMetrics("ingest", max_sources=max_sources, overflow_source="other")
    values = mixed_stream()
    for start in range(0, len(values), 8):  # micro-batches, as the agent takes them
        batch = [Item(v, Coords("raw", 0, start + n))
                 for n, v in enumerate(values[start:start + 8])]
        metrics.count_in(len(batch))
        metrics.count_outcomes(pipeline.run(batch))
    counters = metrics.counters
    check_adds_up(counters)
    inflow = source_in.of(counters)
    if max_sources == 64:
        # Who sends the duplicates: scrape's exact copies, gitlab's whitespace copies.
        assert source_rejected.of(counters) == {
            source_key("scrape", "duplicate"): 4, source_key("gitlab", "duplicate"): 3,
            source_key("github", "quality"): 1, source_key("unknown", "invalid"): 2}
        assert inflow == {"github": 5, "gitlab": 7, "scrape": 8, "unknown": 2}
        assert source_out.of(counters) == {"github": 4, "gitlab": 4, "scrape": 4}
        assert source_class.of(counters)[source_key("gitlab", "b")] == 2
    else:
        # The first two sources seen keep their names; every later one is "other".
        assert len(inflow) == 3 and "other" in inflow
        assert sum(inflow.values()) == len(values)


def test_a_source_name_is_bounded_and_never_breaks_a_two_part_key() -> None:
    metrics = StageMetrics("ingest", max_sources=1)
    assert metrics.source({"source": "a|b" + "x" * 100}) == "a_b" + "x" * 61
    assert metrics.source({"source": "second"}) == "other"
    assert metrics.source({"source": None}) == "other"  # "unknown" would be a third name
    assert split_source_key(source_key("a_b", "python/3|x")) == ("a_b", "python/3|x")
    assert StageMetrics("x").source(b"raw bytes") == "unknown"


def test_per_source_counters_become_labelled_prometheus_metrics() -> None:
    metrics = StageMetrics("dedup")
    metrics.counters.update({source_in("github"): 5, source_out("github"): 3,
                             source_rejected(source_key("github", "duplicate")): 2,
                             source_class(source_key("github", "py/3")): 3})
    families = {f.name: f for f in STAGE_EXPOSITION.metrics([metrics.snapshot()])}
    samples = {(f.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    base = (("component", "dedup"),)
    assert samples[("sluice_source_events", tuple(sorted(
        (*base, ("direction", "in"), ("source", "github")))))] == 5
    assert samples[("sluice_source_rejections", tuple(sorted(
        (*base, ("class", "duplicate"), ("source", "github")))))] == 2
    assert samples[("sluice_source_class_events", tuple(sorted(
        (*base, ("label", "py/3"), ("source", "github")))))] == 3


# -- source priorities -----------------------------------------------------------------------


def test_priorities_multiply_the_class_targets() -> None:
    ema = {"a": 6.0, "b": 3.0, "c": 1.0}
    plain = target_shares(ema, "natural")
    lifted = target_shares(ema, "natural", priority={"b": 2.0})
    # By hand: raw a 0.6, b 0.3 × 2, c 0.1 → 0.6 / 1.3, 0.6 / 1.3, 0.1 / 1.3.
    assert plain.shares == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})
    assert lifted.shares == pytest.approx({"a": 0.6 / 1.3, "b": 0.6 / 1.3, "c": 0.1 / 1.3})
    assert lifted.weights["b"] == pytest.approx((0.6 / 1.3) / 0.3)
    # With difficulty too, both factors multiply: a 0.6 × 0.5, b 0.3 × 2, c 0.1 (sum 1).
    both = target_shares(ema, "natural", difficulty={"a": 0.5}, priority={"b": 2.0})
    assert both.shares == pytest.approx({"a": 0.3, "b": 0.6, "c": 0.1})


def test_a_class_priority_is_the_ema_of_its_sources_priorities() -> None:
    alpha, window = 0.9, 4
    decay = alpha ** (1 / window)
    p = update_priority(None, 2.0, alpha, window)
    assert p == 2.0
    p = update_priority(p, 1.0, alpha, window)
    assert p == pytest.approx(decay * 2.0 + (1 - decay) * 1.0)
    # After one window of priority-1 samples the old value has decayed by alpha.
    for _ in range(window - 1):
        p = update_priority(p, 1.0, alpha, window)
    assert p - 1.0 == pytest.approx(alpha * (2.0 - 1.0))
    assert math.isclose(update_priority(3.0, 3.0, alpha, window), 3.0)


@pytest.mark.integration
def test_a_prioritized_source_lifts_its_classes_in_the_batches(
        stack: Settings, client: redis.Redis) -> None:
    stream: list[CuratedSample] = [
        {**s, "source": "docs-site" if s["label"] == "docs" else "crawl"}  # type: ignore[misc]
        for s in imbalanced_stream()]
    step = balancer(stack, client, "natural", source_priorities={"docs-site": 2.0})
    try:
        _, batches = feed(step, stream)
    finally:
        cleanup(step)
    shares = pooled_shares(batches[WARMUP:])
    raw = {c: MIX[c] * (2.0 if c == "docs" else 1.0) for c in MIX}
    expected = {c: v / sum(raw.values()) for c, v in raw.items()}
    print(f"\n[sources] natural × docs-site 2: pooled {shares}, target {expected}")
    assert all(abs(shares[c] - expected[c]) <= 0.02 for c in MIX)
    assert batches[-1]["target_shares"]["docs"] == pytest.approx(expected["docs"], abs=0.02)
    assert len(batches[-1]["samples"]) == BATCH


def test_the_dashboard_shows_who_sends_the_duplicates() -> None:
    def outcome(source: str, reason: str | None, label: str = "py",
                detail: str | None = None) -> Outcome:
        event = {"id": "e", "source": source, "kind": "CODE", "label": label}
        if reason is None:
            return Outcome(event, rejected=False)
        return rejection("ingest", reason, Coords("raw", 0, 0), event=event, detail=detail)

    ingest, dedup = StageMetrics("ingest"), StageMetrics("dedup")
    ingest.count_outcomes([outcome("crawl", "exact_duplicate"),
                           outcome("crawl", "near_duplicate"), outcome("crawl", None),
                           outcome("crawl", None), outcome("repo", None, "go"),
                           outcome("repo", "quality:min_chars"),
                           outcome("repo", CONTAMINATED, detail="words: estimated …")])
    dedup.count_outcomes([outcome("crawl", "semantic_duplicate"), outcome("crawl", None),
                          outcome("repo", None, "go")])
    histories = {(m.component, "w1"): [sample_of(m.snapshot())] for m in (ingest, dedup)}
    state = View().build(histories, now=time.time())
    assert state["sources"] == [
        {"source": "crawl", "in": 4, "kept": 1, "kept_share": 0.25, "duplicate_rate": 0.75,
         "duplicate_part": 1.0, "rejected": {"duplicate": 3}, "classes": {"py": 1.0}},
        {"source": "repo", "in": 3, "kept": 1, "kept_share": 0.33333, "duplicate_rate": 0.0,
         "duplicate_part": 0.0, "rejected": {"contaminated": 1, "quality": 1},
         "classes": {"go": 1.0}}]
    assert state["contamination"] == {"words": 1}


def test_the_new_settings_reach_a_child_process(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    chosen = load_settings(state_dir=str(tmp_path),
                           balance={"source_priorities": {"docs-site": 2.0},
                                    "replay_policy": "reducible"},
                           decontaminate={"enabled": True, "files": [str(tmp_path / "e.jsonl")]},
                           metrics={"max_sources": 8})
    for name in [k for k in os.environ if k.startswith("SLUICE_")]:
        monkeypatch.delenv(name)
    for name, value in settings_env(chosen).items():
        monkeypatch.setenv(name, value)
    assert load_settings().model_dump() == chosen.model_dump()
    with pytest.raises(SettingsError, match="source_priorities"):
        load_settings(balance={"source_priorities": {"x": 0.0}})
