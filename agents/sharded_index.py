"""The semantic index split by semantic locality (``dedup.shards`` > 1): one vector set per
coarse centroid, each under its own hash tag, admitted with ``agents.index``'s protocol
extended across shards.

Routing (``agents.shards.route``, float64): an item's **home** is the shard of its nearest
centroid, its **probes** the ``dedup.probe`` nearest shards (home first). Each shard is a
``VectorIndex`` of its own keys (``agents.keys.shard_prefix``: set, FP32 vectors, log,
clock, pending) plus a **shadow log** (``…:shadows``, a zset of ``"<home>:<id>"``): the
kept items that probe this shard from another home, registered on this shard's clock.

``ShardedIndex.admit`` takes a micro-batch in a few short round trips:

1. **clocks**: every probed shard's clock, in a round trip of its own, before any search
   (on a cluster a pipeline's commands to different nodes are not ordered);
2. **search**: per item and probed shard ``VISMEMBER`` (an id that is a member of any of
   them is ``already`` admitted) and ``VSIM``; then the candidates' FP32 vectors and
   which are still pending, from the shards they were found in;
3. **decide** (``agents.shards.decide_routed``): the FP32 cosine to the nearest candidate
   or to an earlier kept item of the batch whose home the item probes, ≥ ``threshold`` →
   a duplicate; else kept;
4. **write**: each kept item to its home shard only (pending, FP32 vector, ``VADD``);
5. **register and settle**: one short script per shard the kept items probe (pipelined,
   one round trip; each touches one slot): it registers the items homed there in the log
   and the others probing it in the shadow log, on that shard's clock, and returns
   what was registered there since step 1 read that clock (a shadow's vector is then read
   from its home). A kept item x gives way to such an item y within ``threshold`` only if
   y's home is among x's probes and the window is that of the pair's shard
   (``agents.shards.pair_shard``: the lower of their homes that both probe);
6. **confirm**, as ``agents.index``: a duplicate of an item still pending waits for it; a
   duplicate of an item that lost is decided again.

What is guaranteed (modulo HNSW recall, as for one set). Write P(x) for x's probes and
h(x) for its home. For two admitted items x, y within ``threshold``:

* never both when h(x) ∈ P(y) and h(y) ∈ P(x) (each could find the other), however they
  race: both registered in their pair's shard D, whose clock orders them; the later one
  either found the earlier in its search (the earlier was written before it registered
  in D, and the later read D's clock before searching the earlier's home) or meets it in
  D's window and gives way; the earlier never gives way to the later in D's window, and
  gives way in no other shard's, so exactly one stays;
* when only h(x) ∈ P(y) (y can find x, x cannot find y): both stay only if y registered
  in h(x) before x did (had x registered there first, y's search would have found x, or
  y would meet x in h(x)'s window and give way): y came first, and x, which came later,
  could not find it. So of two admitted near copies, the later one never probes the
  earlier one's home, which is also all that happens when h(x) ∉ P(y) and h(y) ∉ P(x):
  every miss is a border miss, never a lost race. Sharding trades these for capacity;
  ``bench.index --shards`` measures them.

A replay decides alike: ``already`` if the id is a member of any probed shard; a
duplicate of an item in a shard it probes; an item gives way only to one its search
reaches. Left over, as for one set: a worker that dies between its ``VADD`` and the
registration leaves its items pending (``settle_wait_s``) and out of the logs. Two
workers agree on routing unless two centroids are within ~1e-12 in cosine of an item
(float64).

Centroids live in Redis (``agents.centroid_store.CentroidStore``: one hash per version, a
key naming the version in use); ``sluice shards fit`` writes a new version, ``sluice shards
migrate`` moves the admitted items into it and switches. A worker re-reads the version key
on every call and follows a switch. ``build_vector_index`` refuses ``dedup.shards`` > 1
without centroids, and a shard count that does not match them.

Horizon: each shard trims itself with ``items / shards`` (rounded up) and the same age;
the shadow logs with ``(probes − 1) ×`` that and the same age.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque
from typing import Any

import numpy as np
import redis
from redis.exceptions import NoScriptError

from agents.admission import Decision
from agents.centroid_store import CentroidStore, no_centroids_message
from agents.config import DedupSettings
from agents.horizon import DUE_LUA
from agents.index import (
    HOLD_WINDOW,
    QUANTIZATION,
    Admission,
    VectorIndex,
    VectorIndexError,
    decide_in_rounds,
    pack,
    stored_rows,
    text_of,
    vector_of,
)
from agents.keys import shard_prefix
from agents.shards import (
    Centroids,
    ShardsError,
    WindowItem,
    decide_routed,
    per_shard_items,
    route,
    settle_routed,
    shard_of_member,
)

# KEYS: log, clock, vectors, shadows. ARGV[1]: this shard's clock read before the search;
# ARGV[2]: n; ARGV[3 .. n+2]: the kept ids homed here; the rest: "<home>:<id>" of kept
# items probing this shard from another home. All are registered on this shard's clock
# (max(now µs, last + 1)), then the window: {ids in the log after ARGV[1], each followed by
# its FP32 vector (nil if gone); shadow members after ARGV[1]} (this call's own included).
SHARD_REGISTER_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local homes = tonumber(ARGV[2]) + 2
for i = 3, #ARGV do
  last = math.max(now, last + 1)
  local key = KEYS[4]
  if i <= homes then key = KEYS[1] end
  redis.call('ZADD', key, string.format('%.0f', last), ARGV[i])
end
redis.call('SET', KEYS[2], string.format('%.0f', last))
local window = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  window[#window + 1] = id
  window[#window + 1] = redis.call('HGET', KEYS[3], id)
end
return {window, redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. ARGV[1], '+inf')}
"""


