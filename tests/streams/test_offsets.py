"""The commit rules of ``streams.offsets``: never past a record without an outcome."""

from __future__ import annotations

from faust.types import TP

from streams.offsets import absent_offsets, commit_position, rewind_to_start


def test_a_commit_moves_only_from_the_floor_over_done_offsets() -> None:
    # faust 0.15.3 commits 4 here (its guard is `min(acked) - committed > 1`), skipping
    # record 2, which has no outcome yet.
    assert commit_position(2, {3}) is None
    assert commit_position(2, {2, 3, 5}) == 4
    assert commit_position(None, {3, 4}) is None


def test_offsets_below_the_floor_do_not_matter() -> None:
    assert commit_position(1, {0, 1, 2}) == 3


def test_absent_offsets_count_as_done_but_not_the_record_after_them() -> None:
    assert commit_position(2, {4, 5}, [(2, 4)]) == 6
    assert commit_position(2, {5}, [(2, 4)]) == 4  # up to record 4, delivered, not done
    assert commit_position(2, set(), [(2, 1_000_000)]) == 1_000_000  # nothing materialized


def test_absent_offsets_exclude_the_delivered_record() -> None:
    # faust's own gap covers the arriving record too, so a crash before its outcome
    # would commit past it.
    assert list(absent_offsets(5, 8)) == [5, 6, 7]
    assert list(absent_offsets(5, 5)) == []
    assert list(absent_offsets(5, 3)) == []  # a re-delivery after a seek back
    assert list(absent_offsets(None, 9)) == []  # first delivery with no known position


def test_partitions_never_committed_are_rewound_after_the_seek_to_committed() -> None:
    # aiokafka's seek_to_committed seeks only to a committed offset > 0; records faust
    # fetched and dropped before (during a table's recovery the stream partitions are not
    # active) would never be read again, and the floor would start past them. Seen in
    # test_balance_recovery: 24 samples fetched during recovery, position 24, none processed.
    samples, changelog = TP("samples", 0), TP("app-state-changelog", 0)
    read = {samples: None, TP("samples", 1): 0, TP("samples", 2): 17, changelog: None}
    assert rewind_to_start(read, {"app-state-changelog"}, "earliest") == {
        samples, TP("samples", 1)}
    # Under "latest" a partition never committed starts at the end anyway.
    assert rewind_to_start(read, {"app-state-changelog"}, "latest") == set()
