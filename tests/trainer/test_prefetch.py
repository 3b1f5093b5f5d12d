"""The prefetcher: state as of the item handed out, errors surfaced, waiting measured."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trainer.prefetch import Prefetcher


class Counting:
    """A stateful source: items 0..n-1, state = the next item to read."""

    def __init__(self, n: int, delay_s: float = 0.0) -> None:
        self.n, self.delay_s, self.next = n, delay_s, 0
        self.closed = False

    def __iter__(self) -> Iterator[int]:
        try:
            while self.next < self.n:
                time.sleep(self.delay_s)
                self.next += 1
                yield self.next - 1
        finally:
            self.closed = True

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next}


def test_state_follows_what_was_handed_out_not_what_was_read_ahead() -> None:
    source = Counting(10)
    prefetch = Prefetcher(source, lambda i: i * 10, depth=4).start()
    try:
        assert prefetch.state_dict() == {"next": 0}
        assert prefetch.get() == 0
        time.sleep(0.2)  # the thread fills its queue meanwhile
        assert source.next > 1
        assert prefetch.state_dict() == {"next": 1}
        assert [prefetch.get() for _ in range(3)] == [10, 20, 30]
        assert prefetch.state_dict() == {"next": 4}
    finally:
        prefetch.close()
    assert source.closed  # the generator was closed by the thread that drove it


def test_the_end_of_the_source_and_a_stop_both_end_get() -> None:
    prefetch = Prefetcher(Counting(2), lambda i: i).start()
    assert [prefetch.get(), prefetch.get(), prefetch.get(), prefetch.get()] == [0, 1, None, None]
    prefetch.close()

    stop = threading.Event()
    slow = Prefetcher(Counting(100, delay_s=0.5), lambda i: i).start()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert slow.get(stop) is None
    assert time.monotonic() - started < 0.45
    slow.close()


def test_a_failing_transform_raises_in_the_consumer() -> None:
    def transform(i: int) -> int:
        if i == 2:
            raise ValueError("bad batch 2")
        return i

    prefetch = Prefetcher(Counting(5), transform).start()
    assert [prefetch.get(), prefetch.get()] == [0, 1]
    with pytest.raises(ValueError, match="bad batch 2"):
        prefetch.get()
    prefetch.close()


def test_time_spent_waiting_is_counted() -> None:
    prefetch = Prefetcher(Counting(3, delay_s=0.1), lambda i: i, depth=1).start()
    while prefetch.get() is not None:
        pass
    prefetch.close()
    assert 0.2 <= prefetch.wait_s < 1.0
