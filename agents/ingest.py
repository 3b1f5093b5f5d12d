"""The ingest step: decode → validate → normalize → quality → exact dedup → fuzzy dedup.

Called with a micro-batch of raw messages, it returns one ``Outcome`` per message, in
order: a ``Candidate`` for ``sluice.candidates`` or a ``Rejection``. Used by the Faust
ingest agent and by ``sluice dedup`` alike. Replays are idempotent: a message seen before
gets the same outcome again.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import redis

from agents.fuzzy import FuzzyIndex
from agents.keys import exact_key
from agents.normalize import content_digest, derive_id, normalize
from agents.outcome import Incoming, Outcome, now_ms, rejection
from agents.quality import QualityFilter
from schemas.records import Candidate, RawEvent
from sluice.settings import Settings
from streams.serde import DecodeError, decode_raw_event

UNLABELED = "unlabeled"


class Ingest:
    """Everything before the embedding model; cheap, and spares the model most copies."""

    stage = "ingest"

    def __init__(self, settings: Settings, client: redis.Redis, namespace: str | None = None):
        self.settings = settings
        self.redis = client
        self.namespace = namespace or settings.redis.namespace
        self.quality = QualityFilter(settings.ingest)
        self.fuzzy = (FuzzyIndex(client, self.namespace, settings.fuzzy)
                      if settings.fuzzy.enabled else None)
        #: Seconds spent per sub-step, for the metrics and the benchmark breakdown.
        self.seconds: dict[str, float] = defaultdict(float)

    def process(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """One outcome per message, in input order."""
        outcomes: list[Outcome | None] = [None] * len(batch)
        survivors: list[tuple[int, Candidate]] = []
        tick = time.perf_counter()
        for i, message in enumerate(batch):
            result = self._prepare(message)
            if isinstance(result, Outcome):
                outcomes[i] = result
            else:
                survivors.append((i, result))
        tock = time.perf_counter()
        self.seconds["decode_quality"] += tock - tick
        survivors = self._exact(batch, survivors, outcomes)
        tick = time.perf_counter()
        self.seconds["exact"] += tick - tock
        if self.fuzzy is not None and survivors:
            decisions = self.fuzzy.check_and_insert([(c["id"], c["content"]) for _, c in survivors])
            for (i, cand), decision in zip(survivors, decisions, strict=True):
                if not decision.keep:
                    outcomes[i] = rejection(
                        "fuzzy", "near_duplicate", batch[i].coords, event=dict(cand),
                        duplicate_of=decision.duplicate_of, similarity=decision.similarity,
                        detail=f"estimated Jaccard {decision.similarity:.3f} ≥ "
                               f"{self.settings.fuzzy.threshold}",
                    )
        self.seconds["fuzzy"] += time.perf_counter() - tick
        for i, cand in survivors:
            if outcomes[i] is None:
                outcomes[i] = Outcome(cand, rejected=False)
        return [o for o in outcomes if o is not None]

    def _prepare(self, message: Incoming) -> Candidate | Outcome:
        try:
            event = decode_raw_event(message.value, self.settings.ingest.max_event_bytes)
        except DecodeError as exc:
            return rejection(self.stage, f"invalid:{exc.reason}", message.coords,
                             event_id=_key_text(message.key), detail=exc.detail, raw=message.value)
        content = normalize(event["content"])
        verdict = self.quality.check(content, event["kind"])
        digest = content_digest(content)
        candidate = _candidate(event, content, digest, verdict.score, message)
        if not verdict.passed:
            return rejection(self.stage, verdict.reason or "quality", message.coords,
                             event=dict(candidate), detail=verdict.detail)
        return candidate

    def _exact(self, batch: Sequence[Incoming], survivors: list[tuple[int, Candidate]],
               outcomes: list[Outcome | None]) -> list[tuple[int, Candidate]]:
        if not survivors:
            return survivors
        # SET NX GET: the first id to claim a digest keeps it; the same id again is a replay.
        pipe = self.redis.pipeline(transaction=False)
        for _, cand in survivors:
            pipe.set(exact_key(self.namespace, cand["digest"]), cand["id"], nx=True, get=True)
        claimed = pipe.execute()
        kept = []
        for (i, cand), owner in zip(survivors, claimed, strict=True):
            owner_id = owner.decode() if isinstance(owner, bytes) else owner
            if owner_id is None or owner_id == cand["id"]:
                kept.append((i, cand))
            else:
                outcomes[i] = rejection(self.stage, "exact_duplicate", batch[i].coords,
                                        event=dict(cand), duplicate_of=owner_id,
                                        similarity=1.0)
        return kept


def _key_text(key: bytes | None) -> str | None:
    if not key:
        return None
    return key.decode("utf-8", errors="replace")


def _candidate(event: RawEvent, content: str, digest: str, score: float,
               message: Incoming) -> Candidate:
    return Candidate(
        id=event["id"] or derive_id(digest),
        source=event["source"],
        kind=event["kind"],
        language=event["language"],
        label=event["label"] or UNLABELED,
        content=content,
        timestamp=event["timestamp"],
        attributes=dict(event.get("attributes") or {}),
        digest=digest,
        quality_score=float(score),
        ingested_at=now_ms(),
        raw_partition=message.coords.partition,
        raw_offset=message.coords.offset,
    )


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts by outcome (``kept`` or the rejection reason), for logs and tests."""
    counts: Counter[str] = Counter()
    for outcome in outcomes:
        counts[outcome.reason or "kept"] += 1
    return dict(counts)
