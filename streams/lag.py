"""How far a consumer group is behind a topic, asked of the broker's admin API.

``group_lag`` is what monitoring shows (the workers' lag per topic); ``unconsumed`` is what
the balance stage paces by: the messages of one topic that its reader (the trainer's
group) has not committed yet, counting from the oldest retained message on partitions the
group has no offset for (a trainer that has not started or committed yet will read them).
"""

from __future__ import annotations

from kafka import TopicPartition
from kafka.admin import KafkaAdminClient, OffsetSpec
from kafka.errors import KafkaError


def group_lag(admin: KafkaAdminClient, group: str, topics: set[str],
              timeout_ms: int = 3000) -> dict[str, int]:
    """Messages behind per topic for consumer group ``group`` (committed vs end offsets),
    over the partitions of ``topics`` it has committed offsets for.

    The end offsets come from the admin client, which routes each partition to its leader
    from fresh metadata. ``KafkaConsumer.end_offsets`` is not used: a consumer knows the
    leaders of its assigned topics only, and kafka-python 3.0.12 silently leaves out the
    partitions of a topic it has not seen yet, then raises ``KeyError`` on them.
    """
    committed = admin.list_group_offsets(group).get(group, {})
    tps = [tp for tp, meta in committed.items()
           if tp.topic in topics and meta is not None and meta.offset >= 0]
    if not tps:
        return {}
    ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps},
                                        timeout_ms=timeout_ms)
    lag: dict[str, int] = {}
    for tp in tps:
        end = ends.get(tp)
        if end is None:  # never expected; a lag we cannot compute is not reported as zero
            raise KafkaError(f"no end offset for {tp.topic}[{tp.partition}]")
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end.offset - committed[tp].offset)
    return lag


def unconsumed(admin: KafkaAdminClient, group: str, topic: str, partitions: int,
               timeout_ms: int = 3000) -> int:
    """Messages of ``topic`` (partitions ``0 … partitions-1``) not yet committed by
    ``group``: end offset less the group's committed offset, or less the log start where it
    has none. ``KafkaError`` when the broker cannot say."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    committed = admin.list_group_offsets(group).get(group, {})
    ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps},
                                        timeout_ms=timeout_ms)
    starts = admin.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in tps},
                                          timeout_ms=timeout_ms)
    total = 0
    for tp in tps:
        end, start = ends.get(tp), starts.get(tp)
        if end is None or start is None:
            raise KafkaError(f"no offsets for {tp.topic}[{tp.partition}]")
        meta = committed.get(tp)
        position = meta.offset if meta is not None and meta.offset >= 0 else start.offset
        total += max(0, end.offset - max(position, start.offset))
    return total
