"""Fuzzy (near-duplicate) dedup steps: ``FuzzyDedup`` (word shingles, every kind) and
``CodeFuzzyDedup`` (identifier-normalized code tokens, CODE records), each over its own
``agents.fuzzy_index.FuzzyIndex`` (the index, its key layout and its race rule live there).
A rejection's detail names the method; ``counters["<name>.aged_out"]`` counts what the
index's horizon (``dedup.horizon``) removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from agents.code_tokens import CodeDoc
from agents.config import CodeFuzzySettings, FuzzySettings
from agents.fuzzy_index import CodeNearIndex, FuzzyIndex, NearIndex
from agents.identity import event_id, store_id
from agents.near_match import FuzzyDecision
from agents.shingling import CODE_TOKENS, WORDS
from agents.step import Item, Outcome, Step, rejection


class _NearDedup(Step):
    """What both fuzzy steps share: a ``near_duplicate`` rejection naming the method."""

    stage = "fuzzy"
    method: ClassVar[str]

    index: NearIndex | CodeNearIndex

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self._admitted: set[str] = set()  # ids the last ``process`` put in the index

    def forget(self, items: Sequence[Item]) -> None:
        """Remove from the index what the last ``process`` admitted of ``items`` (a replay
        was admitted before, as a sample: it stays)."""
        ids = [key for key in (store_id(i.record) for i in items) if key in self._admitted]
        if ids:
            self.index.remove(ids)

    def _count_aged_out(self) -> None:
        """Mirror the index's horizon count (a total since it was built, like the vector
        index's ``index.aged_out``) as ``<name>.aged_out``."""
        if isinstance(self.index, FuzzyIndex):
            self.counters[f"{self.name}.aged_out"] = self.index.counts["aged_out"]

    def _outcome(self, item: Item, decision: FuzzyDecision) -> Outcome:
        if decision.outcome == "admitted":
            self._admitted.add(store_id(item.record))
        if decision.keep:
            return Outcome(item.record, rejected=False)
        return rejection(
            self.stage, "near_duplicate", item.coords, event=dict(item.record),
            duplicate_of=event_id(decision.duplicate_of or ""),
            similarity=decision.similarity,
            # The method leads the detail (the Rejection schema has no field for it).
            detail=f"{self.method}: estimated Jaccard {decision.similarity:.3f} ≥ "
                   f"{self.threshold}")


class FuzzyDedup(_NearDedup):
    """Candidates in; the same candidate, or a ``near_duplicate`` of an earlier one by its
    word shingles (every kind)."""

    name = "fuzzy"
    method = WORDS.method
    index: NearIndex

    def __init__(self, settings: FuzzySettings, index: NearIndex) -> None:
        super().__init__(settings.threshold)
        self.settings = settings
        self.index = index

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per candidate, in input order."""
        self._admitted.clear()
        decisions = self.index.check_and_insert([(store_id(i.record), i.record["content"])
                                                 for i in items])
        self._count_aged_out()
        return [self._outcome(item, decision)
                for item, decision in zip(items, decisions, strict=True)]


class CodeFuzzyDedup(_NearDedup):
    """The code layer: a CODE candidate is a ``near_duplicate`` when its identifier-
    normalized token shingles match an earlier CODE record's; other kinds pass untouched."""

    name = "fuzzy_code"
    method = CODE_TOKENS.method
    index: CodeNearIndex

    def __init__(self, settings: CodeFuzzySettings, index: CodeNearIndex) -> None:
        super().__init__(settings.threshold)
        self.settings = settings
        self.index = index

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per candidate, in input order."""
        self._admitted.clear()
        code = [item for item in items if item.record["kind"] == "CODE"]
        decisions = iter(self.index.check_and_insert([
            (store_id(i.record), CodeDoc(i.record["content"], i.record.get("language"),
                                         i.record.get("source")))
            for i in code]))
        self._count_aged_out()
        return [self._outcome(item, next(decisions)) if item.record["kind"] == "CODE"
                else Outcome(item.record, rejected=False) for item in items]
