"""The balance step: buffer each new sample of one samples partition in Redis (idempotent
by id), update the class EMA, and compose batches by the policy's target shares (× the
difficulty factor from feedback), with up to ``replay_fraction`` of each hard examples.

When a batch is composed is ``pace``: ``arrivals``, every ``batch_size`` new samples
(``process``); ``trainer``, whenever the agent finds the trainer fewer than
``ahead_batches`` behind (``paced``, called on arrivals and on a timer), each batch drawn
from the whole buffered pool as soon as it holds a full batch. Compute-limited (the stream
outruns training), the pool fills to ``buffer_cap`` per class and evicts the least useful
(used samples first, then the oldest never used; a draw takes never-used ones newest first);
data-limited (training outruns the stream), samples are drawn again up to ``reuse_cap``
times and, when even that leaves less than a batch, ``starved`` says so.

One rule paces every batch in both regimes (``agents.sustain.sustainable_caps``): no class
is drawn faster than it can sustain, i.e. its fresh samples, plus ``reuse_cap`` uses per
arrival (``flow``: samples arriving per sample drawn; 1 under ``arrivals`` pace, measured
under ``trainer`` pace, where what was buffered before the first batch is stock), plus its
repeated uses spread over the pool's remaining life. When arrivals keep the pool full the
caps do not bind and the policy's targets pick the batch; when they do not, a scarce class
stays in every stretch of batches instead of using up its reuse in the first ones, and
``starved`` (and ``short``) says the pool cannot meet the targets.

Its state (EMA, rounding credit, sequence, pending count, last offset counted) is a
JSON-able dict that the Faust agent keeps in a changelog-backed table: it sets ``state``
before ``run`` and reassigns the table value from it afterwards.

What survives a failure anywhere between Redis and Kafka:

- **Counting.** A sample counts once. It is fresh when its id is new to the buffers, or
  when the buffers say this very message (same offset) buffered it and the state has not
  counted that offset yet: a run that failed after the Redis add (a draw that raised, a
  crash before the table write) is counted on its retry, a replay never.
- **Draw and send.** The draw and the batch's record are one Redis script
  (``ClassBuffers.compose``): the rows drawn, the batch's meta and the state after it are
  kept until the sender ``confirm``s the send. A step that finds a record it did not hand
  out (a crash, a rebalance, a failed send) re-sends it (same id, same bytes) and takes
  its state when the table is behind. Batches are therefore delivered at least once;
  duplicates carry the same batch id.
- **Size.** No batch exceeds ``message_limit`` (the broker's ``max.message.bytes``): a
  sample's content is cut to its share of the limit when buffered, and the assembled batch
  is fitted exactly (``agents.batch_bytes.fit_samples``). Cuts are counted by kind.
- **Labels.** A label that is not valid text (``label_problem``) or beyond the first
  ``max_labels`` of the namespace goes to ``overflow_label``, counted by reason.
- **Held out.** Under ``replay_policy = "reducible"`` a sample of the held-out slice
  (``agents.feedback.in_holdout``, by id) trains the reference model instead of entering
  batches (``held_out``), until the holdout holds ``holdout_cap``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from agents.batch_bytes import batch_overhead, fit_samples, kafka_reserve, utf8_prefix
from agents.buffers import Admitted, Recorded, SequenceTaken
from agents.compose import (
    allocate_with_credit,
    assemble_batch,
    batch_id,
    batch_order,
    label_problem,
)
from agents.config import BalanceSettings
from agents.feedback import in_holdout
from agents.policy import PolicyError, label_for, targets_for, update_priority
from agents.stats import ClassEMA
from agents.step import Item, Outcome, Step, now_ms
from agents.sustain import Flow, Supply, paced_shares, sustainable_caps, update_flow
from schemas.records import CuratedBatch, CuratedSample
from streams.config import TopicSettings
from streams.metrics import RESENT, class_in, dropped, relabeled, truncated

DEFAULT_MESSAGE_LIMIT = TopicSettings().max_message_bytes
#: The least content budget per sample the settings may leave (else a start-up error).
MIN_SAMPLE_BYTES = 2048


class Buffers(Protocol):
    """One partition's class buffers (``agents.buffers.ClassBuffers``)."""

    partition: int

    def admit(self, sample: Mapping[str, Any], offset: int | None = ...) -> Admitted: ...
    def admit_label(self, label: str, limit: int) -> bool: ...
    def compose(self, sequence: int, counts: Mapping[str, int], replays: int,
                meta: Mapping[str, Any]) -> list[dict[str, Any]]: ...
    def unsent(self) -> list[Recorded]: ...
    def confirm(self, sequence: int) -> None: ...
    def sizes(self) -> dict[str, int]: ...
    def supply(self) -> dict[str, Supply]: ...
    def replay_size(self) -> int: ...
    def evictions(self, unused: bool = ...) -> dict[str, int]: ...


