"""The accounting of a live run (``bench.churn``, ``bench.soak``): every figure, from what
was produced and what was read back, and the guarantees those figures find broken."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.live.ledger import Ledger


def account(ledger: Ledger, produced: list[str], groups: list[set[str]], index: set[str],
            in_buffers: set[str], threshold: float, where: dict[str, str] | None = None,
            live: set[str] | None = None) -> dict[str, Any]:
    """Every figure of the accounting, and the ids behind each failure. ``where``
    (``where_stuck``) tells lost from still in flight; without it every id without an
    outcome counts as lost. ``live`` (with a ``dedup.horizon``): the samples still in the
    index, the only ones "no two admitted within the threshold" covers — a copy that
    arrives after its original aged out is admitted, as the horizon means."""
    where = where or {}
    decided = ledger.decisions
    samples = {i for i, d in decided.items() if ("kept", None, None) in d}
    covered = samples if live is None else samples & live
    changed = {i: sorted(map(str, d)) for i, d in decided.items() if len(d) > 1}
    doubled_groups = [sorted(g & covered) for g in groups if len(g & covered) > 1]
    close = close_pairs(ledger.vectors, covered, threshold)
    uses: dict[str, set[str]] = {}
    for batch_id, copies in ledger.batches.items():
        for sample_id in copies[0][1]:
            uses.setdefault(sample_id, set()).add(batch_id)
    undecided = set(produced) - set(decided)
    in_flight = sorted(i for i in undecided if where.get(i) == "in flight")
    lost = sorted(undecided - set(in_flight))
    unbuffered = samples - in_buffers
    unbuffered_in_flight = sorted(i for i in unbuffered if where.get(i) == "in flight")
    unbuffered_lost = sorted(unbuffered - set(unbuffered_in_flight))
    changed_kept = sorted(i for i, d in decided.items()
                          if len(d) > 1 and ("kept", None, None) in d)
    return {
        "produced": len(produced),
        "with_outcome": len(set(produced) & set(decided)),
        "outcome_messages": sum(ledger.messages[i] for i in produced),
        "samples": len(samples),
        "rejected": len(set(decided) - samples),
        "resent_ids": sum(1 for i in produced if ledger.messages[i] > 1),
        "double_admissions": len(changed_kept) + sum(len(g) - 1 for g in doubled_groups)
        + len(close),
        "lost": len(lost),
        "lost_ids": {i: where.get(i, "no outcome") for i in lost[:50]},
        "in_flight": len(in_flight),
        "in_flight_ids": in_flight[:20],
        "changed": dict(list(changed.items())[:50]),
        "groups_doubled": doubled_groups[:50],
        "close_pairs": close[:50],
        "vset": len(index),
        "vset_missing": sorted(samples - index)[:50],
        "vset_missing_n": len(samples - index),
        "vset_extra": sorted(index - samples)[:50],
        "vset_extra_n": len(index - samples),
        "batches": len(ledger.batches),
        "batches_changed": sorted(b for b, c in ledger.batches.items()
                                  if len({d for d, _ in c}) > 1)[:50],
        "in_two_batches": {i: sorted(b) for i, b in uses.items() if len(b) > 1},
        "phantom": sorted(set(uses) - samples)[:50],
        "unbuffered": {i: where.get(i, "never buffered") for i in unbuffered_lost[:50]},
        "unbuffered_n": len(unbuffered_lost),
        "unbuffered_in_flight": len(unbuffered_in_flight),
        "unexpected": sorted(set(decided) - set(produced))[:50],
    }


def close_pairs(vectors: dict[str, np.ndarray], samples: set[str], threshold: float
                ) -> list[tuple[str, str, float]]:
    """Pairs of admitted samples at or above the cosine threshold, from the embeddings they
    carry (float16 on the wire: a margin of 1e-3 keeps rounding out)."""
    names = sorted(i for i in samples if i in vectors)
    if len(names) < 2:
        return []
    matrix = np.vstack([vectors[n] for n in names]).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    out = []
    for start in range(0, len(names), 1024):  # blocks: bounded memory on long runs
        block = matrix[start : start + 1024] @ matrix.T
        rows, cols = np.where(block >= threshold + 1e-3)
        out += [(names[start + r], names[c], float(block[r, c]))
                for r, c in zip(rows, cols, strict=True) if start + r < c]
    return out


def failures(figures: dict[str, Any]) -> list[str]:
    """Every broken guarantee, one line each with the ids."""
    checks = [("lost (no outcome)", figures["lost_ids"], figures["lost"]),
              ("outcomes that disagree", figures["changed"], len(figures["changed"])),
              ("groups of copies with two admitted", figures["groups_doubled"],
               len(figures["groups_doubled"])),
              ("samples within the threshold of each other", figures["close_pairs"],
               len(figures["close_pairs"])),
              ("samples missing from the vector set", figures["vset_missing"],
               figures["vset_missing_n"]),
              ("vector-set members that are no sample", figures["vset_extra"],
               figures["vset_extra_n"]),
              ("samples in two batches", figures["in_two_batches"],
               len(figures["in_two_batches"])),
              ("batch ids re-sent with other content", figures["batches_changed"],
               len(figures["batches_changed"])),
              ("batch samples that are no sample", figures["phantom"], len(figures["phantom"])),
              ("samples never buffered by balance (committed past)", figures["unbuffered"],
               figures["unbuffered_n"]),
              ("outcomes for ids never produced", figures["unexpected"],
               len(figures["unexpected"]))]
    return [f"{what}: {n}: {ids}" for what, ids, n in checks if n]
