"""The semantic-dedup admission index: a Redis 8 vector set per namespace, with the FP32
vectors beside it, decided in the worker, with no long hold of the server.

``VectorIndex.admit`` takes a micro-batch in a few short round trips:

1. **search** (pipelines, no script): the log's clock, then per item ``VISMEMBER`` and
   ``VSIM … COUNT neighbours`` (with ``dedup.offload`` on Redis' threads, else
   ``NOTHREAD``: one short command each); then the candidates' FP32 vectors (``HMGET``)
   and which of them are still ``pending`` (written by a worker that has not settled them);
2. **decide** in the worker (``agents.admission.decide``): an admitted id is ``already``
   (a replay is idempotent); else the FP32 cosine to the nearest candidate, or to an
   earlier kept item of the same batch, ≥ ``threshold`` → a duplicate of it; else kept.
   Quantization (int8) only chooses the candidates; it never decides;
3. **write** (one pipeline): mark the kept items pending, ``HSET`` their FP32 vectors,
   then ``VADD`` each (with ``dedup.offload``: ``CAS``, its candidate search on a thread);
4. **register and settle** (one short script, then one pipeline): each kept id enters the
   admission log with a clock value (the server's time in µs, forced to increase), and the
   script returns the items registered since step 1 read the clock — the only ones this
   batch's search may not have seen. A kept item within ``threshold`` of one of them was
   registered after it, so it gives way: it is removed (``VREM``) and reported as that
   item's duplicate (``agents.admission.settle``). Then none of the batch is pending;
5. **confirm**: a duplicate must name an item that stays. One that named a pending item of
   another worker waits (``settle_wait_s``) until it is settled; if it gave way, or if it
   was one of ours that gave way, the item is decided again from step 1.

Why it is race-free (modulo HNSW recall): registration follows the write, so an item
registered before a batch read the clock was in the set when that batch searched; one
registered after is in the batch's window. Of two near-copies both written, the later
registered sees the earlier in its window and gives way; both workers agree, and a replay
finds the winner (``already``, or a duplicate of it). The tie-break is the registration
order, not the event time: the earlier registered one was already reported kept when the
later one is checked, so anything else would make workers wait on each other's decisions.
Left over, accepted: a worker that dies between its ``VADD`` and the registration leaves
its items out of other workers' windows (a near-copy written in that instant may be kept
too) and pending (another worker's duplicate of one of them waits ``settle_wait_s``, then
counts it as kept and settles it: its replay finds it ``already`` admitted); such an item
never enters the log, so the horizon never ages it out.

Holds: no call runs the batch's HNSW work inside a script. The atomic calls are the
registration script (O(batch + window), no vector work) and, with a horizon, the trim
script; ``longest_hold_s`` is the longest of their round trips over the last
``HOLD_WINDOW`` calls (the dedup agent publishes it as ``admit.hold_s.max``). Single
commands hold the main thread on their own: a ``VADD``'s commit, a ``VREM``
(``bench.index`` measures the longest server call of every admission with ``SLOWLOG``).

Score scale (pinned by a test against numpy): ``VSIM … WITHSCORES`` returns
``(1 + cos) / 2``; ``score_to_cosine`` and ``cosine_to_score`` convert.

Horizon (``dedup.horizon``): before each call the oldest admissions past the count or age
limit leave the set, the vectors and the log (``counts["aged_out"]``).

With ``dedup.shards`` > 1, ``agents.sharded_index`` splits the index by nearest centroid:
each shard is a ``VectorIndex`` over its own keys (``prefix``), and the search, write and
settle above run across the shards an item probes.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from agents.admission import decide, settle
from agents.config import DedupSettings
from agents.horizon import DUE_LUA
from agents.keys import vset_prefix
from schemas.errors import SluiceError

# KEYS: log, clock, vectors. ARGV[1]: the clock read before the search; ARGV[2..]: kept ids.
# Registers each id at max(now µs, last + 1), then returns the window: every id registered
# after ARGV[1] (this call's own included), each followed by its FP32 vector (nil if gone).
REGISTER_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
for i = 2, #ARGV do
  last = math.max(now, last + 1)
  redis.call('ZADD', KEYS[1], string.format('%.0f', last), ARGV[i])
end
redis.call('SET', KEYS[2], string.format('%.0f', last))
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[3], id)
end
return out
"""


