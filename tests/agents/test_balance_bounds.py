"""The balance step's bounds, without services: no batch exceeds the broker's message
limit (issue 10, finding 2) and producer-chosen labels cannot grow the class set, the
Redis keys, the metric labels or the EMA state (finding 8)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from agents.balance import Balance
from agents.batch_bytes import kafka_reserve
from agents.config import BalanceSettings
from agents.policy import PolicyError
from schemas.records import CuratedBatch
from streams.metrics import class_in, relabeled, truncated
from streams.serde import encode
from tests.agents.sink_util import (
    MemoryBuffers,
    MemoryLosses,
    balance,
    batches_of,
    labels,
    sample,
    stream,
)

MiB = 1024 * 1024
WORDS = " ".join(f"word{n}" for n in range(40_000))  # ≈ 330 KB of text


def wire_bytes(batch: CuratedBatch, limit: int) -> int:
    """What the batch takes of the broker's limit: the value and the reserve for the key
    and the framing that ``kafka_reserve`` allows."""
    return len(encode("CuratedBatch", batch)) + kafka_reserve(limit, len(batch["batch_id"]))


def test_32_long_texts_make_a_batch_within_the_default_message_limit() -> None:
    """Finding 2: 32 texts of 330 KB made a 12.4 MB batch against an 8 MiB limit. Each
    content is cut to its share of the limit, counted by kind; the ids are all there."""
    step, _ = balance(batch_size=32)
    big = [sample(i, "docs", f"{WORDS} {i}") for i in range(32)]
    [batch] = batches_of(step, big)
    size = wire_bytes(batch, 8 * MiB)
    print(f"\n[balance bounds] 32 x 330 KB texts: batch of {size:,} bytes (limit {8 * MiB:,})")
    assert size <= 8 * MiB
    assert len(batch["samples"]) == 32
    assert step.counters[truncated("TEXT")] == 32
    for s in batch["samples"]:
        assert WORDS.startswith(s["content"][:1000]) and len(s["content"]) > 200_000


def test_a_small_limit_cuts_only_the_long_contents_and_every_batch_fits() -> None:
    limit = 64 * 1024
    step, _ = balance(batch_size=8, message_limit=limit)
    samples = [sample(i, "docs", f"{WORDS[: 30_000 if i % 3 == 0 else 500]} {i}")
               for i in range(48)]
    original = {s["id"]: s["content"] for s in samples}
    batches = batches_of(step, samples)
    assert len(batches) == 6
    for batch in batches:
        assert wire_bytes(batch, limit) <= limit
        for s in batch["samples"]:
            if int(s["id"][1:]) % 3:  # the short ones are whole
                assert s["content"] == original[s["id"]]
            else:  # the long ones are cut, never to nothing
                assert original[s["id"]].startswith(s["content"]) and len(s["content"]) > 4000
    assert step.counters[truncated("TEXT")] == 16


def test_settings_the_limit_cannot_hold_fail_at_construction() -> None:
    with pytest.raises(PolicyError, match="max_message_bytes"):
        balance(batch_size=64, message_limit=64 * 1024)
    with pytest.raises(PolicyError, match="overflow_label"):
        balance(overflow_label="not a label")


def test_labels_beyond_max_labels_go_to_the_overflow_class_counted() -> None:
    step, buffers = balance(batch_size=8, max_labels=2)
    names = ["python", "docs", "go", "rust"]
    samples = [sample(i, names[i % 4]) for i in range(16)]
    batches = batches_of(step, samples)
    seen = Counter(label for b in batches for label in labels(b).elements())
    assert set(seen) == {"python", "docs", "other"}
    assert seen["other"] == 8
    assert step.counters[relabeled("overflow")] == 8
    assert step.counters[class_in("other")] == 8 and class_in("go") not in step.counters
    assert buffers.labels == {"python", "docs"}
    assert set(step.state["ema"]["ema"]) | set(step.state["ema"]["current"]) <= {
        "python", "docs", "other"}


@pytest.mark.parametrize(("label", "reason"), [
    ("", "label_empty"), ("x" * 65, "label_too_long"), ("two words", "label_characters"),
    ("a}{b", "label_characters"), ("line\nbreak", "label_characters"),
])
def test_a_label_that_is_not_a_class_name_goes_to_the_overflow_class(label: str,
                                                                     reason: str) -> None:
    step, buffers = balance()
    samples = [*stream(3), dict(sample(3, "docs"), label=label)]
    [batch] = batches_of(step, samples)  # type: ignore[arg-type]
    assert labels(batch)["other"] == 1
    assert step.counters[relabeled(reason)] == 1
    assert label not in buffers.labels and label not in buffers.queues


def test_a_spray_of_labels_keeps_the_state_and_the_class_set_bounded() -> None:
    """1,000 distinct labels with max_labels = 16: 17 classes at most anywhere (the table's
    EMA state, the buffers, the per-class counters), whatever the stream sends."""
    settings = BalanceSettings(batch_size=32, replay_fraction=0.0, max_labels=16, pace="arrivals")
    shared: set[str] = set()
    steps = [Balance(settings, MemoryBuffers(p, settings.reuse_cap, shared),
                     MemoryLosses()) for p in (0, 1)]
    for p, step in enumerate(steps):
        batches_of(step, [sample(i, f"lang{i}") for i in range(p * 500, (p + 1) * 500)])
    for step in steps:
        ema = step.state["ema"]
        assert len(set(ema["ema"]) | set(ema["current"])) <= 17
        assert len(step.buffers.queues) <= 17  # type: ignore[attr-defined]
        assert sum(1 for name in step.counters if class_in.key(name)) <= 17
        assert len(json.dumps(step.state)) < 4096
    assert len(shared) == 16  # one set for the namespace, shared by its partitions
