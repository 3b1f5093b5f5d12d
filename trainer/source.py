"""The Kafka batch source: ``curated-batches`` as a resumable PyTorch ``IterableDataset``.

It stands on its own: iterate it with a plain ``DataLoader`` (``batch_size=None``), with
torchdata's ``StatefulDataLoader``, or with the trainer's prefetcher. Partitions are assigned
manually (rank ``r`` of ``w`` reads partitions ``r, r + w, ...``), never by the group
coordinator, so a checkpoint's offsets are exactly what the process read and a rebalance can
never move a partition under a running step. ``state_dict()`` is the next offset of every
assigned partition after the last batch yielded; ``load_state_dict()`` before iterating seeks
there, so the batch after the last one trained is the first one read. A partition with no
loaded offset starts where ``StartRecord`` says this run began, else at the group's
committed offset, else at the earliest (or latest) batch — a start it then records.

A record that is not a ``CuratedBatch`` (a null value, another record type, truncated or
random bytes) is skipped, counted by reason and logged with its topic, partition and
offset: raising would stop the trainer at the same offset after every restart.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from torch.utils.data import IterableDataset, get_worker_info

from schemas.records import CuratedBatch
from streams.connections import kafka_client_options
from streams.serde import DecodeError, decode
from trainer.checkpoint import StartRecord
from trainer.config import TrainerConfig
from trainer.errors import TrainerError

log = logging.getLogger("sluice.trainer.source")

#: Upper bound on one fetch: the broker's ``message.max.bytes`` for batches is 8 MiB.
_FETCH_BYTES = 16 * 1024 * 1024
# Batch ids remembered to skip re-sent copies: the balance stage re-sends right after a
# restart, so the last thousand batches of a rank are far more than a re-send reaches back.
RECENT_BATCHES = 1024


@dataclass(frozen=True, slots=True)
class SourcedBatch:
    """One decoded ``CuratedBatch`` and where it came from."""

    topic: str
    partition: int
    offset: int
    batch: CuratedBatch
    lag: int
    """Batches on this source's partitions not yet read when this one was yielded."""


@dataclass
class SourceCounters:
    """Totals since the source was built (read by the trainer's metrics)."""

    records: int = 0
    batches: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        """Count one record skipped for ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def rank_partitions(partitions: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` reads: every ``world_size``-th one."""
    if not 0 <= rank < world_size:
        raise TrainerError(f"rank {rank} is outside a world of {world_size}")
    mine = sorted(partitions)[rank::world_size]
    if not mine:
        raise TrainerError(
            f"rank {rank} has no partition: {len(partitions)} partitions for "
            f"{world_size} ranks (add partitions or run fewer ranks)"
        )
    return mine


