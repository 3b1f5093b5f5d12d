"""In-memory stores and helpers for the sink steps' unit tests (no services).

``MemoryBuffers`` keeps ``ClassBuffers``' contract: idempotent ``admit`` that remembers the
offset that first buffered an id, per-class FIFO with a reuse cap, ``exclude``, a replay
queue of ids whose payload is still there, the outbox of composed batches until
``confirm``, the next free sequence, each class's ``supply``, and a label set (shared by
the buffers given the same ``labels`` set). ``MemoryLosses`` folds with the pure
``process_feedback``, once per (batch id, step). The Redis ones are tested on the real
Redis by ``test_buffers``, ``test_balance_step`` and ``test_feedback_store``.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from agents.balance import Balance
from agents.buffers import SAMPLE_FIELDS, Admitted, BufferStoreError, Recorded, SequenceTaken
from agents.config import BalanceSettings
from agents.feedback_logic import FeedbackOutcome, process_feedback
from agents.normalize import content_digest, normalize
from agents.step import Coords, Item
from agents.sustain import Supply
from schemas.records import CuratedBatch, CuratedSample
from schemas.records import Feedback as FeedbackRecord
from streams.serde import decode, encode
from tests.agents.pipeline_util import corpus

SNIPPETS = corpus(12)
DOCS = [
    "The scheduler keeps a priority queue of pending events and runs each one when due.",
    "Use a context manager so that the file is closed even when the parser raises.",
    "Tokens are read lazily: the lexer only advances when the parser asks for more.",
    "Configuration is validated once at start-up, and errors name the bad setting.",
]


class MemoryBuffers:
    """The class buffers of one partition, in memory (payloads are kept for good).

    ``fail_composes``: that many next ``compose`` calls raise, as a Redis error would.
    """

    def __init__(self, partition: int, reuse_cap: int, labels: set[str] | None = None) -> None:
        self.partition = partition
        self.reuse_cap = reuse_cap
        self.samples: dict[str, dict[str, Any]] = {}
        self.first: dict[str, int | None] = {}
        self.uses: Counter[str] = Counter()
        self.queues: dict[str, deque[str]] = {}  # never drawn, oldest first
        self.used: dict[str, deque[str]] = {}  # drawn below the cap, least recent first
        self.replay: list[str] = []
        self.outbox: dict[int, Recorded] = {}
        self.next_sequence = 0
        self.labels = labels if labels is not None else set()
        self.fail_composes = 0

    def admit(self, sample: Mapping[str, Any], offset: int | None = None) -> Admitted:
        if sample["id"] in self.samples:
            return Admitted(False, self.first[sample["id"]], len(self.outbox))
        self.samples[sample["id"]] = {name: sample[name] for name in SAMPLE_FIELDS}
        self.first[sample["id"]] = offset
        self.queues.setdefault(sample["label"], deque()).append(sample["id"])
        return Admitted(True, offset, len(self.outbox))

    def add(self, sample: Mapping[str, Any]) -> bool:
        return self.admit(sample).new

    def admit_label(self, label: str, limit: int) -> bool:
        if label in self.labels:
            return True
        if len(self.labels) < limit:
            self.labels.add(label)
            return True
        return False

    def draw(self, counts: Mapping[str, int], exclude: Iterable[str] = ()
             ) -> list[dict[str, Any]]:
        # As ClassBuffers draws: never-used samples newest first, then used ones least
        # recently drawn first.
        excluded, out = set(exclude), []
        for label, n in counts.items():
            fresh = self.queues.get(label, deque())
            used = self.used.get(label, deque())
            taken: list[str] = []
            for ident in reversed(fresh):
                if len(taken) < n and ident not in excluded:
                    taken.append(ident)
            for ident in list(used):
                if len(taken) < n and ident not in excluded:
                    taken.append(ident)
                    used.remove(ident)
            for ident in taken:
                if ident in fresh:
                    fresh.remove(ident)
                self.uses[ident] += 1
                out.append({**self.samples[ident], "replay": False})
                if self.uses[ident] < self.reuse_cap:
                    self.used.setdefault(label, used).append(ident)
        return out

    def compose(self, sequence: int, counts: Mapping[str, int], replays: int,
                meta: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.fail_composes:
            self.fail_composes -= 1
            raise BufferStoreError("compose failed")
        if sequence < self.next_sequence:
            raise SequenceTaken(sequence, self.next_sequence)
        popped = self.pop_replay(replays)
        rows = self.draw(counts, exclude=[r["id"] for r in popped]) + popped
        if rows:
            kept = json.loads(json.dumps(meta, sort_keys=True))
            self.outbox[sequence] = Recorded(sequence, kept, [dict(r) for r in rows])
            self.next_sequence = sequence + 1
        return rows

    def unsent(self) -> list[Recorded]:
        return [self.outbox[s] for s in sorted(self.outbox)]

    def confirm(self, sequence: int) -> None:
        self.outbox.pop(sequence, None)

    def push_replay(self, ids: Iterable[str]) -> int:
        queued = 0
        for ident in ids:
            if ident in self.samples and ident not in self.replay:
                self.replay.append(ident)
                queued += 1
        return queued

    def pop_replay(self, n: int) -> list[dict[str, Any]]:
        taken, self.replay = self.replay[:max(n, 0)], self.replay[max(n, 0):]
        return [{**self.samples[ident], "replay": True} for ident in taken]

    def sizes(self) -> dict[str, int]:
        return {label: len(q) for label, q in sorted(self._waiting().items())}

    def supply(self) -> dict[str, Supply]:
        # As ClassBuffers counts it: a queued sample gives max(reuse_cap - uses, 1) more.
        return {label: Supply(len(q), sum(max(self.reuse_cap - self.uses[i], 1) for i in q),
                              sum(self.uses[i] == 0 for i in q))
                for label, q in sorted(self._waiting().items())}

    def _waiting(self) -> dict[str, list[str]]:
        """Every class's queued ids, never drawn and used."""
        labels = set(self.queues) | set(self.used)
        return {label: [*self.queues.get(label, ()), *self.used.get(label, ())]
                for label in labels}

    def replay_size(self) -> int:
        return len(self.replay)

    def evictions(self) -> dict[str, int]:
        return {}


