"""The balance step: buffer each new sample of one samples partition in Redis (idempotent
by id), update the class EMA, and every ``batch_size`` new samples compose a batch by the
policy's target shares (× the difficulty factor from feedback), with up to
``replay_fraction`` of it hard examples.

Its state (EMA, rounding credit, sequence, pending count) is a JSON-able dict that the
Faust agent keeps in a changelog-backed table: it sets ``state`` before ``run`` and
reassigns the table value from it afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from agents.compose import allocate_with_credit, assemble_batch, batch_order
from agents.config import BalanceSettings
from agents.policy import label_for, targets_for
from agents.stats import ClassEMA
from agents.step import Item, Outcome, Step, now_ms
from schemas.records import CuratedBatch, CuratedSample


class Buffers(Protocol):
    """One partition's class buffers (``agents.buffers.ClassBuffers``)."""

    partition: int

    def add(self, sample: Mapping[str, Any]) -> bool: ...
    def draw(self, counts: Mapping[str, int], exclude: Sequence[str] = ...
             ) -> list[dict[str, Any]]: ...
    def pop_replay(self, n: int) -> list[dict[str, Any]]: ...
    def sizes(self) -> dict[str, int]: ...
    def evictions(self) -> dict[str, int]: ...


class Difficulty(Protocol):
    """The current difficulty factor per class (``agents.feedback.LossStore``)."""

    def difficulty(self) -> dict[str, float]: ...


class Balance(Step):
    """Samples of one partition in; the batches it composed out (a sink step).

    ``counters["replayed"]`` counts samples already buffered before (replays change
    nothing).
    """

    name = "balance"

    def __init__(self, settings: BalanceSettings, buffers: Buffers,
                 losses: Difficulty) -> None:
        super().__init__()
        self.settings = settings
        self.buffers = buffers
        self.losses = losses
        self.partition = buffers.partition
        self.policy = label_for(settings)
        #: The partition's state (the Faust table value); a fresh dict after every run.
        self.state: dict[str, Any] = {}

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """Buffer every sample; a batch outcome each time ``batch_size`` new ones arrived."""
        state = dict(self.state)
        batches = []
        for item in items:
            batch = self._add(item.record, state)
            if batch is not None:
                batches.append(Outcome(batch, rejected=False))
        self.state = state
        return batches

    def _add(self, sample: CuratedSample, state: dict[str, Any]) -> CuratedBatch | None:
        if not self.buffers.add(sample):
            self.counters["replayed"] += 1
            return None
        b = self.settings
        ema = ClassEMA.restore(state.get("ema"), b.alpha, b.window)
        ema.update(sample["label"])
        state["ema"] = ema.to_dict()
        state["pending"] = int(state.get("pending", 0)) + 1
        if state["pending"] < b.batch_size:
            return None
        batch = self.compose(ema, state)
        if batch is not None:
            state["pending"] = 0
        return batch

    def compose(self, ema: ClassEMA, state: dict[str, Any]) -> CuratedBatch | None:
        """Draw one batch by the policy; updates ``state`` (sequence, credit) in place."""
        b = self.settings
        difficulty = self.losses.difficulty()
        targets = targets_for(ema.get(), b, difficulty)
        replays = self.buffers.pop_replay(int(b.batch_size * b.replay_fraction))
        counts, credit = allocate_with_credit(
            b.batch_size - len(replays), targets.shares, self.buffers.sizes(),
            state.get("credit") or {})
        drawn = self.buffers.draw(counts, exclude=[r["id"] for r in replays]) + replays
        if not drawn:
            return None
        sequence = int(state.get("sequence", 0))
        state["sequence"] = sequence + 1
        state["credit"] = credit
        return assemble_batch(
            partition=self.partition, sequence=sequence,
            samples=batch_order(drawn, b.seed, self.partition, sequence),
            policy=self.policy, class_shares=ema.shares(), target_shares=targets.shares,
            weights=targets.weights, difficulty=difficulty, created_at=now_ms())
