"""Exact dedup: the first event id to claim a normalized content digest keeps it.

The store is ``ExactClaims`` (``SET digest id NX GET`` in Redis, one round trip per batch);
the decision (``ExactDedup``) is pure given the owners the store returns, so it is unit
tested with any ``Claims`` object.

Horizon (``dedup.horizon``): with ``age_s``, every claim and first-digest key is written
with that TTL (``SET … NX GET PX``, one command as before), so Redis expires it on its own;
a claim is not renewed by the copies it rejects, so the age counts from the first claim,
as in the other layers. After it, a copy is admitted again, and a new version of an id
seen longer ago is taken for a first version. ``items`` does not bound these keys: a count
would need one ordered log of every digest (one hot key on a Redis Cluster, where the keys
themselves spread over every slot), a second write per claim and a trim that deletes keys
across slots, where a TTL is free and native. On an endless stream set ``age_s`` for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import redis

from agents.config import HorizonSettings
from agents.keys import exact_key, first_digest_key
from agents.step import Item, Outcome, Step, rejection


class Claims(Protocol):
    """Claims digests: returns, per (digest, id), the id that owns the digest."""

    def claim(self, pairs: Sequence[tuple[str, str]]) -> list[str]: ...
    def first_digests(self, pairs: Sequence[tuple[str, str]]) -> list[str]: ...


class ExactClaims:
    """Digest claims in Redis, shared by every worker of a namespace; with a ``horizon``
    whose ``age_s`` is set, claims and first digests expire that long after they are made."""

    def __init__(self, client: redis.Redis, namespace: str,
                 horizon: HorizonSettings | None = None) -> None:
        self.redis = client
        self.namespace = namespace
        self.horizon = horizon
        # PX in whole milliseconds, at least 1 (0 would be refused): None, no expiry.
        self._px = (max(1, round(horizon.age_s * 1000))
                    if horizon is not None and horizon.age_s else None)

    def claim(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """``SET NX GET`` each digest: the first id to claim it keeps it; the same id
        again (a replay) gets itself back. With an age horizon the claim expires (``PX``)."""
        pipe = self.redis.pipeline(transaction=False)
        for digest, event_id in pairs:
            pipe.set(exact_key(self.namespace, digest), event_id, nx=True, get=True,
                     px=self._px)
        owners = []
        for (_, event_id), owner in zip(pairs, pipe.execute(), strict=True):
            if owner is None:
                owners.append(event_id)
            else:
                owners.append(owner.decode() if isinstance(owner, bytes) else str(owner))
        return owners

    def first_digests(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """The first digest ever seen under each (id, digest)'s id (``SET NX GET``: the
        first one sticks), so a later version of an id is recognized as such, replays of
        either version alike (``agents.identity``)."""
        pipe = self.redis.pipeline(transaction=False)
        for event_id, digest in pairs:
            pipe.set(first_digest_key(self.namespace, event_id), digest, nx=True, get=True,
                     px=self._px)
        firsts = []
        for (_, digest), first in zip(pairs, pipe.execute(), strict=True):
            firsts.append(digest if first is None else
                          first.decode() if isinstance(first, bytes) else str(first))
        return firsts

    def release(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Give up each (digest, id) claim that id still holds (an event that failed after
        claiming never becomes a sample, so a later copy must not be its duplicate)."""
        # Compare and delete in one step: never drop a claim another id holds.
        release = self.redis.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
            "end return 0")
        for digest, event_id in pairs:
            release(keys=[exact_key(self.namespace, digest)], args=[event_id])


class ExactDedup(Step):
    """Candidates in; the same candidate, or an ``exact_duplicate`` of the digest's owner.

    A candidate whose id was first seen with other content is a later version: it passes
    with ``earlier_digest`` set to that first digest (``agents.identity``).
    """

    name = "exact"
    stage = "ingest"

    def __init__(self, claims: Claims) -> None:
        super().__init__()
        self.claims = claims

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per candidate, in input order."""
        owners = self.claims.claim([(i.record["digest"], i.record["id"]) for i in items])
        firsts = self.claims.first_digests([(i.record["id"], i.record["digest"])
                                            for i in items])
        outcomes = []
        for item, owner, first in zip(items, owners, firsts, strict=True):
            cand = item.record
            if owner == cand["id"]:
                if first != cand["digest"]:
                    cand = {**cand, "earlier_digest": first}
                outcomes.append(Outcome(cand, rejected=False))
            else:
                outcomes.append(rejection(self.stage, "exact_duplicate", item.coords,
                                          event=dict(cand), duplicate_of=owner, similarity=1.0))
        return outcomes
