"""A micro-batch without CODE records reaches the code layer empty: it must pass, not fail
every record with ``error:FuzzyError`` (Redis refuses an ``HMGET`` of no fields)."""

from __future__ import annotations

import pytest
import redis

from agents.pipeline import build_pipeline
from agents.step import Coords, Item
from sluice.settings import Settings
from streams.serde import encode
from tests.agents.pipeline_util import raw_event, unique_id

TEXTS = [
    "The river Thames flows through southern England, passing Oxford, Reading and Windsor "
    "before it reaches London and widens into an estuary that opens onto the North Sea.",
    "The mitochondrion is the organelle in which most of the cell's chemical energy is "
    "produced; it converts nutrients into adenosine triphosphate through cellular respiration.",
]


@pytest.mark.integration
def test_a_text_only_micro_batch_passes_the_code_layer(stack: Settings,
                                                      client: redis.Redis) -> None:
    pipeline = build_pipeline(stack, client, stages=["ingest"], namespace=unique_id())
    assert pipeline.steps[-1].name == "fuzzy_code"
    items = [Item(encode("RawEvent", raw_event(f"t{n}", text, kind="TEXT")), Coords("raw", 0, n))
             for n, text in enumerate(TEXTS)]
    assert [o.reason for o in pipeline.run(items)] == [None, None]