QUANTIZATION = {"int8": "Q8", "noquant": "NOQUANT", "bin": "BIN"}

HOLD_WINDOW = 64  # admission calls over which ``longest_hold_s`` is the maximum
MAX_ROUNDS = 8  # an item is decided again when what it duplicated lost a race; that is rare
SETTLE_POLL_S = 0.005  # how often a duplicate of an item still being settled looks again


class VectorIndexError(SluiceError):
    """The vector set rejected an admission (dimension or quantization mismatch, no Redis)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision for one item.

    ``similarity`` is the FP32 cosine to the nearest element found: the duplicated one
    when ``keep`` is false, the closest (below the threshold) when kept, ``None`` when
    nothing was found or the id was ``already`` admitted.
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


def decide_in_rounds(round_: Callable[[list[str], np.ndarray], list[Admission | None]],
                     ids: list[str], rows: np.ndarray, counts: Counter[str]
                     ) -> list[Admission]:
    """Every item decided by ``round_`` (search, decide, write, settle), again while what it
    duplicated lost a race (``None``), at most ``MAX_ROUNDS`` times; ``counts`` gets
    ``redecided`` and each decision (``kept``, ``duplicate``, ``already``)."""
    admissions: list[Admission | None] = [None] * len(ids)
    todo = list(range(len(ids)))
    for _ in range(MAX_ROUNDS):
        decided = round_([ids[i] for i in todo], rows[todo])
        for i, admission in zip(todo, decided, strict=True):
            admissions[i] = admission
        todo = [i for i, admission in zip(todo, decided, strict=True) if admission is None]
        if not todo:
            break
        counts["redecided"] += len(todo)
    else:
        raise VectorIndexError(f"{len(todo)} items still undecided after {MAX_ROUNDS} "
                               "rounds of races")
    done = [a for a in admissions if a is not None]
    counts.update("already" if a.already else "kept" if a.keep else "duplicate" for a in done)
    return done


class VectorIndex:
    """Near-duplicate admission against one Redis 8 vector set, safe between workers."""

    def __init__(
        self,
        redis_client: redis.Redis,
        namespace: str,
        settings: DedupSettings,
        prefix: str | None = None,
    ) -> None:
        """``prefix``: where the keys live, when not the namespace's one set (one shard of
        ``agents.sharded_index``, ``agents.keys.shard_prefix``)."""
        self.client = redis_client
        self.namespace = namespace
        self.settings = settings
        prefix = prefix or vset_prefix(namespace)
        self.key = f"{prefix}:set"  # vset_key(namespace) for the namespace's one set
        self.vectors_key, self.log_key = f"{prefix}:vec", f"{prefix}:log"
        self.clock_key, self.pending_key = f"{prefix}:clock", f"{prefix}:pending"
        # EVALSHA with the locally computed SHA; redis-py loads the script and retries once
        # on NOSCRIPT (a restarted or flushed server).
        self._register = redis_client.register_script(REGISTER_LUA)
        self._due = redis_client.register_script(DUE_LUA)
        # dedup.offload: searches on Redis' threads (VSIM's default, VADD with CAS) or not.
        self._vsim_mode = () if settings.offload else ("NOTHREAD",)
        self._vadd_mode = ("CAS",) if settings.offload else ()
        #: Decisions so far: ``kept``, ``duplicate``, ``already``; also ``race_lost`` (kept
        #: items removed again by the settle, counted in ``duplicate`` too), ``redecided``
        #: (items decided again because the item they duplicated lost a race),
        #: ``stale_pending`` (items a dead worker left pending, settled as kept) and
        #: ``aged_out`` (items removed by the horizon).
        self.counts: Counter[str] = Counter()
        #: Wall time of the last whole ``admit`` (all its round trips).
        self.last_call_s: float = 0.0
        #: The longest atomic call (script round trip) of the last ``admit``.
        self.last_hold_s: float = 0.0
        self._recent_holds_s: deque[float] = deque(maxlen=HOLD_WINDOW)

    def admit(self, ids: list[str], vectors: np.ndarray) -> list[Admission]:
        """Decide every item, in input order (see the module's docstring for the steps)."""
        rows = stored_rows(vectors, self.settings.vector_precision)
        if len(ids) != len(rows):
            raise VectorIndexError(f"{len(ids)} ids for {len(rows)} vectors")
        if not ids:
            return []
        started = time.perf_counter()
        holds: list[float] = []
        try:
            self._trim(holds)
            return decide_in_rounds(lambda i, r: self._round(i, r, holds), ids, rows,
                                    self.counts)
        except redis.RedisError as exc:
            raise VectorIndexError(f"admission to {self.key} failed: {exc}") from exc
        finally:
            self.last_call_s = time.perf_counter() - started
            self.last_hold_s = max(holds, default=0.0)
            self._recent_holds_s.append(self.last_hold_s)

    def _round(self, ids: list[str], rows: np.ndarray, holds: list[float]
               ) -> list[Admission | None]:
        """Search, decide, write, settle; None for an item to decide again (what it
        duplicated lost a race and is gone)."""
        clock, already, found, pending = self._search(ids, rows)
        # An id twice in one batch (a redelivery) is decided once: the later ones "already".
        first = {item_id: i for i, item_id in reversed(list(enumerate(ids)))}
        fresh = [i for i, seen in enumerate(already) if not seen and first[ids[i]] == i]
        decisions = decide(rows[fresh], [ids[i] for i in fresh], [found[i] for i in fresh],
                           self.settings.threshold)
        out: list[Admission | None] = [Admission(keep=True, already=True)] * len(ids)
        kept: dict[str, np.ndarray] = {}
        for i, decision in zip(fresh, decisions, strict=True):
            out[i] = Admission(keep=decision.duplicate_of is None,
                               duplicate_of=decision.duplicate_of,
                               similarity=decision.similarity)
            if decision.duplicate_of is None:
                kept[ids[i]] = rows[i]
        lost = self._write_and_settle(clock, kept, holds) if kept else {}
        if lost:
            self.counts["race_lost"] += len(lost)
        for i, item_id in enumerate(ids):
            if item_id in lost:
                winner, cos = lost[item_id]
                out[i] = Admission(keep=False, duplicate_of=winner, similarity=cos)
        # A duplicate must name an item that stays: not one of ours that lost, and not one
        # another worker is still settling until it is settled (kept, or gone: decide again).
        theirs = {a.duplicate_of for a in out if a is not None
                  and a.duplicate_of in pending and a.duplicate_of not in kept}
        theirs |= {winner for winner, _ in lost.values()}
        # Likewise an id "already" admitted by a worker that has not settled it yet.
        theirs |= {ids[i] for i, seen in enumerate(already) if seen and ids[i] in pending}
        gone = set(lost) | self._wait_settled(theirs)
        return [None if a is not None and (a.duplicate_of in gone
                                           or (a.already and ids[i] in gone)) else a
                for i, a in enumerate(out)]

    def _search(self, ids: list[str], rows: np.ndarray
                ) -> tuple[bytes, list[bool], list[dict[str, np.ndarray]], set[str]]:
        """The clock, then per item: already admitted? and its candidates' FP32 vectors;
        also which candidates are still being settled by their worker."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.clock_key)
        for item_id, row in zip(ids, rows, strict=True):
            pipe.execute_command("VISMEMBER", self.key, item_id)
            pipe.execute_command("VSIM", self.key, "FP32", row.tobytes(), "COUNT",
                                 self.settings.neighbours, *self._vsim_mode)
        replies = pipe.execute()
        clock = replies[0] or b"0"
        already = [bool(r) for r in replies[1::2]]
        hits = [[text_of(h) for h in (r or [])] for r in replies[2::2]]
        wanted = sorted({h for row_hits in hits for h in row_hits})
        asked = sorted(set(wanted) | {i for i, seen in zip(ids, already, strict=True) if seen})
        if not asked:
            return clock, already, [{} for _ in ids], set()
        pipe = self.client.pipeline(transaction=False)
        if wanted:
            pipe.hmget(self.vectors_key, wanted)
        pipe.execute_command("SMISMEMBER", self.pending_key, *asked)
        replies = pipe.execute()
        flags = replies[-1]
        stored = dict(zip(wanted, replies[0] if wanted else [], strict=True))
        pending = {h for h, flag in zip(asked, flags, strict=True) if flag}
        # A hit without its FP32 vector is being removed (race loser, aged out): skip it.
        dim = rows.shape[1]
        found = [{h: vector_of(stored[h], dim) for h in row_hits if stored[h] is not None}
                 for row_hits in hits]
        return clock, already, found, pending

    def _write_and_settle(self, clock: bytes, kept: dict[str, np.ndarray],
                          holds: list[float]) -> dict[str, tuple[str, float]]:
        """Write the kept items, register them, and remove those that lost a race; the
        losers: id → (winner, cosine)."""
        quant = QUANTIZATION[self.settings.quantization]
        pipe = self.client.pipeline(transaction=False)
        # Pending and the FP32 vector first: an element visible in the set always has its
        # vector, and others wait for its fate before naming it as an original.
        pipe.execute_command("SADD", self.pending_key, *kept)
        precision = self.settings.vector_precision
        pipe.hset(self.vectors_key, mapping={k: pack(v, precision) for k, v in kept.items()})
        for item_id, row in kept.items():
            pipe.execute_command("VADD", self.key, "FP32", row.tobytes(), item_id,
                                 *self._vadd_mode, quant, "EF", self.settings.build_ef,
                                 "M", self.settings.links)
        pipe.execute()
        t0 = time.perf_counter()
        reply = self._register(keys=[self.log_key, self.clock_key, self.vectors_key],
                               args=[text_of(clock), *kept])
        holds.append(time.perf_counter() - t0)
        # Not our own writes; an id we kept that another worker wrote too is the same event.
        dim = len(next(iter(kept.values())))
        window = {text_of(i): vector_of(v, dim)
                  for i, v in zip(reply[::2], reply[1::2], strict=True)
                  if v is not None and text_of(i) not in kept}
        lost = settle(kept, window, self.settings.threshold)
        pipe = self.client.pipeline(transaction=False)
        if lost:
            self._removal(pipe, list(lost))
        pipe.execute_command("SREM", self.pending_key, *kept)  # settled: kept or removed
        pipe.execute()
        return lost

    def _wait_settled(self, ids: set[str]) -> set[str]:
        """Wait (at most ``settle_wait_s``) until no id is pending; the ids gone by then
        (they lost a race). One still pending past the wait counts as kept, and is no
        longer pending (its worker died after writing it: a replay of it finds it
        ``already`` admitted)."""
        order = sorted(ids)
        deadline = time.monotonic() + self.settings.settle_wait_s
        while order:
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command("SMISMEMBER", self.pending_key, *order)
            pipe.hmget(self.vectors_key, order)
            flags, blobs = pipe.execute()
            gone = {i for i, blob in zip(order, blobs, strict=True) if blob is None}
            if not any(flags):
                return gone
            if time.monotonic() > deadline:
                # Settle it for the dead worker, so later copies do not wait on it again.
                stale = [i for i, flag in zip(order, flags, strict=True) if flag]
                self.client.execute_command("SREM", self.pending_key, *stale)
                self.counts["stale_pending"] += len(stale)
                return gone
            time.sleep(SETTLE_POLL_S)
        return set()

    def _trim(self, holds: list[float]) -> None:
        """Remove what is past ``dedup.horizon`` (oldest first, at most evict_per_call)."""
        horizon = self.settings.horizon
        if not horizon.items and not horizon.age_s:
            return
        t0 = time.perf_counter()
        due = [text_of(i) for i in self._due(keys=[self.log_key], args=[
            horizon.items, int(horizon.age_s * 1e6), horizon.evict_per_call])]
        holds.append(time.perf_counter() - t0)
        if due:
            pipe = self.client.pipeline(transaction=False)
            self._removal(pipe, due)
            self.counts["aged_out"] += int(pipe.execute()[len(due)])

    def _removal(self, pipe: Any, ids: list[str]) -> None:
        """Queue taking ids out of the set, then the log and vectors (in that order, so a
        crash between leaves them to be removed again); the ``ZREM`` reply (how many this
        call took off the log) follows the ``len(ids)`` ``VREM`` replies."""
        for item_id in ids:
            pipe.execute_command("VREM", self.key, item_id)
        # As raw commands: redis-py's cluster pipeline refuses its multi-key methods.
        pipe.execute_command("ZREM", self.log_key, *ids)
        pipe.execute_command("HDEL", self.vectors_key, *ids)
        pipe.execute_command("SREM", self.pending_key, *ids)

    @property
    def longest_hold_s(self) -> float:
        """The longest atomic server call (the registration or trim script's round trip,
        an upper bound on its hold) of the last ``HOLD_WINDOW`` admissions (0 before)."""
        return max(self._recent_holds_s, default=0.0)

    def size(self) -> int:
        """Elements in the set (``VCARD``; 0 when it does not exist yet)."""
        return int(self.client.execute_command("VCARD", self.key))

    def dim(self) -> int | None:
        """The set's vector dimension (``VDIM``; None when it does not exist yet)."""
        try:
            return int(self.client.execute_command("VDIM", self.key))
        except redis.ResponseError:
            return None

    def memory_bytes(self) -> int:
        """Bytes the index takes in Redis: the set, the FP32 vectors and the log
        (``MEMORY USAGE``; 0 when nothing exists yet)."""
        return sum(int(self.client.memory_usage(key) or 0)
                   for key in (self.key, self.vectors_key, self.log_key))

    def clear(self) -> None:
        """Drop the whole index (tests, ``sluice`` reset)."""
        for key in (self.key, self.vectors_key, self.log_key, self.clock_key,
                    self.pending_key):
            self.client.delete(key)


#: How ``dedup.vector_precision`` stores a vector beside the set.
PRECISION_DTYPE = {"fp32": "<f4", "fp16": "<f2"}


def stored_rows(vectors: np.ndarray, precision: str) -> np.ndarray:
    """``fp32_rows`` rounded to what the index keeps: under fp16 an item is searched,
    written and compared as its half-precision vector, so a pair is decided alike
    whichever of the two came first."""
    rows = fp32_rows(vectors)
    if precision == "fp32":
        return rows
    return np.ascontiguousarray(rows.astype(PRECISION_DTYPE[precision]).astype("<f4"))


def pack(row: np.ndarray, precision: str) -> bytes:
    """A row as kept in the vectors hash."""
    return row.astype(PRECISION_DTYPE[precision]).tobytes()


def fp32_rows(vectors: np.ndarray) -> np.ndarray:
    """The vectors as a C-contiguous little-endian FP32 matrix (``VADD``/``VSIM … FP32``)."""
    array = np.ascontiguousarray(vectors, dtype="<f4")
    if array.ndim != 2:
        raise VectorIndexError(f"vectors must be a 2-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise VectorIndexError("vectors contain NaN or infinity")
    return array


def vector_of(blob: bytes, dim: int) -> np.ndarray:
    """A vector of the vectors hash as an FP32 row; fp32 and fp16 ones are told apart by
    their length, so an index keeps working across a change of ``vector_precision``."""
    dtype = "<f2" if len(blob) == 2 * dim else "<f4"
    return np.frombuffer(blob, dtype=dtype).astype(np.float32, copy=False)


def text_of(value: Any) -> str:
    """A Redis reply value (bytes or not) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