class MemoryLosses:
    """The shared loss statistics and difficulty factors, in memory, folded once per
    (batch id, step)."""

    def __init__(self, factors: dict[str, float] | None = None) -> None:
        self.state: dict[str, Any] | None = None
        self.factors = dict(factors or {})
        self.seen: set[tuple[str, int]] = set()

    def fold(self, feedback: FeedbackRecord, alpha: float, hard_k: float, *,
             max_classes: int | None = None) -> FeedbackOutcome | None:
        pair = (feedback["batch_id"], feedback["step"])
        if pair in self.seen:
            return None
        self.seen.add(pair)
        outcome = process_feedback(self.state, feedback, alpha=alpha, hard_k=hard_k,
                                   max_classes=max_classes)
        self.state = outcome.state
        self.factors.update(outcome.difficulty)
        return outcome

    def difficulty(self) -> dict[str, float]:
        return dict(self.factors)


# -- helpers ---------------------------------------------------------------------------------


def sample(i: int, label: str, content: str | None = None) -> CuratedSample:
    """A CuratedSample ``s<i>`` of real content with a small unit embedding (8 × float16)."""
    text = SNIPPETS[i % len(SNIPPETS)].text if label == "python" else DOCS[i % len(DOCS)]
    content = normalize(f"{text}\n# {i}" if content is None else content)
    vector = np.random.default_rng(i).standard_normal(8).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return CuratedSample(
        id=f"s{i:04d}", source="test", kind="CODE" if label == "python" else "TEXT",
        language=None, label=label, content=content, timestamp=1_700_000_000_000 + i,
        attributes={}, digest=content_digest(content), quality_score=0.9,
        embedding=vector.astype("<f2").tobytes(), embedding_dim=8, model="test",
        nearest_similarity=None, admitted_at=1_700_000_000_000 + i)


def stream(n: int, pattern: tuple[str, ...] = ("python", "python", "python", "docs")
           ) -> list[CuratedSample]:
    """``n`` samples whose labels cycle through ``pattern``."""
    return [sample(i, pattern[i % len(pattern)]) for i in range(n)]


def as_items(samples: Iterable[CuratedSample], partition: int = 3) -> list[Item]:
    """Items as Kafka delivers them; sample ``s<i>`` is at offset ``i`` (so sending a
    sample again is a redelivery of the same message)."""
    return [Item(s, Coords("sluice.samples", partition, int(s["id"][1:]))) for s in samples]


def balance(partition: int = 3, losses: MemoryLosses | None = None,
            message_limit: int | None = None, **extra: Any) -> tuple[Balance, MemoryBuffers]:
    """A Balance step (batch size 4, natural, no replays) over fresh memory buffers."""
    settings = BalanceSettings(**{"batch_size": 4, "replay_fraction": 0.0, "policy": "natural",
                                  "reuse_cap": 8, "pace": "arrivals", **extra})
    buffers = MemoryBuffers(partition, settings.reuse_cap)
    limit = {} if message_limit is None else {"message_limit": message_limit}
    return Balance(settings, buffers, losses or MemoryLosses(), **limit), buffers


def batches_of(step: Balance, samples: Iterable[CuratedSample], one_at_a_time: bool = False
               ) -> list[CuratedBatch]:
    """Run the samples through the step; every batch must survive an Avro round trip."""
    items = as_items(samples, step.partition)
    runs = [[i] for i in items] if one_at_a_time else [items]
    out = []
    for run in runs:
        for outcome in step.run(run):
            assert not outcome.rejected
            assert decode(encode("CuratedBatch", outcome.record), "CuratedBatch") == (
                outcome.record)
            out.append(outcome.record)
    return out


def feedback(batch_id: str, losses: Iterable[tuple[str, str, float]], step: int = 1
             ) -> FeedbackRecord:
    """A Feedback record of (id, label, loss) triples."""
    record = FeedbackRecord(batch_id=batch_id, step=step, model="bow", created_at=0,
                            losses=[{"id": i, "label": lab, "loss": loss, "correct": None}
                                    for i, lab, loss in losses])
    encode("Feedback", record)
    return record


def labels(batch: CuratedBatch) -> Counter[str]:
    return Counter(s["label"] for s in batch["samples"])
