"""Records the trainer cannot train on, between good batches on a real topic: each is
skipped, counted by reason and logged with topic, partition and offset; every good batch
is trained once, and the trainer never crashes on them (a crash would repeat at every
restart, since the bad record comes again after the last checkpoint)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from kafka import KafkaProducer

from schemas.records import CuratedBatch, Feedback
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.serde import decode, encode
from tests.streams.kafka_io import consume_all, create_topic
from tests.trainer.trainer_data import batch_samples, make_batches, stdlib_functions
from trainer.loop import train

pytestmark = pytest.mark.integration


def _variant(good: CuratedBatch, name: str, **samples_update: Any) -> CuratedBatch:
    """A copy of ``good`` under another id, its samples changed by ``samples_update``."""
    bad = dict(good)
    bad["batch_id"] = f"{good['batch_id']}-{name}"
    bad["samples"] = [{**s, **samples_update} for s in good["samples"]] if samples_update else []
    return cast(CuratedBatch, bad)


def _poison(good: CuratedBatch) -> list[tuple[str, bytes | None]]:
    """Every kind of bad record, each with the counter the trainer should count it in."""
    nan = np.full(384, np.nan, dtype="<f2").tobytes()
    whole = encode("CuratedBatch", good)
    feedback = Feedback(batch_id="x", step=1, model="m", created_at=0, losses=[])
    return [
        ("dropped.tombstone", None),  # a null value
        ("dropped.unknown_schema", encode("Feedback", feedback)),  # another record type
        ("dropped.undecodable", whole[: len(whole) // 2]),  # truncated
        ("dropped.undecodable", os.urandom(300)),  # not Avro at all
        ("skipped.unusable", encode("CuratedBatch", _variant(  # the model takes 384 dims
            good, "dim16", embedding=bytes(32), embedding_dim=16))),
        ("skipped.unusable", encode("CuratedBatch", _variant(  # NaN: the loss would be NaN
            good, "nan", embedding=nan))),
        ("skipped.empty", encode("CuratedBatch", _variant(good, "empty"))),  # no samples
    ]


def test_bad_records_between_good_batches_are_skipped_and_counted(
    stack: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topics = stack.topics.model_copy(update={
        "batches": create_topic(stack, "poison-batches", 2),
        "feedback": create_topic(stack, "poison-feedback", 1),
        "metrics": create_topic(stack, "poison-metrics", 1),
    })
    settings = stack.model_copy(update={
        "topics": topics,
        "trainer": stack.trainer.model_copy(update={
            "max_steps": 12, "checkpoint_dir": tmp_path, "holdout_fraction": 0.0,
            "idle_timeout_s": 5.0, "checkpoint_every": 100, "eval_every": 1000,
            "device": "cpu"}),
        "metrics": stack.metrics.model_copy(update={"trainer_port": 0, "interval_s": 60.0}),
    })
    samples = batch_samples(list(stdlib_functions(scale=0.05)), content_chars=100)
    good = make_batches(samples, 12, 4, partitions=2, seed=5)
    poison = _poison(good[0])
    # Per partition: good, bad, good, bad, ... so every bad record has good ones after it.
    producer = KafkaProducer(**kafka_client_options(settings.kafka),
                             max_in_flight_requests_per_connection=1)
    try:
        for i, batch in enumerate(good):
            producer.send(topics.batches, key=batch["batch_id"].encode(),
                          value=encode("CuratedBatch", batch), partition=batch["partition"])
            if i < len(poison):
                producer.send(topics.batches, key=f"poison-{i}".encode(), value=poison[i][1],
                              partition=batch["partition"])
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)

    with caplog.at_level(logging.WARNING, logger="sluice.trainer"):
        result = train(settings)

    assert (result.step, result.stopped) == (12, "max_steps")
    trained = [decode(r.value, "Feedback")["batch_id"]
               for r in consume_all(settings, topics.feedback, 12, timeout_s=20)]
    assert sorted(trained) == sorted(b["batch_id"] for b in good)  # each good batch, once

    snapshot = decode(consume_all(settings, topics.metrics, 1)[-1].value, "MetricSnapshot")
    counters = snapshot["counters"]
    expected = Counter(reason for reason, _ in poison)
    assert {name: counters.get(name) for name in expected} == dict(expected), counters
    assert counters["records"] == len(good) + len(poison)
    # Each skip names where the record is.
    for partition in (0, 1):
        assert f"{topics.batches}[{partition}]@1" in caplog.text
