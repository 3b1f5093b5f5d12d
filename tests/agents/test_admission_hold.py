"""The semantic index never runs its HNSW work inside a script (issue 12): its atomic
calls are the short registration and trim scripts, what one call may do is bounded by the
settings, and the dedup agent publishes the longest recent one as the gauge
``admit.hold_s.max`` (Prometheus ``sluice_admit_hold_s_max``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest

from agents.config import DedupSettings
from sluice.settings import Settings
from streams.metrics import ADMIT_HOLD_MAX_S
from tests.agents.pipeline_util import (
    OutcomeReader,
    corpus,
    isolated,
    missing,
    produce,
    raw_event,
    wait_for_group,
    workers,
)

WAIT_S = 240.0


def latest_snapshot(reader: OutcomeReader, component: str) -> dict[str, Any]:
    """The newest MetricSnapshot of ``component`` read so far (empty numbers: none yet)."""
    reader.poll()
    snaps = [s.record for s in reader.seen if s.role == "metrics"
             and s.record["component"] == component]
    return snaps[-1] if snaps else {"counters": {}, "gauges": {}}


@pytest.mark.parametrize(("field", "too_big"), [
    ("batch_size", 129), ("build_ef", 501), ("links", 65)])
def test_what_one_admission_call_may_do_is_bounded(field: str, too_big: int) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        DedupSettings(**{field: too_big})
    assert field in str(caught.value)
    DedupSettings(**{field: too_big - 1})
    assert "at most" in (DedupSettings.model_fields[field].description or "")


@pytest.mark.integration
def test_the_dedup_worker_publishes_the_longest_admission_hold(
        stack: Settings, tmp_path: Path) -> None:
    settings = isolated(stack, metrics={"interval_s": 1.0})
    events = [raw_event(f"h-{s.name}", s.text) for s in corpus(4, start=44)]
    ids = [e["id"] for e in events]
    with workers(settings, "ingest,dedup", tmp_path) as [worker], \
            OutcomeReader(settings, ("samples", "rejected", "metrics")) as reader:
        wait_for_group(settings, 1, [worker])
        produce(settings, events)
        got = reader.wait_for(ids, WAIT_S, ("samples", "rejected"), lambda: worker.alive)
        assert not missing(ids, got), worker.log_tail()
        assert reader.wait_until(lambda r: ADMIT_HOLD_MAX_S in latest_snapshot(
            r, "dedup")["gauges"], 30.0), worker.log_tail()
        hold_s = latest_snapshot(reader, "dedup")["gauges"][ADMIT_HOLD_MAX_S]
    # A round trip of the registration script (4 items): milliseconds, even on a busy
    # shared machine; the old whole-batch script took 30-120 ms.
    assert 0 < hold_s < 0.5
    print(f"\n[hold] dedup publishes {ADMIT_HOLD_MAX_S} = {hold_s * 1000:.1f} ms")
