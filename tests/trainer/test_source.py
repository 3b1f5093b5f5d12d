"""The Kafka batch source on its own: a resumable IterableDataset over a real broker."""

from __future__ import annotations

import itertools

import pytest
from kafka import KafkaProducer
from torch.utils.data import DataLoader

from sluice.settings import Settings
from streams.connections import kafka_client_options
from tests.streams.kafka_io import create_topic
from tests.trainer.trainer_data import (
    batch_samples,
    make_batches,
    produce,
    stdlib_functions,
    with_topics,
)
from trainer.source import KafkaBatchSource, SourcedBatch, rank_partitions

pytestmark = pytest.mark.integration


def _ids(items: list[SourcedBatch]) -> list[str]:
    return [i.batch["batch_id"] for i in items]


def _by_partition(items: list[SourcedBatch]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i in items:
        out.setdefault(i.partition, []).append(i.offset)
    return out


@pytest.fixture(scope="module")
def loaded_topic(stack: Settings) -> tuple[Settings, list[str]]:
    """3 partitions, 10 batches each, and one undecodable record on partition 1."""
    topic = create_topic(stack, "trainer-source", partitions=3)
    settings = with_topics(stack, batches=topic)
    samples = batch_samples(list(stdlib_functions(scale=0.05)), content_chars=200)
    batches = make_batches(samples, 30, 4, partitions=3)
    produce(settings, topic, batches[:15])
    producer = KafkaProducer(**kafka_client_options(settings.kafka))
    producer.send(topic, key=b"junk", value=b"\x00not avro", partition=1)
    producer.flush()
    producer.close()
    produce(settings, topic, batches[15:])
    return settings, [b["batch_id"] for b in batches]


def test_it_reads_every_batch_in_offset_order_and_skips_what_does_not_decode(
    loaded_topic: tuple[Settings, list[str]],
) -> None:
    settings, produced = loaded_topic
    source = KafkaBatchSource(settings, idle_timeout_s=1.5)
    items = list(DataLoader(source, batch_size=None))

    assert sorted(_ids(items)) == sorted(produced)
    for offsets in _by_partition(items).values():
        assert offsets == sorted(offsets)
    assert source.counters.dropped == {"undecodable": 1}
    state = source.state_dict()
    # (the state also remembers the batch ids it yielded, to skip re-sent copies)
    assert {k: state[k] for k in ("topic", "offsets")} == {"topic": settings.topics.batches,
                                                          "offsets": {0: 10, 1: 11, 2: 10}}
    assert sorted(b for b, _, _ in state["recent"]) == sorted(produced)


def test_state_dict_resumes_at_the_next_batch_without_gap_or_repeat(
    loaded_topic: tuple[Settings, list[str]],
) -> None:
    settings, produced = loaded_topic
    first = KafkaBatchSource(settings, idle_timeout_s=1.5)
    iterator = iter(first)
    head = list(itertools.islice(iterator, 13))
    state = first.state_dict()
    first.stop()
    list(iterator)  # drain: the generator closes its consumer

    second = KafkaBatchSource(settings, idle_timeout_s=1.5)
    second.load_state_dict(state)
    tail = list(second)

    assert len(head) + len(tail) == len(produced)
    assert sorted(_ids(head) + _ids(tail)) == sorted(produced)
    for p, offsets in _by_partition(tail).items():
        assert offsets[0] == state["offsets"][p]


def test_ranks_split_the_partitions_and_committed_offsets_are_a_fallback(
    loaded_topic: tuple[Settings, list[str]],
) -> None:
    settings, _ = loaded_topic
    assert rank_partitions([0, 1, 2], 0, 2) == [0, 2]
    assert rank_partitions([0, 1, 2], 1, 2) == [1]
    rank1 = KafkaBatchSource(settings, rank=1, world_size=2,
                             group_id="trainer-source-test", idle_timeout_s=1.0)
    items = list(rank1)
    assert {i.partition for i in items} == {1} and len(items) == 10
    rank1.commit({1: 4})
    list(rank1)  # a commit happens on the iterating thread, at its next poll

    again = KafkaBatchSource(settings, rank=1, world_size=2, group_id="trainer-source-test",
                             idle_timeout_s=1.0)
    assert [i.offset for i in again][:1] == [4]


def test_a_batch_sent_again_is_trained_once(stack: Settings) -> None:
    """The balance stage re-sends a batch it drew when it crashed before confirming the
    send (idempotent by batch id): the source yields each batch id once, counts the copy,
    and a resumed source that remembers it skips a copy that comes after its offsets too,
    but never a batch it had fetched beyond them (that one was not trained)."""
    topic = create_topic(stack, "trainer-resent", partitions=1)
    settings = with_topics(stack, batches=topic)
    samples = batch_samples(list(stdlib_functions(scale=0.05)), content_chars=200)
    batches = make_batches(samples, 6, 4, partitions=1)
    produce(settings, topic, [batches[0], batches[1], batches[1], batches[2]])
    source = KafkaBatchSource(settings, idle_timeout_s=1.5, group_id="resent-whole")
    items = list(source)
    assert _ids(items) == [b["batch_id"] for b in batches[:3]]
    assert source.counters.dropped.get("resent") == 1

    # Resumed after batch 0 with the memory of it: batch 0 again is a copy, batch 1 is
    # new (its fetch was beyond the checkpointed offsets, so it was not trained).
    first = KafkaBatchSource(settings, idle_timeout_s=1.5, group_id="resent-first")
    iterator = iter(first)
    next(iterator)
    state = first.state_dict()
    state["recent"] = [*state["recent"], [batches[1]["batch_id"], 0, 1]]  # fetched, untrained
    first.stop()
    iterator.close()
    produce(settings, topic, [batches[0], batches[3]])
    resumed = KafkaBatchSource(settings, idle_timeout_s=1.5, group_id="resent-resumed")
    resumed.load_state_dict(state)
    again = _ids(list(resumed))
    assert again == [b["batch_id"] for b in (batches[1], batches[2], batches[3])]
    assert resumed.counters.dropped.get("resent") == 2  # the copy of 1 at offset 2, and 0