class Difficulty(Protocol):
    """The current difficulty factor per class (``agents.feedback.LossStore``)."""

    def difficulty(self) -> dict[str, float]: ...


@runtime_checkable
class Holdout(Protocol):
    """Keeps samples out of batches for the reference model (``agents.feedback.LossStore``)."""

    def hold_out(self, sample: Mapping[str, Any], cap: int) -> bool: ...


def sample_share(settings: BalanceSettings, message_limit: int) -> int:
    """Bytes of one sample's content at most when buffered: its share of the limit, less a
    reserve for the batch's own fields (``PolicyError`` when that leaves too little)."""
    share = (message_limit - 1024 - message_limit // 64) // settings.batch_size
    if share < MIN_SAMPLE_BYTES:
        raise PolicyError(
            f"topics.max_message_bytes = {message_limit} leaves {share} bytes per sample for "
            f"balance.batch_size = {settings.batch_size}; at least {MIN_SAMPLE_BYTES} are "
            "needed: raise the limit or lower the batch size")
    problem = label_problem(settings.overflow_label)
    if problem:
        raise PolicyError(f"balance.overflow_label {settings.overflow_label!r}: {problem}")
    return share


class Balance(Step):
    """Samples of one partition in; the batches it composed, or re-sends, out (a sink).

    The caller sends each batch and then calls ``confirm(batch)``; ``release()`` hands the
    unconfirmed ones back, so the next run re-sends them. Counters: ``replayed`` (samples
    already counted), ``batches.resent``, ``batches.short`` (composed while the pool could
    not meet the targets: a class held below its target share by what it can sustain),
    ``truncated.<kind>``, ``relabeled.<reason>`` and ``in.label.<label>`` (the class each
    sample was counted in).
    """

    name = "balance"

    def __init__(self, settings: BalanceSettings, buffers: Buffers, losses: Difficulty, *,
                 message_limit: int = DEFAULT_MESSAGE_LIMIT) -> None:
        super().__init__()
        self.settings = settings
        self.buffers = buffers
        self.losses = losses
        self.partition = buffers.partition
        self.policy = label_for(settings)
        self.message_limit = int(message_limit)
        self.content_cap = sample_share(settings, self.message_limit)
        if settings.replay_policy == "reducible" and not isinstance(losses, Holdout):
            raise PolicyError("balance.replay_policy = reducible needs a loss store that "
                              "holds samples out (agents.feedback.LossStore)")
        #: The partition's state (the Faust table value); a fresh dict after every run.
        self.state: dict[str, Any] = {}
        self._in_flight: set[int] = set()  # sequences handed out, not yet confirmed
        #: The last ``paced`` call found the pool unable to meet the targets: short of a full
        #: batch (the trainer waits for data), or a class held below its target share by
        #: what it can sustain (``short``).
        self.starved = False
        #: Classes the last composed batch held below their target share, by how much.
        self.short: dict[str, float] = {}

    # -- the caller's side of the outbox --------------------------------------------------
    def confirm(self, batch: CuratedBatch) -> None:
        """``batch`` was delivered: its record can go."""
        self.buffers.confirm(int(batch["sequence"]))
        self._in_flight.discard(int(batch["sequence"]))

    def release(self) -> None:
        """Batches handed out and not confirmed are re-sent by the next run."""
        self._in_flight.clear()

    # -- the step ------------------------------------------------------------------------
    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """Buffer every sample; a batch each time ``batch_size`` new ones were counted, and
        first any recorded batch that nobody is sending."""
        state = dict(self.state)
        out: list[CuratedBatch] = []
        for item in items:
            sample, notes = self._bounded(item.record)
            if self._held_out(sample):
                self.counters["held_out"] += 1
                continue
            offset = item.coords.offset
            admitted = self.buffers.admit(sample, offset)
            handed = self._in_flight | {int(b["sequence"]) for b in out}
            if admitted.unsent > len(handed):
                state, resent = self._recover(state, handed)
                out += resent
            if not _fresh(admitted, offset, state):
                self.counters["replayed"] += 1
                continue
            self.counters.update(notes)
            batch = self._count(sample, offset, state)
            if batch is not None:
                out.append(batch)
        self.state = state
        self._in_flight |= {int(b["sequence"]) for b in out}
        return [Outcome(batch, rejected=False) for batch in out]

    def _bounded(self, sample: CuratedSample) -> tuple[dict[str, Any], list[str]]:
        """The sample as buffered: a bounded label, content within its share; and the
        counters to add if it is fresh."""
        b = self.settings
        label, notes = sample["label"], []
        problem = label_problem(label)
        if problem is not None:
            label, notes = b.overflow_label, [relabeled(problem)]
        elif label != b.overflow_label and not self.buffers.admit_label(label, b.max_labels):
            label, notes = b.overflow_label, [relabeled("overflow")]
        content = utf8_prefix(sample["content"], self.content_cap)
        if len(content) < len(sample["content"]):
            notes.append(truncated(sample["kind"]))
        self.counters[class_in(label)] += 1
        return {**sample, "label": label, "content": content}, notes

    def _held_out(self, sample: Mapping[str, Any]) -> bool:
        """Whether the sample goes to the reference model's holdout instead of batches."""
        b = self.settings
        return (b.replay_policy == "reducible" and bool(sample.get("embedding_dim"))
                and in_holdout(str(sample["id"]), b.holdout_fraction)
                and isinstance(self.losses, Holdout)
                and self.losses.hold_out(sample, b.holdout_cap))

    def _count(self, sample: Mapping[str, Any], offset: int, state: dict[str, Any]
               ) -> CuratedBatch | None:
        b = self.settings
        ema = ClassEMA.restore(state.get("ema"), b.alpha, b.window)
        ema.update(sample["label"])
        state["ema"] = ema.to_dict()
        if b.source_priorities:
            # The class's mean source priority, remembered as long as its EMA count.
            priority = dict(state.get("priority") or {})
            priority[sample["label"]] = update_priority(
                priority.get(sample["label"]), b.source_priorities.get(sample["source"], 1.0),
                b.alpha, b.window)
            state["priority"] = priority
        state["offset"] = offset
        state["pending"] = int(state.get("pending", 0)) + 1
        if b.pace == "trainer" or state["pending"] < b.batch_size:
            return None  # trainer-paced: the agent calls ``paced`` when the trainer is behind
        return self.compose(ema, state)

    def paced(self, budget: int) -> list[CuratedBatch]:
        """Up to ``budget`` batches for a trainer that is behind (``pace = trainer``): first
        any recorded batch nobody is sending, then one composed from the pool each time it
        holds a full batch (counting replays); ``starved`` when it does not, or when a
        batch could not meet the targets (``short``)."""
        b = self.settings
        state = dict(self.state)
        state, out = self._recover(state, set(self._in_flight))
        self.starved = False
        while len(out) < budget:
            replays = min(int(b.batch_size * b.replay_fraction), self.buffers.replay_size())
            if sum(self.buffers.sizes().values()) + replays < b.batch_size:
                self.starved = True
                break
            batch = self.compose(ClassEMA.restore(state.get("ema"), b.alpha, b.window), state)
            if batch is None:
                break
            self.starved = self.starved or bool(self.short)
            out.append(batch)
        self.state = state
        self._in_flight |= {int(batch["sequence"]) for batch in out}
        return out

    def compose(self, ema: ClassEMA, state: dict[str, Any]) -> CuratedBatch | None:
        """Draw and record one batch by the policy, each class paced by what it can
        sustain (module doc); on success ``state`` becomes the state after it (sequence,
        credit, pending, and under trainer pace the measured ``flow``)."""
        b = self.settings
        difficulty = self.losses.difficulty()
        targets = targets_for(ema.get(), b, difficulty, state.get("priority"))
        replays = min(int(b.batch_size * b.replay_fraction), self.buffers.replay_size())
        draws = b.batch_size - replays
        supply = self.buffers.supply()
        # Arrivals pace draws one sample per arrival by construction; trainer pace measures
        # it, and a state without a flow yet (no trainer-paced batch) has only stock.
        trainer = b.pace == "trainer"
        flow = Flow(*state["flow"]) if trainer and state.get("flow") else Flow()
        paced = paced_shares(targets.shares, sustainable_caps(
            draws, supply, targets.natural, flow.get() if trainer else 1.0, b.reuse_cap))
        self.short = paced.short
        # The importance weight is what this draw's share is over the natural one: a class
        # held below its target is drawn less often than the target says, and a trainer
        # that undoes the oversampling (trainer.loss_weights) must undo only what happened.
        weights = {c: paced.shares[c] / targets.natural[c] if paced.shares.get(c, 0.0) > 0.0
                   else w for c, w in targets.weights.items()}
        counts, credit = allocate_with_credit(
            draws, paced.shares, {c: s.waiting for c, s in supply.items()},
            state.get("credit") or {})
        extra: dict[str, Any] = {}
        if trainer:
            extra["flow"] = list(update_flow(flow, int(state.get("pending", 0)),
                                             sum(counts.values()), b.alpha, b.window)
                                 if "flow" in state else flow)
        while True:
            sequence = int(state.get("sequence", 0))
            after = {**state, "sequence": sequence + 1, "credit": credit, "pending": 0,
                     **extra}
            meta = {"created_at": now_ms(), "policy": self.policy, "seed": b.seed,
                    "class_shares": ema.shares(), "target_shares": targets.shares,
                    "weights": weights, "difficulty": difficulty, "state": after}
            try:
                rows = self.buffers.compose(sequence, counts, replays, meta)
            except SequenceTaken as taken:
                if taken.next <= sequence:
                    raise
                # The table is behind the buffers (its changelog lost writes): never reuse
                # a batch id, take the next free sequence.
                state["sequence"] = taken.next
                continue
            if not rows:
                return None
            if paced.short:
                self.counters["batches.short"] += 1
            state.clear()
            state.update(after)
            # Assembled from the meta as the record keeps it (JSON), so a re-send from
            # the record is the same batch, byte for byte.
            kept = json.loads(json.dumps(meta, sort_keys=True))
            return self._assemble(Recorded(sequence, kept, rows))

    def _recover(self, state: dict[str, Any], handed: set[int]
                 ) -> tuple[dict[str, Any], list[CuratedBatch]]:
        """Recorded batches nobody is sending, to send again; the state after the newest of
        them when the table's state is behind it."""
        resent = []
        for recorded in self.buffers.unsent():
            if recorded.sequence in handed:
                continue
            if recorded.sequence >= int(state.get("sequence", 0)):
                state = dict(recorded.meta["state"])
            batch = self._assemble(recorded)
            if batch is not None:
                self.counters[RESENT] += 1
                resent.append(batch)
        return state, resent

    def _assemble(self, recorded: Recorded) -> CuratedBatch | None:
        """The batch of a record, the same every time: ordered, fitted to the limit."""
        meta, sequence = recorded.meta, recorded.sequence
        ordered = batch_order(recorded.rows, int(meta["seed"]), self.partition, sequence)
        fixed = batch_overhead(
            partition=self.partition, sequence=sequence, created_at=int(meta["created_at"]),
            policy=str(meta["policy"]), class_shares=meta["class_shares"],
            target_shares=meta["target_shares"], difficulty=meta["difficulty"],
            samples=len(ordered))
        key = len(batch_id(self.partition, sequence, "0" * 64))
        fitted = fit_samples(ordered, self.message_limit - kafka_reserve(self.message_limit, key)
                             - fixed)
        self.counters.update(truncated(s["kind"]) for s in fitted.truncated)
        self.counters.update(dropped(f"too_large.{s['kind']}") for s in fitted.dropped)
        if not fitted.samples:
            self.buffers.confirm(sequence)  # nothing can be sent: counted above
            return None
        return assemble_batch(
            partition=self.partition, sequence=sequence, samples=fitted.samples,
            policy=str(meta["policy"]), class_shares=meta["class_shares"],
            target_shares=meta["target_shares"], weights=meta["weights"],
            difficulty=meta["difficulty"], created_at=int(meta["created_at"]))


def _fresh(admitted: Admitted, offset: int, state: Mapping[str, Any]) -> bool:
    """Whether a sample is still to be counted (see the module doc)."""
    if admitted.new:
        return True
    counted = state.get("offset")
    return admitted.first_offset == offset and (counted is None or offset > int(counted))