def build_vector_index(client: redis.Redis, namespace: str,
                       settings: DedupSettings) -> VectorIndex | ShardedIndex:
    """The namespace's semantic index as ``dedup.shards`` says: one set (1), or the shards
    of the centroids in use, which must exist and have ``dedup.shards`` rows."""
    store = CentroidStore(client, namespace)
    version = store.current_version()
    if settings.shards == 1:
        if version is not None:
            shards = store.load(version).shards
            raise ShardsError(f"namespace {namespace!r} is sharded ({shards} shards, "
                              f"centroid version {version}): set dedup.shards = {shards}")
        return VectorIndex(client, namespace, settings)
    if version is None:
        latest = store.latest_version()
        if latest:
            raise ShardsError(f"dedup.shards = {settings.shards} but namespace "
                              f"{namespace!r} still uses one vector set: centroid version "
                              f"{latest} is fitted, not in use; move the items into it "
                              "with `sluice shards migrate`")
        raise ShardsError(no_centroids_message(namespace, settings.shards))
    centroids = store.load(version)
    if centroids.shards != settings.shards:
        raise ShardsError(f"dedup.shards = {settings.shards} but namespace {namespace!r} "
                          f"uses centroid version {version} of {centroids.shards} shards: "
                          f"set dedup.shards = {centroids.shards}, or fit and migrate to "
                          f"{settings.shards} shards (`sluice shards fit --shards "
                          f"{settings.shards}`, `sluice shards migrate`)")
    return ShardedIndex(client, namespace, settings, centroids)


