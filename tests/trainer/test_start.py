"""Where a trainer starts: a new one trains the batches already waiting, a second run goes
on after the first, and a start is recorded before anything is read (the SIGKILL before a
first checkpoint is in ``test_crash``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sluice.settings import Settings
from streams.serde import decode
from tests.streams.kafka_io import consume_all, create_topic
from tests.trainer.trainer_data import (
    batch_samples,
    make_batches,
    produce,
    stdlib_functions,
    with_topics,
)
from trainer.checkpoint import StartRecord
from trainer.loop import train
from trainer.source import KafkaBatchSource

pytestmark = pytest.mark.integration


def _run(settings: Settings, ckpt: Path, max_steps: int) -> tuple[Any, list[tuple[int, str]]]:
    """One in-process run with its own feedback topic: its result and (step, batch id)s."""
    feedback = create_topic(settings, "start-feedback", 1)
    run = settings.model_copy(update={
        "topics": settings.topics.model_copy(update={"feedback": feedback}),
        "trainer": settings.trainer.model_copy(update={
            "max_steps": max_steps, "checkpoint_dir": ckpt, "holdout_fraction": 0.0,
            "idle_timeout_s": 5.0, "checkpoint_every": 100, "eval_every": 1000,
            "device": "cpu"}),
    })
    result = train(run)
    records = consume_all(settings, feedback, result.step - result.start_step, timeout_s=20)
    trained = sorted((f["step"], f["batch_id"]) for f in (decode(r.value, "Feedback")
                                                           for r in records))
    return result, trained


def test_a_new_trainer_trains_the_waiting_batches_and_the_next_run_goes_on(
    stack: Settings, tmp_path: Path
) -> None:
    settings = with_topics(stack, batches=create_topic(stack, "start-batches", 1),
                           metrics=create_topic(stack, "start-metrics", 1))
    settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(
        update={"trainer_port": 0, "interval_s": 60.0})})
    samples = batch_samples(list(stdlib_functions(scale=0.05)), content_chars=100)
    made = make_batches(samples, 8, 4, partitions=1, seed=6)
    produce(settings, settings.topics.batches, made)  # all waiting before any trainer
    ids = [b["batch_id"] for b in made]
    ckpt = tmp_path / "checkpoints"

    first, trained = _run(settings, ckpt, max_steps=4)
    assert (first.step, first.stopped) == (4, "max_steps")
    assert trained == list(enumerate(ids[:4], start=1))

    second, trained = _run(settings, ckpt, max_steps=8)
    assert (second.start_step, second.step, second.stopped) == (4, 8, "max_steps")
    assert trained == list(enumerate(ids[4:], start=5))


def test_a_recorded_start_is_where_a_run_without_checkpoint_begins_again(
    stack: Settings, tmp_path: Path
) -> None:
    """``latest`` resolved once, recorded, then new batches: a restart (no checkpoint) reads
    exactly those, where resolving ``latest`` again would skip them."""
    settings = with_topics(stack, batches=create_topic(stack, "start-latest", 2))
    samples = batch_samples(list(stdlib_functions(scale=0.05)), content_chars=100)
    made = make_batches(samples, 8, 4, partitions=2, seed=7)
    produce(settings, settings.topics.batches, made[:4])  # before the trainer: not for it
    record = StartRecord(tmp_path)

    first = KafkaBatchSource(settings, start="latest", start_record=record, idle_timeout_s=1.0)
    assert list(first) == []  # started at the end; "crashes" without a checkpoint
    assert record.load(settings.topics.batches) == {0: 2, 1: 2}
    produce(settings, settings.topics.batches, made[4:])

    again = KafkaBatchSource(settings, start="latest", start_record=record, idle_timeout_s=1.0)
    assert sorted(i.batch["batch_id"] for i in again) == sorted(b["batch_id"] for b in made[4:])
    unrecorded = KafkaBatchSource(settings, start="latest", idle_timeout_s=1.0)
    assert list(unrecorded) == []  # what a restart would have read without the record


def test_start_records_of_every_rank_are_merged_and_other_topics_ignored(
    tmp_path: Path,
) -> None:
    rank0, rank1 = StartRecord(tmp_path, 0), StartRecord(tmp_path, 1)
    assert rank0.load("t") == {}
    rank0.add("t", {0: 5, 2: 7})
    rank1.add("t", {1: 3})
    rank0.add("t", {4: 1})  # a partition assigned later joins the file
    rank1.add("other", {9: 9})  # another topic replaces rank 1's record
    assert rank0.load("t") == {0: 5, 2: 7, 4: 1}
    assert StartRecord(tmp_path, 3).load("other") == {9: 9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start-rank0.json",
                                                          "start-rank1.json"]
