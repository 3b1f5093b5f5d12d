"""Memory of the embedding windows a worker has seen: how many records carried each one, and
the vectors of the windows that recur.

Licence headers, generated preambles and vendored boilerplate recur word for word across
many records. Embedded as part of each record, they pull the means of two unrelated files
that share one towards each other; embedded again for every record, they cost model time
for nothing. So each window is known by a digest of its text, and:

- the number of records that carried it is counted; at ``common_after`` records it is
  **common**, and a record's vector is the mean of its other windows (all of them when
  every one is common: a file that is only a licence is still that licence);
- a window's vector, once embedded, is kept while the window keeps recurring, and reused.

The memory is in-process (bounded LRUs), not in Redis: the worker consults it for every
window of every record inside the executor, where a round trip per window would cost more
than it saves, and the counts need not be exact. Partitions are a hash of the event id, so
each worker sees a random sample of the stream: what is common in the stream becomes
common in every worker within a few times ``common_after`` records. A restart forgets the
counts; they grow back as fast. Counters (``stats``) say how much it saved.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

import numpy as np


def window_digest(text: str) -> bytes:
    """The key of a window: a 16-byte BLAKE2 digest of its exact text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class WindowMemory:
    """Counts of records per window digest and the vectors of recurring windows (LRUs).

    ``common_after``: records carrying a window at which it is common (0: never);
    ``counted``: digests whose counts are kept; ``cached``: vectors kept.
    """

    def __init__(self, common_after: int, counted: int = 65_536, cached: int = 4_096) -> None:
        self.common_after = common_after
        self.counted = counted
        self.cached = cached
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.stats: Counter[str] = Counter()
        # The worker embeds in an executor: two calls may overlap, and an OrderedDict is
        # not safe to reorder from two threads. The model runs outside the lock.
        self._lock = threading.Lock()

    def count(self, records: Sequence[Sequence[bytes]]) -> None:
        """Count each record's windows (a window repeated inside one record counts once)."""
        with self._lock:
            for digests in records:
                for digest in dict.fromkeys(digests):
                    self._counts[digest] = self._counts.get(digest, 0) + 1
                    self._counts.move_to_end(digest)
            while len(self._counts) > self.counted:
                self._counts.popitem(last=False)

    def left_out(self, n: int) -> None:
        """Count ``n`` common windows left out of a record's mean."""
        with self._lock:
            self.stats["windows.common_left_out"] += n

    def totals(self) -> dict[str, int]:
        """The counters so far (a copy, taken under the lock: the executor writes them)."""
        with self._lock:
            return dict(self.stats)

    def is_common(self, digest: bytes) -> bool:
        """Carried by at least ``common_after`` of the records counted."""
        return 0 < self.common_after <= self._counts.get(digest, 0)

    def vectors(self, digests: Sequence[bytes], texts: Sequence[str],
                embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """The vector of each window, one row each: from the cache, else embedded (each
        distinct window once, in one call) and cached when it has recurred."""
        rows: dict[bytes, np.ndarray] = {}
        todo: dict[bytes, str] = {}
        with self._lock:
            for digest, text in zip(digests, texts, strict=True):
                cached = self._vectors.get(digest)
                if cached is not None:
                    self._vectors.move_to_end(digest)
                    rows[digest] = cached
                    self.stats["windows.cache_hits"] += 1
                elif digest in todo or digest in rows:
                    self.stats["windows.batch_repeats"] += 1
                else:
                    todo[digest] = text
        if todo:
            fresh = embed(list(todo.values()))
            with self._lock:
                self.stats["windows.embedded"] += len(todo)
                for digest, vector in zip(todo, fresh, strict=True):
                    rows[digest] = vector
                    # Only a window seen in more than one record is worth a cache slot.
                    if self._counts.get(digest, 0) > 1 and self.cached > 0:
                        self._vectors[digest] = vector
                while len(self._vectors) > self.cached:
                    self._vectors.popitem(last=False)
        return np.array([rows[d] for d in digests], dtype=np.float32).reshape(len(digests), -1)