class ShardedIndex:
    """Near-duplicate admission over the shards of one centroid version (module doc)."""

    def __init__(self, redis_client: redis.Redis, namespace: str, settings: DedupSettings,
                 centroids: Centroids, *, follow: bool = True) -> None:
        """``follow``: re-read the version in use on every call and switch to it (workers);
        false pins ``centroids`` (a migration filling a version not yet in use)."""
        self.client = redis_client
        self.namespace = namespace
        self.settings = settings
        self.store = CentroidStore(redis_client, namespace)
        self.follow = follow
        self._register = redis_client.register_script(SHARD_REGISTER_LUA)
        self._due = redis_client.register_script(DUE_LUA)
        self._vsim_mode = () if settings.offload else ("NOTHREAD",)
        self._vadd_mode = ("CAS",) if settings.offload else ()
        #: As ``VectorIndex.counts``, over every shard (and every version followed).
        self.counts: Counter[str] = Counter()
        self.last_call_s: float = 0.0
        self.last_hold_s: float = 0.0
        self._recent_holds_s: deque[float] = deque(maxlen=HOLD_WINDOW)
        self._use(centroids)

    def _use(self, centroids: Centroids) -> None:
        """Admit into ``centroids``' shards from now on."""
        self.centroids = centroids
        self.version = centroids.version
        self.probe = min(self.settings.probe, centroids.shards)
        horizon = self.settings.horizon
        per_shard = self.settings.model_copy(update={"horizon": horizon.model_copy(
            update={"items": per_shard_items(horizon.items, centroids.shards)})})
        prefixes = [shard_prefix(self.namespace, centroids.version, s)
                    for s in range(centroids.shards)]
        self.shards = [VectorIndex(self.client, self.namespace, per_shard, prefix=p)
                       for p in prefixes]
        self.shadow_keys = [f"{p}:shadows" for p in prefixes]

    def _follow(self) -> None:
        """Switch to the version in use if a migration changed it."""
        if not self.follow:
            return
        version = self.store.current_version()
        if version is not None and version != self.version:
            self._fold_counts()
            self._use(self.store.load(version))

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
            self._follow()
            if rows.shape[1] != self.centroids.dim:
                raise VectorIndexError(f"vectors of dimension {rows.shape[1]} for centroids "
                                       f"of dimension {self.centroids.dim}")
            self._trim(holds)
            return decide_in_rounds(lambda i, r: self._round(i, r, holds), ids, rows,
                                    self.counts)
        except (redis.RedisError, ShardsError) as exc:
            raise VectorIndexError(f"admission to the {len(self.shards)} shards of "
                                   f"{self.namespace!r} (centroid version {self.version}) "
                                   f"failed: {exc}") from exc
        finally:
            self.last_call_s = time.perf_counter() - started
            self.last_hold_s = max(holds, default=0.0)
            self._recent_holds_s.append(self.last_hold_s)
            self._fold_counts()

    def _round(self, ids: list[str], rows: np.ndarray, holds: list[float]
               ) -> list[Admission | None]:
        """Search, decide, write, settle; None for an item to decide again."""
        probes = route(rows, self.centroids.matrix, self.probe)
        clocks, already, found, pending, where = self._search(ids, rows, probes)
        first = {item_id: i for i, item_id in reversed(list(enumerate(ids)))}
        fresh = [i for i, seen in enumerate(already) if not seen and first[ids[i]] == i]
        decisions: list[Decision] = decide_routed(
            rows[fresh], [ids[i] for i in fresh], [found[i] for i in fresh], probes[fresh],
            self.settings.threshold)
        out: list[Admission | None] = [Admission(keep=True, already=True)] * len(ids)
        kept: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {}
        for i, decision in zip(fresh, decisions, strict=True):
            out[i] = Admission(keep=decision.duplicate_of is None,
                               duplicate_of=decision.duplicate_of,
                               similarity=decision.similarity)
            if decision.duplicate_of is None:
                kept[ids[i]] = (rows[i], tuple(int(s) for s in probes[i]))
        lost, winners = self._write_and_settle(clocks, kept, holds) if kept else ({}, {})
        if lost:
            self.counts["race_lost"] += len(lost)
        for i, item_id in enumerate(ids):
            if item_id in lost:
                winner, cos = lost[item_id]
                out[i] = Admission(keep=False, duplicate_of=winner, similarity=cos)
        # As in VectorIndex._round: a duplicate must name an item that stays; each id is
        # waited for in the shard it lives in.
        theirs: dict[str, int] = {}
        for a in out:
            if a is not None and a.duplicate_of in pending and a.duplicate_of not in kept:
                theirs[a.duplicate_of] = where[a.duplicate_of]
        for winner, _ in lost.values():
            theirs[winner] = winners[winner]
        for i, seen in enumerate(already):
            if seen and ids[i] in pending:
                theirs[ids[i]] = where[ids[i]]
        gone = set(lost) | self._wait_settled(theirs)
        return [None if a is not None and (a.duplicate_of in gone
                                           or (a.already and ids[i] in gone)) else a
                for i, a in enumerate(out)]

    def _search(self, ids: list[str], rows: np.ndarray, probes: np.ndarray
                ) -> tuple[dict[int, bytes], list[bool], list[dict[str, np.ndarray]],
                           set[str], dict[str, int]]:
        """The probed shards' clocks (first, on their own), then per item: already a member
        of a probed shard? and its candidates' FP32 vectors; which candidates are pending;
        and the shard each id was found in."""
        probed = sorted({int(s) for s in probes.flat})
        pipe = self.client.pipeline(transaction=False)
        for s in probed:
            pipe.get(self.shards[s].clock_key)
        clocks = {s: (c or b"0") for s, c in zip(probed, pipe.execute(), strict=True)}
        pipe = self.client.pipeline(transaction=False)
        for item_id, row, own in zip(ids, rows, probes, strict=True):
            for s in own:
                key = self.shards[int(s)].key
                pipe.execute_command("VISMEMBER", key, item_id)
                pipe.execute_command("VSIM", key, "FP32", row.tobytes(), "COUNT",
                                     self.settings.neighbours, *self._vsim_mode)
        replies = iter(pipe.execute())
        already = [False] * len(ids)
        where: dict[str, int] = {}
        hits: list[list[tuple[int, str]]] = [[] for _ in ids]
        for i, (item_id, own) in enumerate(zip(ids, probes, strict=True)):
            for s in map(int, own):
                if next(replies):
                    already[i] = True
                    where[item_id] = s
                for hit in next(replies) or []:
                    hits[i].append((s, text_of(hit)))
                    where.setdefault(text_of(hit), s)
        wanted: dict[int, list[str]] = defaultdict(list)
        for s, hit in sorted({pair for row_hits in hits for pair in row_hits}):
            wanted[s].append(hit)
        asked: dict[int, set[str]] = defaultdict(set)
        for s, names in wanted.items():
            asked[s].update(names)
        for i, seen in enumerate(already):
            if seen:
                asked[where[ids[i]]].add(ids[i])
        if not asked:
            return clocks, already, [{} for _ in ids], set(), where
        pipe = self.client.pipeline(transaction=False)
        order = sorted(asked)
        for s in order:
            if wanted.get(s):
                pipe.hmget(self.shards[s].vectors_key, wanted[s])
            pipe.execute_command("SMISMEMBER", self.shards[s].pending_key, *sorted(asked[s]))
        replies = iter(pipe.execute())
        stored: dict[tuple[int, str], Any] = {}
        pending: set[str] = set()
        for s in order:
            if wanted.get(s):
                stored.update(((s, h), blob) for h, blob in zip(wanted[s], next(replies),
                                                                  strict=True))
            flags = next(replies)
            pending.update(h for h, flag in zip(sorted(asked[s]), flags, strict=True) if flag)
        # A hit without its FP32 vector is being removed (race loser, aged out): skip it.
        dim = rows.shape[1]
        found = [{h: vector_of(stored[s, h], dim) for s, h in row_hits
                  if stored[s, h] is not None}
                 for row_hits in hits]
        return clocks, already, found, pending, where

    def _write_and_settle(self, clocks: dict[int, bytes],
                          kept: dict[str, tuple[np.ndarray, tuple[int, ...]]],
                          holds: list[float]
                          ) -> tuple[dict[str, tuple[str, float]], dict[str, int]]:
        """Write the kept items to their homes, register them in every shard they probe,
        remove those that lost a race; the losers (id → (winner, cosine)) and the shard
        each winner lives in."""
        quant = QUANTIZATION[self.settings.quantization]
        by_home: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
        shadows: dict[int, list[str]] = defaultdict(list)
        for item_id, (row, own) in kept.items():
            by_home[own[0]][item_id] = row
            for s in own[1:]:
                shadows[s].append(f"{own[0]}:{item_id}")
        pipe = self.client.pipeline(transaction=False)
        for home, items in by_home.items():
            shard = self.shards[home]
            # Pending and the FP32 vector first, as in VectorIndex: an element visible in
            # a set always has its vector, and others wait for its fate before naming it.
            pipe.execute_command("SADD", shard.pending_key, *items)
            pipe.hset(shard.vectors_key, mapping={
                k: pack(v, self.settings.vector_precision) for k, v in items.items()})
            for item_id, row in items.items():
                pipe.execute_command("VADD", shard.key, "FP32", row.tobytes(), item_id,
                                     *self._vadd_mode, quant, "EF", self.settings.build_ef,
                                     "M", self.settings.links)
        pipe.execute()
        touched = sorted(set(by_home) | set(shadows))
        calls = []
        for s in touched:
            shard = self.shards[s]
            homed = list(by_home.get(s, {}))
            calls.append(([shard.log_key, shard.clock_key, shard.vectors_key,
                           self.shadow_keys[s]],
                          [text_of(clocks[s]), len(homed), *homed, *shadows.get(s, [])]))
        t0 = time.perf_counter()
        replies = self._register_all(calls)
        holds.append(time.perf_counter() - t0)
        window, lives_in = self._window(touched, replies, kept)
        lost = settle_routed(kept, window, self.settings.threshold)
        pipe = self.client.pipeline(transaction=False)
        for item_id in lost:
            row, own = kept[item_id]
            self.shards[own[0]]._removal(pipe, [item_id])
            for s in own[1:]:
                pipe.execute_command("ZREM", self.shadow_keys[s], f"{own[0]}:{item_id}")
        for home, items in by_home.items():
            pipe.execute_command("SREM", self.shards[home].pending_key, *items)
        pipe.execute()
        return lost, {winner: lives_in[winner] for winner, _ in lost.values()}

    def _register_all(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run the registration script once per shard, all in one pipelined round trip
        (``EVALSHA``; a server that lost the script gets it loaded and that call run
        again: a ``NOSCRIPT`` reply means it did not run)."""
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", self._register.sha, len(keys), *keys, *args)
        replies = pipe.execute(raise_on_error=False)
        out = []
        for (keys, args), reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):
                reply = self._register(keys=keys, args=args)
            elif isinstance(reply, Exception):
                raise reply
            out.append(reply)
        return out

    def _window(self, touched: list[int], replies: list[Any],
                kept: dict[str, tuple[np.ndarray, tuple[int, ...]]]
                ) -> tuple[list[WindowItem], dict[str, int]]:
        """Each shard's race window as ``WindowItem``s (not our own items: an id we kept
        that another worker wrote too is the same event), and the shard each lives in."""
        entries: list[tuple[int, str, np.ndarray]] = []
        dim = self.centroids.dim
        lives_in: dict[str, int] = {}
        remote: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for s, (homes, shadow_members) in zip(touched, replies, strict=True):
            for raw_id, blob in zip(homes[::2], homes[1::2], strict=True):
                item_id = text_of(raw_id)
                if blob is not None and item_id not in kept:
                    entries.append((s, item_id, vector_of(blob, dim)))
                    lives_in[item_id] = s
            for member in shadow_members:
                home, item_id = shard_of_member(text_of(member))
                if item_id not in kept and 0 <= home < len(self.shards):
                    remote[home].append((s, item_id))
        if remote:
            # A shadow's vector lives in its home (gone: it lost a race or aged out).
            homes_order = sorted(remote)
            pipe = self.client.pipeline(transaction=False)
            for home in homes_order:
                pipe.hmget(self.shards[home].vectors_key, [i for _, i in remote[home]])
            for home, blobs in zip(homes_order, pipe.execute(), strict=True):
                for (s, item_id), blob in zip(remote[home], blobs, strict=True):
                    if blob is not None:
                        entries.append((s, item_id, vector_of(blob, dim)))
                        lives_in[item_id] = home
        if not entries:
            return [], lives_in
        routed = route(np.stack([v for _, _, v in entries]), self.centroids.matrix,
                       self.probe)
        window = [WindowItem(s, item_id, vector, tuple(int(p) for p in own))
                  for (s, item_id, vector), own in zip(entries, routed, strict=True)]
        return window, lives_in

    def _wait_settled(self, theirs: dict[str, int]) -> set[str]:
        """``VectorIndex._wait_settled`` in each shard: the ids gone once settled."""
        by_shard: dict[int, set[str]] = defaultdict(set)
        for item_id, s in theirs.items():
            by_shard[s].add(item_id)
        gone: set[str] = set()
        for s in sorted(by_shard):
            gone |= self.shards[s]._wait_settled(by_shard[s])
        return gone

    def _trim(self, holds: list[float]) -> None:
        """Each shard past its share of ``dedup.horizon``, and the shadow logs."""
        horizon = self.settings.horizon
        if not horizon.items and not horizon.age_s:
            return
        for shard in self.shards:
            shard._trim(holds)
        most = per_shard_items(horizon.items, len(self.shards)) * max(self.probe - 1, 0)
        if self.probe == 1:
            return
        for key in self.shadow_keys:
            t0 = time.perf_counter()
            due = self._due(keys=[key], args=[most, int(horizon.age_s * 1e6),
                                              horizon.evict_per_call])
            holds.append(time.perf_counter() - t0)
            if due:
                self.client.execute_command("ZREM", key, *due)

    def _fold_counts(self) -> None:
        """Move the shards' own counts (aged_out, stale_pending) into ``counts``."""
        for shard in self.shards:
            self.counts.update(shard.counts)
            shard.counts.clear()

    @property
    def longest_hold_s(self) -> float:
        """As ``VectorIndex.longest_hold_s``: the longest registration (all shards' scripts
        in one pipelined round trip) or trim round trip of the last admissions."""
        return max(self._recent_holds_s, default=0.0)

    def shard_sizes(self) -> list[int]:
        """Elements in each shard's set."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.shards:
            pipe.execute_command("VCARD", shard.key)
        return [int(n) for n in pipe.execute()]

    def size(self) -> int:
        """Elements in all shards."""
        return sum(self.shard_sizes())

    def memory_bytes(self) -> int:
        """Bytes the index takes in Redis: every shard's keys and its shadow log."""
        return sum(shard.memory_bytes() for shard in self.shards) + sum(
            int(self.client.memory_usage(key) or 0) for key in self.shadow_keys)

    def clear(self) -> None:
        """Drop every shard of this version (tests, a migration's old version)."""
        for shard, key in zip(self.shards, self.shadow_keys, strict=True):
            shard.clear()
            self.client.delete(key)
