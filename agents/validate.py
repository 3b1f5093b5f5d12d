"""The validate step: decode → validate → normalize → score quality.

The first step of ingest: a raw ``raw-events`` message in, a ``Candidate`` (normalized
content, quality score, content digest) or a rejection out. Pure: no store.

Its decoding is the deserialization handler of ``raw-events`` (Kafka Streams' split): a
message that does not decode, whatever the exception, is an ``invalid:<what>`` rejection
that carries its bytes; a failure after decoding is ``Step.run``'s ``error:<Class>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from agents.config import IngestSettings
from agents.normalize import content_digest, derive_id, normalize
from agents.quality import QualityFilter
from agents.step import Item, Outcome, Step, now_ms, rejection
from schemas.records import Candidate, RawEvent
from streams.serde import DecodeError, decode_raw_event

UNLABELED = "unlabeled"


class Validate(Step):
    """Raw bytes in; a ``Candidate`` or an ``invalid:*`` / ``quality:*`` rejection out."""

    name = "validate"
    stage = "ingest"

    def __init__(self, settings: IngestSettings) -> None:
        super().__init__()
        self.settings = settings
        self.quality = QualityFilter(settings)

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per message, in input order."""
        return [self._decide(item) for item in items]

    def _decide(self, item: Item) -> Outcome:
        try:
            event = self._decode(item)
        except DecodeError as exc:
            return rejection(self.stage, f"invalid:{exc.reason}", item.coords,
                             event_id=_key_text(item.key), detail=exc.detail,
                             raw=item.record if isinstance(item.record, bytes) else None)
        content = normalize(event["content"])
        verdict = self.quality.check(content, event["kind"])
        candidate = _candidate(event, content, content_digest(content), verdict.score, item)
        if not verdict.passed:
            return rejection(self.stage, verdict.reason or "quality", item.coords,
                             event=dict(candidate), detail=verdict.detail)
        return Outcome(candidate, rejected=False)

    def _decode(self, item: Item) -> RawEvent:
        """The event of a message, or the DecodeError that says why there is none."""
        limit = self.settings.max_id_bytes
        if item.key is not None and len(item.key) > limit:
            raise DecodeError("too_large", f"Kafka key: {len(item.key)} bytes > "
                              f"ingest.max_id_bytes = {limit}")
        try:
            event = decode_raw_event(item.record, self.settings.max_event_bytes)
        except DecodeError:
            raise
        except Exception as exc:  # an input no rule foresaw is still undecodable, not a crash
            raise DecodeError("undecodable", f"{type(exc).__name__}: {exc}") from exc
        if len(event["id"].encode("utf-8")) > limit:
            raise DecodeError("too_large", f"id: {len(event['id'].encode('utf-8'))} bytes > "
                              f"ingest.max_id_bytes = {limit}")
        return event


def _key_text(key: bytes | None) -> str | None:
    if not key:
        return None
    return key.decode("utf-8", errors="replace")


def _candidate(event: RawEvent, content: str, digest: str, score: float,
               item: Item) -> Candidate:
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
        raw_partition=item.coords.partition,
        raw_offset=item.coords.offset,
        earlier_digest=None,  # ExactDedup sets it for a later version of the id
    )