class KafkaBatchSource(IterableDataset[SourcedBatch]):
    """Decoded ``CuratedBatch`` records from Kafka, in offset order per partition.

    A partition starts at its loaded offset (``load_state_dict``), else at the start
    ``start_record`` holds for it, else at the group's committed offset, else per ``start``:
    ``"earliest"`` (the oldest batch retained) or ``"latest"`` (batches written from now
    on). A start resolved by none of the first two is written to ``start_record`` before
    anything is read, so a restart before the first checkpoint begins at the same place.
    ``idle_timeout_s`` ends the iteration after that long without a record (``None``: run
    until ``stop()``). A record that does not decode is logged with its topic, partition
    and offset, counted in ``counters.dropped[reason]`` (``tombstone``, ``unknown_schema``,
    ``undecodable``, ``invalid_utf8``), and skipped.
    """

    def __init__(
        self,
        settings: TrainerConfig,
        *,
        topic: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        partitions: Sequence[int] | None = None,
        start: Literal["earliest", "latest"] = "earliest",
        start_record: StartRecord | None = None,
        group_id: str | None = None,
        idle_timeout_s: float | None = None,
        poll_timeout_s: float = 0.2,
        max_poll_records: int = 64,
        commit_every_s: float | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.topic = topic or settings.topics.batches
        self.rank, self.world_size = rank, world_size
        self.partitions = list(partitions) if partitions is not None else None
        self.start = start
        self.start_record = start_record
        self.group_id = group_id or settings.trainer.group_id
        self.idle_timeout_s = idle_timeout_s
        self.poll_timeout_s = poll_timeout_s
        self.max_poll_records = max_poll_records
        self.commit_every_s = commit_every_s
        self.counters = SourceCounters()
        self._positions: dict[int, int] = {}
        # batch id -> (partition, offset) of the last RECENT_BATCHES batches yielded: the
        # balance stage re-sends a batch it could not confirm (same id), and a copy must
        # not be trained twice.
        self._recent: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._resume: dict[int, int] = {}
        self._highwater: dict[int, int] = {}
        self._pending_commit: dict[int, int] | None = None
        self._commit_due = True  # the pending commit goes at the next poll
        self._next_commit = 0.0  # monotonic time a rate-limited commit is due
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- resume state (the StatefulDataLoader protocol) ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"topic", "offsets": {partition: next offset}, "recent": [[batch id,
        partition, offset], …]}`` after the last batch yielded."""
        with self._lock:
            offsets = dict(self._positions) if self._positions else dict(self._resume)
            recent = [[b, p, o] for b, (p, o) in self._recent.items()]
        return {"topic": self.topic, "offsets": offsets, "recent": recent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()`` output; offsets of another topic are ignored."""
        if state.get("topic", self.topic) != self.topic:
            log.warning("offsets are for topic %s, not %s: ignored", state["topic"], self.topic)
            return
        with self._lock:
            self._resume = {int(p): int(o) for p, o in state.get("offsets", {}).items()}
            # Only what lies before the resumed offsets was trained: a batch fetched past
            # them (by the prefetch thread) comes again and must not count as a copy.
            self._recent = OrderedDict(
                (str(b), (int(p), int(o))) for b, p, o in state.get("recent", [])
                if int(o) < self._resume.get(int(p), 0))
            self._positions = {}

    def commit(self, offsets: dict[int, int], *, rate_limited: bool = False) -> None:
        """Commit ``offsets`` to the consumer group at the next poll (checkpointed offsets).

        Advisory only — the checkpoint is the source of truth — but it lets Kafka's own
        lag tools see the trainer, a trainer without checkpoints resume near them, and the
        balance stage pace itself (``balance.pace = trainer``). ``rate_limited`` (the
        position after each step): at most every ``commit_every_s``, and at once when a
        poll finds nothing — a trainer waiting for data must show all it trained, or a
        balance stage that waits for it to catch up never sends the next batch.
        """
        with self._lock:
            self._pending_commit = dict(offsets)
            self._commit_due = not rate_limited

    def stop(self) -> None:
        """End the iteration at the next poll (thread-safe)."""
        self._stop.set()

    def lag(self) -> int:
        """Batches on the assigned partitions written but not yet read (last fetch)."""
        with self._lock:
            return sum(
                max(0, hw - self._positions.get(p, hw)) for p, hw in self._highwater.items()
            )

    def _seen_before(self, batch: CuratedBatch, message: Any) -> bool:
        """True for a copy of a batch already yielded (counted ``dropped.resent``);
        otherwise remember this one."""
        batch_id = batch["batch_id"]
        with self._lock:
            if batch_id in self._recent:
                first = self._recent[batch_id]
                self.counters.dropped["resent"] = self.counters.dropped.get("resent", 0) + 1
                log.info("batch %s at %s[%d]@%d was sent again (first at partition %d offset "
                         "%d): skipped", batch_id, message.topic, message.partition,
                         message.offset, *first)
                return True
            self._recent[batch_id] = (message.partition, message.offset)
            while len(self._recent) > RECENT_BATCHES:
                self._recent.popitem(last=False)
        return False

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[SourcedBatch]:
        self._stop.clear()
        consumer = self._consumer()
        try:
            assigned = self._assign(consumer)
            idle_since = time.monotonic()
            while not self._stop.is_set():
                self._maybe_commit(consumer)
                polled = consumer.poll(
                    timeout_ms=int(self.poll_timeout_s * 1000), max_records=self.max_poll_records
                )
                self._note_highwater(consumer, assigned)
                if not polled:
                    self._maybe_commit(consumer, idle=True)
                    if (
                        self.idle_timeout_s is not None
                        and time.monotonic() - idle_since > self.idle_timeout_s
                    ):
                        return
                    continue
                idle_since = time.monotonic()
                for message in _round_robin(polled):
                    batch = self._decode(message)
                    with self._lock:
                        self._positions[message.partition] = message.offset + 1
                    if batch is not None and self._seen_before(batch, message):
                        continue
                    if batch is not None:
                        self.counters.batches += 1
                        yield SourcedBatch(
                            message.topic, message.partition, message.offset, batch, self.lag()
                        )
        finally:
            self._maybe_commit(consumer, idle=True)
            consumer.close()

    def _consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            **kafka_client_options(self.settings.kafka),
            group_id=self.group_id,
            enable_auto_commit=False,
            # Only when a stored offset has left the log (retention): start at what is left.
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=_FETCH_BYTES,
            fetch_max_bytes=_FETCH_BYTES,
        )

    def _assign(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        available = self._topic_partitions(consumer)
        wanted = self.partitions or rank_partitions(available, self.rank, self.world_size)
        worker = get_worker_info()
        if worker is not None:  # a DataLoader worker process: its share of this rank's
            wanted = rank_partitions(wanted, worker.id, worker.num_workers)
        missing = set(wanted) - set(available)
        if missing:
            raise TrainerError(f"topic {self.topic} has no partitions {sorted(missing)}")
        assigned = [TopicPartition(self.topic, p) for p in wanted]
        consumer.assign(assigned)
        with self._lock:
            resume = dict(self._resume)
        recorded = self.start_record.load(self.topic) if self.start_record else {}
        origin: dict[int, str] = {}
        for tp in assigned:
            p = tp.partition
            if p in resume:
                consumer.seek(tp, resume[p])
                origin[p] = "checkpoint"
            elif p in recorded:
                consumer.seek(tp, recorded[p])
                origin[p] = "recorded start"
            elif (committed := consumer.committed(tp)) is not None:
                consumer.seek(tp, committed)
                origin[p] = f"offset committed by group {self.group_id}"
            elif self.start == "earliest":
                consumer.seek_to_beginning(tp)
                origin[p] = "earliest retained"
            else:
                consumer.seek_to_end(tp)
                origin[p] = "latest: new batches only"
        # Resolve every start position now: an unread partition's "end" must be pinned in
        # the first checkpoint, or a restart would skip what was written in between.
        positions = {tp.partition: consumer.position(tp) for tp in assigned}
        resolved = {p: o for p, o in positions.items()
                    if origin[p] not in ("checkpoint", "recorded start")}
        if resolved and self.start_record is not None:
            self.start_record.add(self.topic, resolved)
        with self._lock:
            self._positions = positions
        log.info("reading %s partitions %s from %s", self.topic, wanted,
                 ", ".join(f"{p}@{o} ({origin[p]})" for p, o in sorted(positions.items())))
        return assigned

    def _topic_partitions(self, consumer: KafkaConsumer) -> list[int]:
        deadline = time.monotonic() + 30.0
        while True:
            found = consumer.partitions_for_topic(self.topic)
            if found:
                return sorted(found)
            if time.monotonic() > deadline:
                raise TrainerError(f"topic {self.topic} does not exist (or has no partitions)")
            time.sleep(0.2)

    def _note_highwater(self, consumer: KafkaConsumer, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            hw = consumer.highwater(tp)
            if hw is not None:
                with self._lock:
                    self._highwater[tp.partition] = hw

    def _maybe_commit(self, consumer: KafkaConsumer, *, idle: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            offsets = self._pending_commit
            if not offsets or not (idle or self._commit_due or now >= self._next_commit):
                return
            self._pending_commit, self._commit_due = None, True
        if self.commit_every_s is not None:
            self._next_commit = now + self.commit_every_s
        try:
            consumer.commit(
                {
                    TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                    for p, o in offsets.items()
                }
            )
        except Exception as exc:  # advisory commit: the checkpoint is the truth
            log.warning(
                "committing offsets %s to group %s failed: %s", offsets, self.group_id, exc
            )

    def _decode(self, message: Any) -> CuratedBatch | None:
        """The batch in ``message``; ``None`` (counted and logged) for anything else."""
        self.counters.records += 1
        if message.value is None:  # a tombstone: nothing to decode
            self._skip(message, "tombstone", "the message value is null (a Kafka tombstone)")
            return None
        try:
            return cast(CuratedBatch, decode(message.value, "CuratedBatch"))
        except DecodeError as exc:
            self._skip(message, exc.reason, exc.detail)
        except Exception as exc:  # a decoder failure on hostile bytes is this record's
            # problem: raising it would stop the trainer at the same offset on every restart
            self._skip(message, "undecodable", f"{type(exc).__name__}: {exc}")
        return None

    def _skip(self, message: Any, reason: str, detail: str) -> None:
        self.counters.drop(reason)
        log.warning("skipping %s[%d]@%d: %s: %s", message.topic, message.partition,
                    message.offset, reason, detail)


def _round_robin(polled: dict[TopicPartition, list[Any]]) -> Iterator[Any]:
    """One record of each partition in turn (offset order within each): a poll often
    returns a long run of one partition, and the others would wait behind it."""
    runs = [polled[tp] for tp in sorted(polled, key=lambda t: t.partition)]
    for row in itertools.zip_longest(*runs):
        yield from (message for message in row if message is not None)
