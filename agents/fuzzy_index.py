"""The fuzzy (near-duplicate) index: MinHash over shingles, LSH bands shared through Redis.

One index class, two configurations (``agents.shingling``): ``WORDS`` shingles every
record's words (``fuzzy``); ``CODE_TOKENS`` shingles CODE records' identifier-normalized
token streams (``agents.code_tokens``; ``fuzzy.code``), under its own key prefix. Each is
its own step (``FuzzyDedup``, ``CodeFuzzyDedup`` in ``agents.fuzzy``), and a rejection's
detail names the method. Signatures come from ``agents.minhash`` (datasketch's ``affine32``
MinHash, vectorized).

The index is our own small key layout rather than ``MinHashLSH`` with datasketch's Redis
storage. That storage works (two instances on one Redis see each other's inserts) but costs
one round trip per band per query (measured ≈ 470 query+insert/s on the stdlib, before any
verification), opens a connection pool per band, and keeps no signatures to verify
candidates with. Here a batch takes three round trips: one pipeline for replays and LSH
candidates, one fetch of candidate signatures, one script that inserts the admitted items
(with a horizon, one more first, and a removal when something is due: see below). The
scripts are in ``agents.fuzzy_scripts``.

Keys, under ``agents.keys.lsh_prefix`` (one Redis Cluster hash tag per namespace's index,
so the insert script may touch all its keys)::

    <prefix>:meta           hash  num_perm, bands, rows, shingle_words (words) or
                                  shingle_tokens (code), scheme (with the tokenizer)
    <prefix>:sig            hash  id -> signature (num_perm little-endian uint32) + seq
    <prefix>:seq            int   insertion counter
    <prefix>:order          zset  id -> insertion time (the server's clock in µs, forced to
                                  increase: the same order as seq), what the horizon trims
    <prefix>:band:{i}:{h}   set   ids whose band i hashes to h

Horizon (``dedup.horizon``, the same settings as the semantic index's): before each
``check_and_insert`` the items past the count (``items``) or age (``age_s``) limit, oldest
first and at most ``evict_per_call`` of them, leave the index — signature, band
memberships and order entry in one transaction (a short read-only script finds them and
their signatures; the band keys are computed from the signatures, as on insert). The index
may exceed ``items`` by one call's admissions; an item that aged out no longer blocks a
copy, and ``counts["aged_out"]`` counts them. The order is kept with or without a horizon,
so a horizon set later on a running namespace covers every item inserted since.

Races: two workers may check and insert near-copies of each other at the same time. The
insert script gives every insert a sequence number and, in the same atomic step, returns
what now shares a band with it; an item that finds a verified near-copy inserted before it
(a lower sequence number) that it had not seen when checking loses: it is removed again and
reported as a duplicate. At least one of two concurrent inserts always sees the other, and
both agree on the order, so the earlier-inserted wins and two near-copies sharing a band are
never both admitted. A duplicate names the *earliest* indexed item it reaches the threshold
with (``agents.near_match.earliest_match``), not the most similar: a loser is only ever a
later insert than its winner, so a third item that sees both names the winner, and its
replay names the same one (the most-similar rule once named a loser first and the winner on
the replay). An item of the loser's own batch, decided a duplicate of it before the race was
known, names the winner instead when it reaches the threshold with it too, as its replay
would. Rare leftovers, accepted: a third item that reaches the threshold with the loser but
not with the winner, seen while the loser was briefly in the index, keeps ``duplicate_of``
pointing at it; a crash between the insert and the removal leaves the loser admitted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import redis
from datasketch import MinHashLSH

from agents import fuzzy_scripts
from agents.code_tokens import CodeDoc
from agents.config import CodeFuzzySettings, FuzzySettings, HorizonSettings
from agents.minhash import _SHINGLE_BASE, SCHEME, SEED, MinHasher, _fmix64, jaccard
from agents.near_match import FuzzyDecision, Stored, earliest_match
from agents.shingling import WORDS, Shingling
from schemas.errors import SluiceError

DEFAULT_WEIGHTS = (0.05, 0.95)
"""False-positive / false-negative weights for choosing bands × rows (datasketch's optimum).
Candidates are verified against stored signatures, so false positives cost only a fetch:
at threshold 0.8 and 128 permutations this gives 16 bands of 8 rows, which finds a pair at
Jaccard 0.8 with probability 0.95 (0.99 at 0.85), where equal weights (9 × 13) find 0.40."""


#: The settings of one layer: ``fuzzy`` (words) or ``fuzzy.code`` (code tokens).
LayerSettings = FuzzySettings | CodeFuzzySettings


class FuzzyError(SluiceError):
    """The fuzzy index could not be used (Redis unreachable, incompatible namespace)."""


_REPLAYED = FuzzyDecision(True, outcome="replayed")
_SKIPPED = FuzzyDecision(True, outcome="skipped")
_ADMITTED = FuzzyDecision(True)
_CLEAR = FuzzyDecision(True, outcome="clear")


# -- the shared index ----------------------------------------------------------------------


class NearIndex(Protocol):
    """Checks (id, text) pairs against earlier ones and admits the new ones."""

    def check_and_insert(self, items: Sequence[tuple[str, str]]) -> list[FuzzyDecision]: ...
    def remove(self, ids: Sequence[str]) -> None: ...


class CodeNearIndex(Protocol):
    """Checks (id, code document) pairs against earlier ones and admits the new ones."""

    def check_and_insert(self, items: Sequence[tuple[str, CodeDoc]]) -> list[FuzzyDecision]:
        ...
    def remove(self, ids: Sequence[str]) -> None: ...


class FuzzyIndex:
    """Near-duplicate detection against a MinHash-LSH index in Redis, shared by workers.

    ``redis_or_url`` is a ``redis.Redis`` returning bytes (``streams.connections.redis_client``)
    or a URL. The first index on a namespace fixes its bands and rows in the ``meta`` hash;
    later ones adopt them, and refuse a namespace built with another ``num_perm``, shingle
    size or tokenizer (its signatures would not compare). ``shingling`` chooses what is
    shingled and where the index lives: ``WORDS`` (``settings`` is ``fuzzy``) or
    ``CODE_TOKENS`` (``settings`` is ``fuzzy.code``). ``horizon`` (``dedup.horizon``)
    bounds what it keeps (see the module doc); None or zero limits: everything is kept.
    """

    def __init__(
        self,
        redis_or_url: redis.Redis | str,
        namespace: str,
        settings: LayerSettings,
        *,
        shingling: Shingling = WORDS,
        weights: tuple[float, float] = DEFAULT_WEIGHTS,
        horizon: HorizonSettings | None = None,
    ) -> None:
        if isinstance(redis_or_url, str):
            redis_or_url = redis.Redis.from_url(redis_or_url)
        if redis_or_url.get_connection_kwargs().get("decode_responses"):
            raise FuzzyError("FuzzyIndex needs a Redis client with decode_responses=False")
        self.redis = redis_or_url
        self.settings = settings
        self.shingling = shingling
        self.prefix = shingling.prefix(namespace)
        self.hasher = MinHasher(settings.num_perm, settings.shingle)
        params = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm,
                            weights=weights)
        self.bands, self.rows = self._agree_meta(params.b, params.r)
        self._sig_key = f"{self.prefix}:sig"
        self._order_key = f"{self.prefix}:order"
        self._sig_bytes = 4 * settings.num_perm
        self._insert = self.redis.register_script(fuzzy_scripts.INSERT)
        self.horizon = horizon
        self._due = self.redis.register_script(fuzzy_scripts.DUE)
        #: ``aged_out``: items the horizon removed through this instance.
        self.counts: Counter[str] = Counter()

    def _agree_meta(self, bands: int, rows: int) -> tuple[int, int]:
        wanted: dict[str, str | int] = {
            "num_perm": self.settings.num_perm,
            self.shingling.size_field: self.settings.shingle,
            "scheme": f"{SCHEME}/seed={SEED}/{self.shingling.tokenizer}",
            "bands": bands,
            "rows": rows,
        }
        key = f"{self.prefix}:meta"
        try:
            pipe = self.redis.pipeline(transaction=True)
            for field, value in wanted.items():
                pipe.hsetnx(key, field, value)
            pipe.hgetall(key)
            stored = {k.decode(): v.decode() for k, v in pipe.execute()[-1].items()}
        except redis.RedisError as exc:
            raise FuzzyError(f"fuzzy index {key}: {exc}") from exc
        for field in ("num_perm", self.shingling.size_field, "scheme"):
            if stored[field] != str(wanted[field]):
                raise FuzzyError(
                    f"fuzzy index {key} was built with {field}={stored[field]}, "
                    f"not {wanted[field]}: use another namespace or drop this one"
                )
        return int(stored["bands"]), int(stored["rows"])

    def band_keys(self, signatures: np.ndarray) -> list[list[str]]:
        """The Redis set of each LSH band, for each row of a (n, num_perm) signature array."""
        rows = signatures[:, : self.bands * self.rows].reshape(len(signatures), self.bands,
                                                                self.rows)
        # A 64-bit mix of each band's minima, for the whole batch at once; a collision only
        # adds a candidate, which the signature check then discards.
        acc = np.zeros(rows.shape[:2], dtype=np.uint64)
        for k in range(self.rows):
            acc = acc * _SHINGLE_BASE + rows[:, :, k].astype(np.uint64)
        digests = _fmix64(acc).tolist()
        return [[f"{self.prefix}:band:{i}:{h:016x}" for i, h in enumerate(row)]
                for row in digests]

    def check_and_insert(self, items: Sequence[tuple[str, str]] | Sequence[tuple[str, CodeDoc]]
                         ) -> list[FuzzyDecision]:
        """Decide each (id, document), in input order, and admit the new ones into the index.

        A document is a text or a ``CodeDoc``, shingled as the index's ``shingling`` says.

        An item is a duplicate when its estimated Jaccard with an earlier item — already in
        the index, or earlier in this batch — reaches the threshold (LSH finds candidates,
        stored signatures verify them). An id already in the index is ``replayed``, and an
        id repeated in the batch gets the decision of its first occurrence.
        """
        if not self.settings.enabled:
            return [_SKIPPED] * len(items)
        if not items:  # a micro-batch without CODE records reaches the code layer empty
            return []
        try:
            self._trim()
            return self._check_and_insert(items)
        except redis.RedisError as exc:
            raise FuzzyError(f"fuzzy index {self.prefix}: {exc}") from exc

    def _check_and_insert(
        self, items: Sequence[tuple[str, str]] | Sequence[tuple[str, CodeDoc]]
    ) -> list[FuzzyDecision]:
        ids = [item_id for item_id, _ in items]
        sigs = [self.hasher.from_hashes(self.shingling.hashes(self.hasher, doc))
                for _, doc in items]
        first: dict[str, int] = {}
        for j, item_id in enumerate(ids):
            first.setdefault(item_id, j)
        todo = [j for j in first.values() if sigs[j] is not None]
        matrix = np.array([sigs[j] for j in todo], dtype=np.uint32)
        matrix = matrix.reshape(len(todo), self.settings.num_perm)
        keys = dict(zip(todo, self.band_keys(matrix), strict=True))

        # Round trip 1: which ids are already admitted, and the LSH candidates of each item.
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self._sig_key, list(first))
        for j in todo:
            # As a raw command: redis-py's cluster pipeline refuses its multi-key methods
            # even when, as here, every key shares one hash tag (one slot).
            pipe.execute_command("SUNION", *keys[j])
        present, *unions = pipe.execute()
        admitted = {i for i, value in zip(first, present, strict=True) if value is not None}
        seen = {j: {m.decode() for m in union} for j, union in zip(todo, unions, strict=True)}

        # Round trip 2: the signatures of the candidates, to verify them.
        stored = self._fetch(set().union(*seen.values()) if seen else set())

        decisions: dict[int, FuzzyDecision] = {}
        batch = np.empty((len(todo), self.settings.num_perm), dtype=np.uint32)
        batch_ids: list[str] = []
        for j in first.values():
            sig = sigs[j]
            if ids[j] in admitted:
                decisions[j] = _REPLAYED
            elif sig is None:
                decisions[j] = _SKIPPED
            else:
                dup = self._best_match(sig, seen[j], stored, batch[: len(batch_ids)], batch_ids)
                if dup is not None:
                    decisions[j] = dup
                else:
                    decisions[j] = _ADMITTED
                    batch[len(batch_ids)] = sig
                    batch_ids.append(ids[j])

        if batch_ids:
            decisions.update(self._insert_admitted(ids, sigs, keys, seen, decisions, batch_ids))
        return [decisions[first[item_id]] for item_id in ids]

    def _name_winners(self, decisions: dict[int, FuzzyDecision],
                      changed: dict[int, FuzzyDecision], ids: list[str],
                      sigs: list[np.ndarray | None], stored: Mapping[str, Stored]
                      ) -> dict[int, FuzzyDecision]:
        """A duplicate of an item of this batch that then lost the insert race names the
        loser's winner instead, when it reaches the threshold with it too: the loser left
        the index, so the winner is what the duplicate's replay finds. (A winner is never
        an item of this batch: a loser gives way only to items inserted by others, whose
        signatures ``stored`` holds already.)"""
        winner_of: dict[str | None, str] = {
            ids[j]: d.duplicate_of for j, d in changed.items() if d.duplicate_of is not None}
        renamed: dict[int, FuzzyDecision] = {}
        for j, decision in decisions.items():
            winner = winner_of.get(decision.duplicate_of)
            sig = sigs[j]
            if j in changed or winner is None or winner not in stored or sig is None:
                continue
            sim = jaccard(sig, stored[winner].signature)
            if sim >= self.settings.threshold:
                renamed[j] = FuzzyDecision(False, winner, sim, "duplicate")
        return renamed

    def check(self, items: Sequence[tuple[str, str]] | Sequence[tuple[str, CodeDoc]]
              ) -> list[FuzzyDecision]:
        """Decide each (id, document) against what the index holds, writing nothing: how a
        read-only index (``agents.decontaminate``'s protected documents) is used. No replay
        rule and no comparison inside the batch; ``clear`` when nothing matched."""
        if not self.settings.enabled:
            return [_SKIPPED] * len(items)
        try:
            sigs = [self.hasher.from_hashes(self.shingling.hashes(self.hasher, doc))
                    for _, doc in items]
            todo = [j for j, sig in enumerate(sigs) if sig is not None]
            matrix = np.array([sigs[j] for j in todo], dtype=np.uint32)
            keys = self.band_keys(matrix.reshape(len(todo), self.settings.num_perm))
            pipe = self.redis.pipeline(transaction=False)
            for band in keys:
                pipe.execute_command("SUNION", *band)
            seen = {j: {m.decode() for m in union}
                    for j, union in zip(todo, pipe.execute() if todo else [], strict=True)}
            stored = self._fetch(set().union(*seen.values()) if seen else set())
        except redis.RedisError as exc:
            raise FuzzyError(f"fuzzy index {self.prefix}: {exc}") from exc
        out = []
        for j, sig in enumerate(sigs):
            if sig is None:
                out.append(_SKIPPED)
                continue
            dup = self._best_match(sig, seen[j], stored, np.empty((0, 0)), [])
            out.append(dup if dup is not None else _CLEAR)
        return out

    def _fetch(self, ids: set[str]) -> dict[str, Stored]:
        if not ids:
            return {}
        order = sorted(ids)
        values = self.redis.hmget(self._sig_key, order)
        out = {}
        for item_id, value in zip(order, values, strict=True):
            if isinstance(value, bytes):  # None: removed since it was listed in a band
                sig = np.frombuffer(value[: self._sig_bytes], dtype="<u4").astype(np.uint32)
                out[item_id] = Stored(sig, int(value[self._sig_bytes :]))
        return out

    def _best_match(
        self,
        sig: np.ndarray,
        candidates: set[str],
        stored: dict[str, Stored],
        batch: np.ndarray,
        batch_ids: list[str],
    ) -> FuzzyDecision | None:
        """The earliest earlier item at or above the threshold (``earliest_match``)."""
        found = earliest_match(sig, {c: stored[c] for c in candidates if c in stored},
                               batch, batch_ids, self.settings.threshold)
        if found is None:
            return None
        return FuzzyDecision(False, found[0], found[1], "duplicate")

    def _insert_admitted(
        self,
        ids: list[str],
        sigs: list[np.ndarray | None],
        keys: dict[int, list[str]],
        seen: dict[int, set[str]],
        decisions: dict[int, FuzzyDecision],
        batch_ids: list[str],
    ) -> dict[int, FuzzyDecision]:
        """Round trip 3: insert the admitted items, then settle races (see module doc)."""
        order = [j for j, d in decisions.items() if d is _ADMITTED]
        script_keys = [self._sig_key, f"{self.prefix}:seq", self._order_key]
        args: list[str | bytes | int] = [self.bands]
        for j in order:
            script_keys.extend(keys[j])
            sig = sigs[j]
            assert sig is not None
            args.extend([ids[j], sig.astype("<u4").tobytes()])
        replies = self._insert(keys=script_keys, args=args)

        changed: dict[int, FuzzyDecision] = {}
        mine = set(batch_ids)
        fresh: dict[int, tuple[int, set[str]]] = {}
        for j, (seq, members) in zip(order, replies, strict=True):
            if seq == 0:  # another worker admitted this very id meanwhile
                changed[j] = _REPLAYED
                continue
            new = {m.decode() for m in members} - seen[j] - mine
            if new:
                fresh[j] = (int(seq), new)
        if not fresh:
            return changed
        stored = self._fetch(set().union(*(new for _, new in fresh.values())))
        losers = []
        for j, (seq, new) in fresh.items():
            sig = sigs[j]
            assert sig is not None
            earlier = {c for c in new if c in stored and stored[c].seq < seq}
            dup = self._best_match(sig, earlier, stored, np.empty((0, 0)), [])
            if dup is not None:
                changed[j] = dup
                losers.append(j)
        if losers:
            pipe = self.redis.pipeline(transaction=True)
            self._removal(pipe, [(ids[j], keys[j]) for j in losers])
            pipe.execute()
            changed.update(self._name_winners(decisions, changed, ids, sigs, stored))
        return changed

    def _trim(self) -> None:
        """Remove what is past the horizon (oldest first, at most ``evict_per_call``)."""
        horizon = self.horizon
        if horizon is None or not (horizon.items or horizon.age_s):
            return
        reply = self._due(keys=[self._order_key, self._sig_key], args=[
            horizon.items, int(horizon.age_s * 1e6), horizon.evict_per_call])
        if not reply:
            return
        due = [_text(i) for i in reply[::2]]
        # An id without a signature was removed meanwhile: only its order entry is left.
        found = [(i, blob) for i, blob in zip(due, reply[1::2], strict=True)
                 if isinstance(blob, bytes)]
        matrix = np.array([np.frombuffer(blob[: self._sig_bytes], dtype="<u4")
                           for _, blob in found], dtype=np.uint32)
        bands = self.band_keys(matrix.reshape(len(found), self.settings.num_perm))
        pipe = self.redis.pipeline(transaction=True)
        self._removal(pipe, [(i, keys) for (i, _), keys in zip(found, bands, strict=True)],
                      order=due)
        # The ZREM's reply (how many this call took off the order) counts them: two workers
        # trimming the same items count each once.
        self.counts["aged_out"] += int(pipe.execute()[-1])

    def _removal(self, pipe: Any, items: Sequence[tuple[str, list[str]]], *,
                 order: Sequence[str] | None = None) -> None:
        """Queue taking each (id, its band keys) out of the signatures and bands, then
        ``order`` (default: those ids) out of the order, last: its reply comes last."""
        for item_id, keys in items:
            pipe.hdel(self._sig_key, item_id)
            for key in keys:
                pipe.srem(key, item_id)
        ids = list(order) if order is not None else [i for i, _ in items]
        if ids:
            # As a raw command: redis-py's cluster pipeline refuses its multi-key methods.
            pipe.execute_command("ZREM", self._order_key, *ids)

    def remove(self, ids: Sequence[str]) -> None:
        """Take ``ids`` out of the index (signature, bands and order), e.g. items admitted
        here that a later step rejected; ids not in the index are ignored."""
        stored = self._fetch(set(ids))
        if not stored:
            return
        order = sorted(stored)
        matrix = np.array([stored[i].signature for i in order], dtype=np.uint32)
        pipe = self.redis.pipeline(transaction=True)
        self._removal(pipe, list(zip(order, self.band_keys(matrix), strict=True)))
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise FuzzyError(f"fuzzy index {self.prefix}: {exc}") from exc

    def __contains__(self, item_id: str) -> bool:
        return bool(self.redis.hexists(self._sig_key, item_id))

    def __len__(self) -> int:
        return int(self.redis.hlen(self._sig_key))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
