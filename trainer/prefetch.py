"""Run a stateful source and a transform ahead of the consumer, in one background thread.

Decoding Avro and collating tensors happen here while the training step runs, so the step
only waits when the stream itself is slow. The source is driven by this thread alone (a
Kafka consumer is not thread-safe). Like torchdata's ``StatefulDataLoader``, the resume
state handed out is the source's state *as of the last item the consumer received*, not as
of what the thread has read ahead: resuming from it neither skips nor repeats an item.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Stateful(Protocol):
    """What the prefetcher needs from a source besides iteration."""

    def state_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Prefetched(Generic[U]):
    """A transformed item and the source's state right after it was read."""

    value: U
    state: dict[str, Any]


_END = object()


class Prefetcher(Generic[T, U]):
    """``depth`` transformed items kept ready; counts the time the consumer waits for them.

    ``get()`` returns the next item, or ``None`` once the source is exhausted or ``stop``
    is set. An exception raised by the source or the transform is raised again in
    ``get()``. ``wait_s`` is the total time ``get()`` spent blocked; ``startup_s`` is the
    part of it spent on the first item, which the source spends connecting, seeking and
    making its first fetch (or, reading only new data, waiting for the first to be
    written): a start-up cost, not a stall of a running data path.
    """

    def __init__(
        self,
        source: Iterable[T],
        transform: Callable[[T], U],
        *,
        depth: int = 4,
        state_of: Stateful | None = None,
        name: str = "prefetch",
    ) -> None:
        self._source = source
        self._transform = transform
        self._state_of = state_of if state_of is not None else _stateful(source)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._state = self._state_of.state_dict() if self._state_of is not None else {}
        self.wait_s = 0.0
        self.startup_s = 0.0
        self._started = False

    def start(self) -> Prefetcher[T, U]:
        """Start the background thread (once)."""
        self._thread.start()
        return self

    def state_dict(self) -> dict[str, Any]:
        """The source's state after the last item ``get()`` returned."""
        return self._state

    def get(self, stop: threading.Event | None = None) -> U | None:
        """The next item; ``None`` when the source is done or ``stop`` is set."""
        started, first = time.perf_counter(), not self._started
        try:
            while True:
                if stop is not None and stop.is_set():
                    return None
                try:
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        return None
                    continue
                if item is _END:
                    self._queue.put(_END)  # stay exhausted for later calls
                    return None
                if isinstance(item, _Failure):
                    raise item.error
                self._state = item.state
                self._started = True
                return item.value
        finally:
            waited = time.perf_counter() - started
            self.wait_s += waited
            if first:
                self.startup_s += waited

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (and the source, if it has ``stop()``) and wait for it."""
        self._halt.set()
        stop = getattr(self._source, "stop", None)
        if callable(stop):
            stop()
        # Unblock a thread waiting on a full queue.
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
            if timeout_s <= 0:
                break
            timeout_s -= 0.05

    def _run(self) -> None:
        iterator = iter(self._source)
        try:
            for raw in iterator:
                value = self._transform(raw)
                state = self._state_of.state_dict() if self._state_of is not None else {}
                if not self._put(Prefetched(value, state)):
                    return
        except BaseException as exc:  # handed to the consumer thread, raised there
            self._put(_Failure(exc))
            return
        finally:
            # Close a generator source here, in the thread that drives it (its cleanup,
            # such as closing a Kafka consumer, must not run in another thread later).
            close = getattr(iterator, "close", None)
            if callable(close):
                close()
        self._put(_END)

    def _put(self, item: Any) -> bool:
        while not self._halt.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


def _stateful(source: Any) -> Stateful | None:
    return source if callable(getattr(source, "state_dict", None)) else None
