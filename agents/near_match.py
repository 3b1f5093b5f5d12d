"""Near-duplicate decisions, without Redis: what one item's check decided
(``FuzzyDecision``), an indexed item (``Stored``) and which earlier item a copy names
(``earliest_match``). ``agents.fuzzy_index.FuzzyIndex`` applies them to its Redis index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agents.minhash import jaccard

FuzzyResult = Literal["admitted", "replayed", "duplicate", "skipped", "clear"]


@dataclass(frozen=True, slots=True)
class FuzzyDecision:
    """What happened to one item.

    ``keep`` is False only for a near-duplicate, then ``duplicate_of`` names the earlier
    item and ``similarity`` is the estimated Jaccard of their shingle sets. ``outcome``
    says which case it was: ``admitted`` (new, now in the index), ``replayed`` (the id was
    already admitted: replays are idempotent), ``duplicate``, ``skipped`` (no word or
    token in the document, or the layer disabled: exact dedup still applies), or ``clear``
    (``FuzzyIndex.check`` found nothing; the index is unchanged).
    """

    keep: bool
    duplicate_of: str | None = None
    similarity: float | None = None
    outcome: FuzzyResult = "admitted"


@dataclass(slots=True)
class Stored:
    """An indexed item: its MinHash signature and its insertion sequence number."""

    signature: np.ndarray
    seq: int


def earliest_match(sig: np.ndarray, stored: Mapping[str, Stored], batch: np.ndarray,
                   batch_ids: Sequence[str], threshold: float) -> tuple[str, float] | None:
    """The item ``sig`` duplicates, with its estimated Jaccard; None when none reaches
    ``threshold``.

    The earliest one at or above the threshold: of the indexed candidates ``stored`` the
    lowest sequence number, else the first row of ``batch`` (this batch's items admitted
    before it, ``batch_ids``). Not the most similar: an item admitted later can be more
    similar to a copy than its first match (near-duplication is not transitive), and the
    most-similar rule then names another original when the copy is replayed.
    """
    best: tuple[int, str, float] | None = None  # (sequence, id, similarity)
    for cand, item in stored.items():
        sim = jaccard(sig, item.signature)
        if sim >= threshold and (best is None or (item.seq, cand) < best[:2]):
            best = (item.seq, cand, sim)
    if best is not None:
        return best[1], best[2]
    if len(batch_ids):
        # Within the batch every earlier admitted item is compared, not only LSH
        # candidates: a numpy comparison against at most one batch of rows.
        sims = np.count_nonzero(batch == sig, axis=1) / batch.shape[1]
        over = np.flatnonzero(sims >= threshold)
        if len(over):
            return batch_ids[int(over[0])], float(sims[over[0]])
    return None
