"""The pure half of semantic admission: given full-precision vectors, who is a duplicate.

``agents.index.VectorIndex`` asks Redis for candidates (HNSW, int8) and then decides here,
in the worker, with the FP32 cosine, so quantization can never flip a keep/drop:

* ``decide``: each item of a micro-batch, in input order, against its index candidates
  and the earlier kept items of the same batch;
* ``settle``: after the write, each kept item against the items other workers registered
  since this batch searched (``window``): the earlier-registered one wins, so two racing
  workers agree which near-copy stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Decision:
    """One item's decision: ``duplicate_of`` None means kept; ``similarity`` is the FP32
    cosine to the duplicated item, or to the nearest one found when kept (None: none)."""

    duplicate_of: str | None
    similarity: float | None


def nearest(vector: np.ndarray, ids: list[str], matrix: np.ndarray) -> tuple[str, float] | None:
    """The id and cosine of the row of ``matrix`` closest to ``vector`` (None: no rows).
    Ties go to the first row, so the order of ``ids`` makes the answer deterministic."""
    if not ids:
        return None
    cos = matrix @ vector.astype(np.float32)
    best = int(np.argmax(cos))
    return ids[best], float(cos[best])


def decide(vectors: np.ndarray, ids: list[str], found: list[dict[str, np.ndarray]],
           threshold: float, probes: np.ndarray | None = None) -> list[Decision]:
    """Each item in input order: a duplicate of the nearest of its index candidates
    (``found[i]``: id → FP32 vector) and the earlier kept items of the batch when that
    cosine is ≥ ``threshold``; else kept.

    ``probes`` (a sharded index, ``agents.shards``): each item's probed shards, its home
    first; an earlier kept item of the batch counts only when its home is among them (the
    ones the item's search would find once written, so a replay decides alike)."""
    decisions: list[Decision] = []
    kept_ids: list[str] = []
    kept_rows: list[np.ndarray] = []
    kept_homes: list[int] = []
    for i, (vector, item_id, candidates) in enumerate(zip(vectors, ids, found, strict=True)):
        if probes is None:
            visible: Sequence[int] = range(len(kept_ids))
        else:
            probed = set(map(int, probes[i]))
            visible = [n for n, home in enumerate(kept_homes) if home in probed]
        pool_ids = list(candidates) + [kept_ids[n] for n in visible]
        rows = list(candidates.values()) + [kept_rows[n] for n in visible]
        best = nearest(vector, pool_ids, np.stack(rows)) if rows else None
        if best is not None and best[1] >= threshold:
            decisions.append(Decision(best[0], best[1]))
            continue
        decisions.append(Decision(None, None if best is None else best[1]))
        kept_ids.append(item_id)
        kept_rows.append(np.asarray(vector, dtype=np.float32))
        kept_homes.append(0 if probes is None else int(probes[i][0]))
    return decisions


def settle(kept: dict[str, np.ndarray], window: dict[str, np.ndarray],
           threshold: float) -> dict[str, tuple[str, float]]:
    """The kept items that lose a race: item id → (winner, cosine).

    ``window`` holds the items other workers registered after this batch searched and
    before it registered (in registration order): each was written first, so it wins
    against any of ``kept`` within ``threshold``; the first such winner in the window is
    named.
    """
    if not kept or not window:
        return {}
    window_ids = list(window)
    matrix = np.stack(list(window.values()))
    lost: dict[str, tuple[str, float]] = {}
    for item_id, vector in kept.items():
        cos = matrix @ vector.astype(np.float32)
        over = np.flatnonzero(cos >= threshold)
        if len(over):
            lost[item_id] = (window_ids[int(over[0])], float(cos[over[0]]))
    return lost
