"""The step base and the pipeline, without services: ``Step.run``'s timing and counters,
``rejection``, ``Pipeline.run``'s forwarding (exhaustively for small batches, and as a
property test with hypothesis), and ``build_pipeline``'s choice of steps, checked against a
Redis client that fails on any connection attempt.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import redis

from agents.exact import ExactDedup
from agents.pipeline import STAGES, Pipeline, build_pipeline
from agents.semantic import PassSemantic
from agents.step import MAX_RAW_IN_REJECTION, Coords, Item, Outcome, Step, rejection
from agents.validate import Validate
from schemas.errors import SluiceError
from sluice.settings import load_settings
from streams.serde import decode, encode

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    given = None

TOPIC = "sluice.raw-events"


def items(n: int, partition: int = 1, first_offset: int = 100) -> list[Item]:
    """``n`` items whose record is ``{"id", "path"}`` (the steps that passed it, so far)."""
    return [Item({"id": f"e{i}", "path": ()}, Coords(TOPIC, partition, first_offset + i),
                 key=f"k{i}".encode()) for i in range(n)]


class Gate(Step):
    """Rejects the ids in ``reject`` (reason ``r.<name>``), passes the rest on with its name
    appended to ``path``; remembers every batch it was given."""

    name = "gate"

    def __init__(self, name: str, reject: Iterable[str] = (), delay: float = 0.0) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]  # one class, several named steps
        self.reject = set(reject)
        self.delay = delay
        self.seen: list[list[Item]] = []

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        self.seen.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        out = []
        for item in items:
            rec = item.record
            if rec["id"] in self.reject:
                out.append(rejection(self.name, f"r.{self.name}", item.coords,
                                     event_id=rec["id"], detail=f"{self.name} said no"))
            else:
                out.append(Outcome({"id": rec["id"], "path": (*rec["path"], self.name)},
                                   rejected=False))
        return out


class Short(Step):
    """A broken filter step: drops the last outcome."""

    name = "short"

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        return [Outcome(i.record, rejected=False) for i in items][:-1]


# -- the base ------------------------------------------------------------------------------


def test_run_counts_in_out_and_each_rejection_reason() -> None:
    step = Gate("g", reject={"e1", "e3", "e4"})
    outcomes = step.run(items(6))
    assert [o.reason for o in outcomes] == [None, "r.g", None, "r.g", "r.g", None]
    step.run(items(2))  # e0, e1 again: counters accumulate over runs
    assert step.counters == Counter({"in": 8, "out": 4, "rejected": 4, "rejected.r.g": 4})


def test_run_times_process_under_the_step_name_and_accumulates() -> None:
    step = Gate("slow", delay=0.02)
    step.run(items(1))
    first = step.seconds["slow"]
    assert first >= 0.02
    step.run(items(1))
    assert step.seconds["slow"] >= first + 0.02
    assert set(step.seconds) == {"slow"}


def test_an_empty_batch_is_not_processed() -> None:
    step = Gate("g")
    assert step.run([]) == []
    assert step.seen == []
    assert step.counters["in"] == 0 and step.counters["out"] == 0


def test_timed_adds_the_block_time_to_its_part_even_when_it_raises() -> None:
    step = Gate("g")
    with step.timed("embed"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), step.timed("embed"):
        time.sleep(0.01)
        raise RuntimeError("model died")
    assert step.seconds["embed"] >= 0.02
    assert "g" not in step.seconds


def test_outcome_reason_is_the_rejection_reason_or_none() -> None:
    coords = Coords(TOPIC, 0, 5)
    assert Outcome({"id": "x"}, rejected=False).reason is None
    assert rejection("ingest", "quality:min_chars", coords, event_id="x").reason == (
        "quality:min_chars")


def test_rejection_takes_identity_from_the_event_and_lineage_from_coords() -> None:
    coords = Coords(TOPIC, 3, 77)
    event = {"id": "ev-1", "source": "repo/a.py", "kind": "CODE", "label": "python",
             "content": "ignored"}
    out = rejection("fuzzy", "near_duplicate", coords, event=event, duplicate_of="ev-0",
                    similarity=0.91, detail="estimated Jaccard 0.910 ≥ 0.8")
    rec = out.record
    assert out.rejected
    assert (rec["id"], rec["source"], rec["kind"], rec["label"]) == (
        "ev-1", "repo/a.py", "CODE", "python")
    assert (rec["topic"], rec["partition"], rec["offset"]) == (TOPIC, 3, 77)
    assert (rec["stage"], rec["duplicate_of"], rec["similarity"]) == ("fuzzy", "ev-0", 0.91)
    assert rec["raw"] is None
    assert decode(encode("Rejection", rec), "Rejection") == rec


def test_rejection_without_an_id_is_named_by_its_coords_and_raw_bytes_are_cut() -> None:
    raw = b"\x00" * (MAX_RAW_IN_REJECTION + 1000)
    out = rejection("ingest", "invalid:too_large", Coords(TOPIC, 2, 9), raw=raw)
    rec = out.record
    assert rec["id"] == f"{TOPIC}-2-9"
    assert rec["raw"] == raw[:MAX_RAW_IN_REJECTION]
    assert (rec["source"], rec["kind"], rec["label"]) == (None, None, None)
    encode("Rejection", rec)
    # An explicit event id wins over the event's, which wins over the coords.
    assert rejection("ingest", "x", Coords(TOPIC, 0, 0), event={"id": "a"},
                     event_id="b").record["id"] == "b"
    assert rejection("ingest", "x", Coords(TOPIC, 0, 0), event={"id": "a"}).record["id"] == "a"


# -- the pipeline ----------------------------------------------------------------------------


def test_a_rejected_item_never_reaches_the_next_step() -> None:
    first, second = Gate("a", reject={"e1", "e3"}), Gate("b", reject={"e2"})
    outcomes = Pipeline([first, second]).run(items(5))
    # One outcome per input, in input order, rejections interleaved where they happened.
    assert [(o.record["id"], o.reason) for o in outcomes] == [
        ("e0", None), ("e1", "r.a"), ("e2", "r.b"), ("e3", "r.a"), ("e4", None)]
    assert [i.record["id"] for i in second.seen[0]] == ["e0", "e2", "e4"]
    assert [o.record["path"] for o in outcomes if not o.rejected] == [("a", "b"), ("a", "b")]
    # Each step counts only what it saw.
    assert first.counters == Counter({"in": 5, "out": 3, "rejected": 2, "rejected.r.a": 2})
    assert second.counters == Counter({"in": 3, "out": 2, "rejected": 1, "rejected.r.b": 1})


def test_the_next_step_gets_the_passed_record_with_the_original_coords_and_key() -> None:
    first, second = Gate("a"), Gate("b")
    inputs = items(3, partition=4, first_offset=50)
    Pipeline([first, second]).run(inputs)
    for given_, original in zip(second.seen[0], inputs, strict=True):
        assert given_.record == {"id": original.record["id"], "path": ("a",)}
        assert (given_.coords, given_.key) == (original.coords, original.key)
    # A rejection's lineage is the input's coordinates.
    outcome = Pipeline([Gate("a", reject={"e2"})]).run(inputs)[2]
    assert (outcome.record["partition"], outcome.record["offset"]) == (4, 52)


def test_steps_after_everything_was_rejected_are_not_run() -> None:
    last = Gate("c")
    outcomes = Pipeline([Gate("a", reject={"e0"}), Gate("b", reject={"e1"}), last]).run(items(2))
    assert [o.reason for o in outcomes] == ["r.a", "r.b"]
    assert last.seen == [] and last.counters["in"] == 0


def test_a_pipeline_without_steps_passes_everything_and_an_empty_batch_gives_nothing() -> None:
    inputs = items(3)
    assert [(o.record, o.rejected) for o in Pipeline([]).run(inputs)] == [
        (i.record, False) for i in inputs]
    step = Gate("a")
    assert Pipeline([step]).run([]) == []
    assert step.seen == []


def test_a_step_returning_the_wrong_number_of_outcomes_is_an_error() -> None:
    with pytest.raises(SluiceError, match="step short returned 2 outcomes for 3 items"):
        Pipeline([Gate("a"), Short()]).run(items(3))


def test_seconds_has_each_step_and_its_parts() -> None:
    first, second = Gate("a", delay=0.01), Gate("b")
    pipeline = Pipeline([first, second])
    pipeline.run(items(2))
    with second.timed("admit"):
        pass
    seconds = pipeline.seconds()
    assert set(seconds) == {"a", "b", "admit"}
    assert seconds["a"] >= 0.01


def expected_outcomes(n: int, rejects: Sequence[set[str]]) -> list[tuple[str, str | None,
                                                                           tuple[str, ...]]]:
    """(id, reason, path) per input: the first step that rejects it, or the full path."""
    out = []
    names = [f"s{j}" for j in range(len(rejects))]
    for i in range(n):
        ident = f"e{i}"
        first = next((j for j, r in enumerate(rejects) if ident in r), None)
        if first is None:
            out.append((ident, None, tuple(names)))
        else:
            out.append((ident, f"r.s{first}", ()))
    return out


def check_pipeline(n: int, rejects: Sequence[set[str]]) -> None:
    steps = [Gate(f"s{j}", reject=r) for j, r in enumerate(rejects)]
    outcomes = Pipeline(steps).run(items(n))
    got = [(o.record["id"], o.reason, () if o.rejected else o.record["path"])
           for o in outcomes]
    assert got == expected_outcomes(n, rejects)
    # Step j saw exactly the items no earlier step rejected, in input order.
    alive = [f"e{i}" for i in range(n)]
    for step, r in zip(steps, rejects, strict=True):
        seen = [i.record["id"] for batch in step.seen for i in batch]
        assert seen == alive
        alive = [i for i in alive if i not in r]


def test_outcomes_follow_every_accept_reject_pattern_of_small_batches() -> None:
    for n in range(5):
        ids = [f"e{i}" for i in range(n)]
        # Each item either passes both steps, or is rejected by step 0 or by step 1.
        for pattern in itertools.product((None, 0, 1), repeat=n):
            rejects: list[set[str]] = [set(), set()]
            for ident, where in zip(ids, pattern, strict=True):
                if where is not None:
                    rejects[where].add(ident)
            check_pipeline(n, rejects)


if given is not None:

    @settings(max_examples=150, deadline=None, database=None)
    @given(n=st.integers(0, 30), data=st.data())
    def test_pipeline_outcome_count_and_order_for_any_pattern(n: int, data: Any) -> None:
        ids = [f"e{i}" for i in range(n)]
        steps = data.draw(st.integers(0, 4), label="steps")
        rejects = [data.draw(st.sets(st.sampled_from(ids)) if ids else st.just(set()),
                             label=f"rejects s{j}") for j in range(steps)]
        check_pipeline(n, rejects)

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[dev]')")
    def test_pipeline_outcome_count_and_order_for_any_pattern() -> None:
        pass


# -- build_pipeline --------------------------------------------------------------------------


def unreachable() -> redis.Redis:
    """A client whose every connection attempt fails: building must not use it."""
    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)


def test_an_unknown_stage_is_refused_before_redis_is_used() -> None:
    config = load_settings()
    with pytest.raises(SluiceError, match=r"unknown stage.*balanc.*choose from ingest, dedup"):
        build_pipeline(config, unreachable(), stages=["ingest", "balanc"])
    assert STAGES == ("ingest", "dedup")


def test_ingest_without_fuzzy_and_dedup_disabled_build_without_any_service() -> None:
    config = load_settings(fuzzy={"enabled": False}, dedup={"enabled": False})
    ingest = build_pipeline(config, unreachable(), stages=["ingest"])
    assert [type(s) for s in ingest.steps] == [Validate, ExactDedup]
    assert [s.name for s in ingest.steps] == ["validate", "exact"]
    assert ingest.steps[0].settings == config.ingest  # type: ignore[attr-defined]
    # dedup.enabled = false: no model is loaded, candidates pass as samples.
    dedup = build_pipeline(config, unreachable(), stages=["dedup"])
    assert [type(s) for s in dedup.steps] == [PassSemantic]
    both = build_pipeline(config, unreachable())
    assert [s.name for s in both.steps] == ["validate", "exact", "semantic"]


def test_the_ingest_stage_publishes_what_each_fuzzy_horizon_aged_out() -> None:
    from agents.filter_agents import publish_aged_out
    from agents.pipeline import Pipeline
    from streams.metrics import StageMetrics

    class Aging(Step):
        name = "fuzzy"

        def process(self, items: Sequence[Item]) -> list[Outcome]:
            return [Outcome(i.record, rejected=False) for i in items]

    step = Aging()
    step.counters["fuzzy.aged_out"] = 7
    step.counters["in"] = 3  # the step's own flow counters stay with the stage's
    metrics = StageMetrics("ingest")
    publish_aged_out(metrics, Pipeline([step]))
    assert metrics.counters["fuzzy.aged_out"] == 7 and metrics.counters["in"] == 0
