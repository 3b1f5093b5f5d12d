"""The heap trimmer: at most one trim per interval, and a real ``malloc_trim`` on glibc."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest

from streams.heap import HeapTrimmer, trim_heap


def test_a_trim_at_most_every_interval() -> None:
    now = [100.0]
    trimmer = HeapTrimmer(every_s=5.0, clock=lambda: now[0])
    assert trimmer.maybe_trim()  # the first batch trims
    now[0] += 4.9
    assert not trimmer.maybe_trim()
    now[0] += 0.2
    assert trimmer.maybe_trim() and trimmer.trims == 2


def _rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_trimming_returns_freed_small_blocks_to_the_system() -> None:
    # Many blocks below glibc's mmap threshold, the last one kept: freeing the rest leaves
    # the heap's memory resident until a trim releases its free pages.
    start = _rss_mib()
    blocks = [np.ones(8_000, dtype=np.float64) for _ in range(4_000)]  # 64 KB each: 250 MiB
    keep = blocks[-1]
    del blocks
    before = _rss_mib()
    assert before > start + 150, "the freed blocks were returned without a trim"
    assert trim_heap()
    assert _rss_mib() < before - 150, "freed heap memory still resident after the trim"
    assert keep.sum() == 8_000
