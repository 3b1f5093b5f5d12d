"""The semantic-dedup admission index: one Redis 8 vector set per namespace.

``VectorIndex.admit`` decides a whole micro-batch in ONE server-side Lua script, so the
decision is atomic against every other worker: for each item in order,

1. its id is already an element → kept, ``already=True`` (a replay is idempotent, never a
   duplicate of itself);
2. else ``VSIM key FP32 <blob> COUNT k WITHSCORES``; the best score ≥ ``(1 + threshold) / 2``
   → a duplicate of that element;
3. else ``VADD key FP32 <blob> <id> Q8|NOQUANT|BIN EF <build_ef> M <links>`` → kept.

Items are added in order inside the script, so a near-copy of an earlier item of the same
micro-batch is caught too, and two workers can never both admit near-copies of each other.

Score scale (pinned by a test against numpy): vector sets compare by cosine and
``VSIM … WITHSCORES`` returns ``(1 + cos) / 2`` in [0, 1] (1 identical, 0.5 orthogonal,
0 opposite); ``score_to_cosine`` and ``cosine_to_score`` convert.

The script holds the whole server while it runs, and VADD dominates: measured on a busy
2-core machine with int8 and build EF 200, 64 items held it 30-100 ms at 1k items and
≈ 230 ms at 10k (≈ 90 ms with build EF 100, same recall@1). Keep micro-batches small and
watch ``longest_hold_s`` (the dedup agent publishes it as the gauge ``admit.hold_s.max``):
past Redis' ``busy-reply-threshold`` (5 s by default) every other client gets BUSY. The
settings bound what one call can do (``DedupSettings``: batch_size, build_ef, links).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from agents.config import DedupSettings
from agents.keys import vset_key
from schemas.errors import SluiceError

# KEYS[1]: the vector set.
# ARGV: min_score, count, quantization, build ef, M, then id, blob pairs.
# Replies, one per item: {"already"} | {"kept"[, nearest score]} | {"duplicate", element, score}.
# A dimension or quantization mismatch fails at the first VSIM/VADD, before any write of
# this call, so an error never leaves half a micro-batch admitted.
ADMIT_LUA = """
local key = KEYS[1]
local min_score = tonumber(ARGV[1])
local count, quant, ef, m = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out = {}
for i = 6, #ARGV, 2 do
  local id, blob = ARGV[i], ARGV[i + 1]
  if redis.call('VISMEMBER', key, id) == 1 then
    out[#out + 1] = {'already'}
  else
    local hits = redis.call('VSIM', key, 'FP32', blob, 'COUNT', count, 'WITHSCORES')
    local best, best_score = nil, -1
    for j = 1, #hits, 2 do
      local score = tonumber(hits[j + 1])
      if score > best_score then best, best_score = hits[j], score end
    end
    if best ~= nil and best_score >= min_score then
      -- as a string: a Lua number in a reply would be cut to an integer
      out[#out + 1] = {'duplicate', best, string.format('%.17g', best_score)}
    else
      redis.call('VADD', key, 'FP32', blob, id, quant, 'EF', ef, 'M', m)
      if best == nil then
        out[#out + 1] = {'kept'}
      else
        out[#out + 1] = {'kept', string.format('%.17g', best_score)}
      end
    end
  end
end
return out
"""

_QUANTIZATION = {"int8": "Q8", "noquant": "NOQUANT", "bin": "BIN"}

HOLD_WINDOW = 64  # admission calls over which ``longest_hold_s`` is the maximum


class VectorIndexError(SluiceError):
    """The vector set rejected an admission (dimension or quantization mismatch, no Redis)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision for one item.

    ``similarity`` is the cosine to the nearest element found: the duplicated one when
    ``keep`` is false, the closest (below the threshold) when kept, ``None`` when the set was
    empty or the id was ``already`` admitted.
    """

    keep: bool
    duplicate_of: str | None = None
    similarity: float | None = None
    already: bool = False


def score_to_cosine(score: float) -> float:
    """Cosine similarity from a ``VSIM … WITHSCORES`` score, which is ``(1 + cos) / 2``."""
    return 2.0 * score - 1.0


def cosine_to_score(cos: float) -> float:
    """The ``VSIM … WITHSCORES`` score of a cosine similarity: ``(1 + cos) / 2``."""
    return (1.0 + cos) / 2.0


class VectorIndex:
    """Atomic near-duplicate admission against one Redis 8 vector set."""

    def __init__(
        self,
        redis_client: redis.Redis,
        namespace: str,
        settings: DedupSettings,
    ) -> None:
        self.client = redis_client
        self.namespace = namespace
        self.settings = settings
        self.key = vset_key(namespace)
        # EVALSHA with the locally computed SHA; redis-py loads the script and retries once
        # on NOSCRIPT (a restarted or flushed server).
        self._script = redis_client.register_script(ADMIT_LUA)
        self._min_score = cosine_to_score(settings.threshold)
        #: Decisions so far, by outcome: ``kept``, ``duplicate``, ``already``.
        self.counts: Counter[str] = Counter()
        #: Wall time of the last ``admit`` round trip: an upper bound on the server hold.
        self.last_call_s: float = 0.0
        self._recent_calls_s: deque[float] = deque(maxlen=HOLD_WINDOW)

    def admit(self, ids: list[str], vectors: np.ndarray) -> list[Admission]:
        """Decide every item, in input order, in one atomic script call."""
        blobs = _fp32_blobs(vectors)
        if len(ids) != len(blobs):
            raise VectorIndexError(f"{len(ids)} ids for {len(blobs)} vectors")
        if not ids:
            return []
        args: list[Any] = [
            repr(self._min_score),
            self.settings.neighbours,
            _QUANTIZATION[self.settings.quantization],
            self.settings.build_ef,
            self.settings.links,
        ]
        for item_id, blob in zip(ids, blobs, strict=True):
            args += [item_id, blob]
        started = time.perf_counter()
        try:
            replies = self._script(keys=[self.key], args=args)
        except redis.RedisError as exc:
            raise VectorIndexError(f"admission to {self.key} failed: {exc}") from exc
        finally:
            self.last_call_s = time.perf_counter() - started
            self._recent_calls_s.append(self.last_call_s)
        admissions = [_admission(reply) for reply in replies]
        self.counts.update(
            "already" if a.already else "kept" if a.keep else "duplicate" for a in admissions
        )
        return admissions

    @property
    def longest_hold_s(self) -> float:
        """The longest of the last ``HOLD_WINDOW`` admission calls (0 before the first): an
        upper bound on how long the script held the whole server."""
        return max(self._recent_calls_s, default=0.0)

    def size(self) -> int:
        """Elements in the set (``VCARD``; 0 when it does not exist yet)."""
        return int(self.client.execute_command("VCARD", self.key))

    def memory_bytes(self) -> int:
        """Bytes the set takes in Redis (``MEMORY USAGE``; 0 when it does not exist yet)."""
        return int(self.client.memory_usage(self.key) or 0)

    def clear(self) -> None:
        """Drop the whole set (tests, ``sluice`` reset)."""
        self.client.delete(self.key)


def _fp32_blobs(vectors: np.ndarray) -> list[bytes]:
    """Each row as the little-endian FP32 blob ``VADD``/``VSIM … FP32`` expect."""
    array = np.ascontiguousarray(vectors, dtype="<f4")
    if array.ndim != 2:
        raise VectorIndexError(f"vectors must be a 2-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise VectorIndexError("vectors contain NaN or infinity")
    return [row.tobytes() for row in array]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _admission(reply: list[Any]) -> Admission:
    outcome = _text(reply[0])
    if outcome == "already":
        return Admission(keep=True, already=True)
    if outcome == "kept":
        nearest = score_to_cosine(float(_text(reply[1]))) if len(reply) > 1 else None
        return Admission(keep=True, similarity=nearest)
    return Admission(
        keep=False,
        duplicate_of=_text(reply[1]),
        similarity=score_to_cosine(float(_text(reply[2]))),
    )
