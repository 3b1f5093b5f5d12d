"""Offset tracking for the worker that never commits past a record without an outcome.

faust-streaming (0.15.3) commits, per partition, the end of the first consecutive run of
acked offsets. Three things in its bookkeeping let that run start past a record nobody
finished, and the churn chaos test lost events through them when a SIGKILL moved
partitions (`tests/agents/test_chaos.py`):

- **Skipped means acked.** A message fetched before a rebalance and still queued in a
  stream after it (an older ``generation_id``) is skipped *and acked*
  (``faust/streams.py``). When the partition comes back to the same worker, the offsets
  of those unprocessed copies land in the new assignment's acked list, and the commit
  moves past them before the re-fetched copies are processed: a kill then loses them.
  Acks between the revoke and the next assignment land in a list the assignment keeps.
- **Committed as last processed.** The committed offset is the *next* record to read,
  but ``Consumer._new_offset`` accepts a run that starts one past it
  (``min(acked) - committed > 1`` is its only guard): with the committed record unacked
  and the next one acked, it commits past the first.
- **Gaps include the record that revealed them.** ``_add_gap`` covers the arriving
  message too, so a hole (a transaction marker, retention) counts an in-flight record as
  done; a hole right at the committed offset is not covered at all.

``SafeConsumer`` keeps faust's commit machinery and replaces those three rules: acks of an
older generation or an unassigned partition are not recorded (the record is read again
by whoever owns it: at least once, and every stage is idempotent by id); a run commits
only from the partition's floor (the committed offset, else the first offset delivered in
this assignment) over offsets that are acked or absent from the log; an offset counts as
absent when a delivery jumped over it and a later fetch went past it without delivering
it (a record prefetched before a seek can arrive early: the first fetch does not decide);
a record faust would drop as already read is let through instead.

One more hole is in aiokafka: ``seek_to_committed`` seeks only to a committed offset
above 0, so a partition never committed (or committed at 0) stays wherever the last
fetch left it. faust fetches stream partitions while it restores a table and drops what
they return (only the changelogs are active then): the position moves past records no
one processed, the seek after recovery does not bring it back, and the floor would later
start past them. ``perform_seek`` rewinds such partitions to their start
(``rewind_to_start``); seen in ``tests/agents/test_balance_recovery.py``, where a
restarted worker found 24 samples waiting and processed none.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence, Set
from typing import Any, ClassVar

from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import ack_lock

log = logging.getLogger(__name__)


def commit_position(floor: int | None, done: Set[int],
                    absent: Sequence[tuple[int, int]] = ()) -> int | None:
    """Where a partition's commit may move: past every offset from ``floor`` (its first
    record not yet committed) that is ``done`` (acked) or ``absent`` from the log
    (``(start, stop)`` ranges). None when the record at the floor is neither, or the floor
    is unknown: nothing may be committed past a record without an outcome."""
    if floor is None:
        return None
    spans = sorted(absent)
    position = floor
    while True:
        if position in done:
            position += 1
            continue
        skip = next((stop for start, stop in spans if start <= position < stop), None)
        if skip is None:
            break
        position = skip
    return position if position > floor else None


def rewind_to_start(read_offsets: Mapping[TP, int | None], changelog_topics: Set[str],
                    reset: str) -> set[TP]:
    """The stream partitions to seek to their first record after faust's seek to the
    committed offsets: those with no committed offset, or 0, which aiokafka does not seek
    (under ``auto_offset_reset = latest`` a partition never committed starts at the end,
    whatever was fetched before)."""
    if reset != "earliest":
        return set()
    return {tp for tp, offset in read_offsets.items()
            if not offset and tp.topic not in changelog_topics}


def absent_offsets(expected: int | None, offset: int) -> range:
    """The offsets the log skipped when ``offset`` is delivered where ``expected`` was the
    next one (a transaction marker, compaction, retention), or that a stale, prefetched
    record jumped over; never ``offset`` itself."""
    if expected is None or offset <= expected:
        return range(0)
    return range(expected, offset)


class SafeConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer with offset bookkeeping that cannot skip a record."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per partition, for the current assignment: the offset the next delivery should
        # have (None: unknown until the first delivery) and the first offset delivered.
        self._expected: dict[TP, int | None] = {}
        self._first: dict[TP, int] = {}
        # Offsets a delivery jumped over, (start, stop, fetch number): absent from the log
        # once a later fetch goes past them without delivering them.
        self._maybe_absent: dict[TP, list[tuple[int, int, int]]] = {}
        self._fetches = 0

    # -- acks ------------------------------------------------------------------------------

    def ack(self, message: Message) -> bool:
        """Record the ack of a message of the current generation and assignment only."""
        with ack_lock:
            if message.acked:
                return False
            stale = (message.generation_id != self.app.consumer_generation_id
                     or message.tp not in self._expected)
            if stale:
                # Not recorded: the partition's current owner reads it again.
                message.acked = True
                self._unacked_messages.discard(message)
                log.info("ack of %s@%d from an older assignment not recorded (read again "
                         "by the partition's owner)", message.tp, message.offset)
                return False
        return bool(super().ack(message))

    # -- assignment ------------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        """Forget the revoked partitions' positions before faust's own clean-up."""
        with ack_lock:
            for tp in revoked:
                self._expected.pop(tp, None)
                self._first.pop(tp, None)
                self._maybe_absent.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Set[TP], generation_id: int = 0) -> None:
        """Start every assigned partition clean: acks recorded since the revoke belong to
        an older assignment (faust keeps them, and would commit past unread records)."""
        with ack_lock:
            for tp in assigned:
                self._acked.pop(tp, None)
                self._acked_index.pop(tp, None)
                self._gap.pop(tp, None)
                self._first.pop(tp, None)
                self._maybe_absent.pop(tp, None)
                self._expected[tp] = None
        await super().on_partitions_assigned(assigned, generation_id)

    async def perform_seek(self) -> None:
        """Seek to the committed offsets; a partition with no delivery yet expects its next
        one there (one that had deliveries may or may not be re-delivered: either is fine)."""
        await super().perform_seek()
        assigned = {tp: self._read_offset.get(tp) for tp in self.assignment()}
        rewind = rewind_to_start(assigned, self.app.tables.changelog_topics,
                                 self.app.conf.consumer_auto_offset_reset)
        if rewind:
            await self._thread.seek_to_beginning(
                *(TopicPartition(tp.topic, tp.partition) for tp in rewind))
            log.info("rewound %s to their first record (never committed)", sorted(rewind))
        with ack_lock:
            for tp in self._expected:
                if tp not in self._first:
                    self._expected[tp] = self._committed_offset.get(tp)

    # -- deliveries and gaps ---------------------------------------------------------------

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        """faust's fetch loop, noting each delivered offset (for the floor and the gaps)."""
        self._fetches += 1
        async for tp, message in super().getmany(timeout):
            self._delivered(tp, message.offset)
            yield tp, message

    def _delivered(self, tp: TP, offset: int) -> None:
        with ack_lock:
            if tp not in self._expected:
                return
            self._first.setdefault(tp, offset)
            read = self._read_offset.get(tp)
            if read is not None and offset < read:
                # faust would drop it as already read ("DROPPED MESSAGE ROFF"), though
                # nothing says it was processed in this assignment: let it through (an
                # extra delivery is a replay; a dropped one would block the commit).
                self._read_offset[tp] = offset
            holes = self._maybe_absent.setdefault(tp, [])
            kept = []
            for start, stop, fetch in holes:
                if start <= offset < stop:  # delivered after all: not absent
                    kept += [(start, offset, fetch), (offset + 1, stop, fetch)]
                elif fetch < self._fetches and offset >= stop:
                    # A later fetch went past it without filling it: absent from the log.
                    self._gap[tp].addi(start, stop)
                    log.info("%s: offsets %d..%d absent from the log", tp, start, stop - 1)
                else:
                    kept.append((start, stop, fetch))
            holes[:] = [(a, b, f) for a, b, f in kept if a < b]
            skipped = absent_offsets(self._expected[tp], offset)
            if skipped:
                # Not yet known to be absent: a record prefetched before a seek can arrive
                # before the ones it jumped over. Decided by a later fetch.
                holes.append((skipped.start, skipped.stop, self._fetches))
            expected = self._expected[tp]
            if expected is None or offset >= expected:
                self._expected[tp] = offset + 1

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # faust's gap counts the arriving record as done; ours (``_delivered``) does not.
        return None

    # -- what may be committed -------------------------------------------------------------

    def _new_offset(self, tp: TP) -> int | None:
        """Past the done offsets from the partition's floor (the committed offset, else the
        first delivered); None while the record at the floor has no outcome."""
        with ack_lock:
            acked = self._acked[tp]
            if not acked:
                return None
            committed = self._committed_offset[tp]
            floor = committed if committed is not None else self._first.get(tp)
            gaps = self._gap[tp]
            position = commit_position(floor, self._acked_index[tp],
                                       [(i.begin, i.end) for i in gaps])
            if position is None:
                return None
            acked[:] = [offset for offset in acked if offset >= position]
            self._acked_index[tp] = set(acked)
            gaps.chop(0, position)
            return position


class SafeTransport(faust_aiokafka.Transport):
    """faust's aiokafka transport with ``SafeConsumer``."""

    Consumer: ClassVar[type[Any]] = SafeConsumer
