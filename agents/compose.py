"""Batch composition: how many samples per class, and the CuratedBatch record itself.

Pure functions. ``allocate`` turns target shares into whole counts (largest remainder,
deterministic); ``allocate_with_credit`` carries each class's rounding remainder to the
next batch, so over many batches the composed mix follows the target to within one
sample per class instead of drifting by the same rounding every time. ``assemble_batch``
builds the ``CuratedBatch`` dict from drawn samples (``ClassBuffers.draw`` output).

Before allocating, the balance stage paces the targets by what each class can sustain
(``agents.sustain``).

Bounds, so that nothing a producer sends can grow a batch or a key without limit:

- ``label_problem`` says what is wrong with a label's text (the check the balance stage
  applies before a label becomes a Redis key or a metric label; ingest may call it too).
- ``agents.batch_bytes.fit_samples`` keeps a batch within the broker's message limit.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from schemas.errors import SluiceError
from schemas.records import BatchSample, CuratedBatch


class ComposeError(SluiceError):
    """A batch cannot be composed from what was given (a bug in the caller)."""


# -- labels ------------------------------------------------------------------------------------

#: A label is 1-64 characters: a letter or digit, then letters, digits and ``_ - . + # /``
#: (``python``, ``c++``, ``objective-c``, ``text/markdown``). Letters and digits are Unicode
#: ones (``str.isalnum``); spaces, control characters, quotes, braces and colons are not
#: allowed, so a label is safe in a Redis key, a metric name and a Prometheus label.
LABEL_MAX_CHARS = 64
_LABEL = re.compile(r"[^\W_][\w.+#/-]*")


def label_problem(label: object) -> str | None:
    """What is wrong with ``label`` as a class name (None: nothing).

    The reasons are ``label_not_text``, ``label_empty``, ``label_too_long`` and
    ``label_characters``; pure, for any stage that must check a producer's label.
    """
    if not isinstance(label, str):
        return "label_not_text"
    if not label:
        return "label_empty"
    if len(label) > LABEL_MAX_CHARS:
        return "label_too_long"
    if not _LABEL.fullmatch(label):
        return "label_characters"
    return None


def allocate(
    batch_size: int,
    shares: Mapping[str, float],
    available: Mapping[str, int],
    credit: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Whole numbers of samples per class for one batch.

    Each class with a positive share and something available gets about
    ``batch_size · share`` (+ its ``credit``), never more than ``available``; what a class
    cannot take goes to the others in proportion to their shares (water filling). Rounding
    is by largest remainder, ties broken by class name, so equal inputs give equal output.
    The counts sum to ``min(batch_size, available samples of the classes with a share)``;
    classes with no share or nothing available get 0 (and appear in the result).
    """
    if batch_size < 0:
        raise ComposeError(f"batch_size must be >= 0, got {batch_size}")
    credit = credit or {}
    out = {c: 0 for c in sorted(set(shares) | set(available))}
    active = {
        c: float(s)
        for c, s in shares.items()
        if s > 0.0 and math.isfinite(s) and available.get(c, 0) > 0
    }
    budget = min(batch_size, sum(available[c] for c in active))
    if budget == 0:
        return out
    # Ideal (real-valued) counts: water filling under the availability caps.
    ideal: dict[str, float] = {}
    free = dict(active)
    left = float(budget)
    while free:
        norm = sum(free.values())
        want = {c: left * s / norm + credit.get(c, 0.0) for c, s in free.items()}
        capped = {c for c, w in want.items() if w >= available[c]}
        if not capped:
            ideal.update({c: max(w, 0.0) for c, w in want.items()})
            break
        for c in capped:
            ideal[c] = float(available[c])
            left -= available[c]
            del free[c]
        left = max(left, 0.0)
    # Largest remainder: floors first, then the biggest fractions up to the budget.
    for c, w in ideal.items():
        out[c] = min(math.floor(w), available[c])
    short = budget - sum(out.values())
    order = sorted(ideal, key=lambda c: (-(ideal[c] - math.floor(ideal[c])), c))
    while short > 0:
        progressed = False
        for c in order:
            if short == 0:
                break
            if out[c] < available[c]:
                out[c] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    # Credit may have pushed the floors above the budget: take back from the smallest
    # fractions first.
    excess = sum(out.values()) - budget
    for c in reversed(order):
        if excess <= 0:
            break
        take = min(out[c], excess)
        out[c] -= take
        excess -= take
    return out


def allocate_with_credit(
    batch_size: int,
    shares: Mapping[str, float],
    available: Mapping[str, int],
    credit: Mapping[str, float] | None = None,
    *,
    max_credit: float = 1.0,
) -> tuple[dict[str, int], dict[str, float]]:
    """``allocate`` that carries rounding remainders between batches.

    Returns the counts and the new credit (target minus drawn, per class, clipped to
    ``±max_credit`` so a class starved by availability does not come back as a burst).
    Keep the credit in the balance state next to the class EMA.
    """
    counts = allocate(batch_size, shares, available, credit)
    drawn = sum(counts.values())
    total = sum(s for s in shares.values() if s > 0.0 and math.isfinite(s))
    new_credit: dict[str, float] = {}
    if total > 0.0:
        for c in sorted(set(shares) | set(credit or {})):
            s = shares.get(c, 0.0)
            target = drawn * s / total if s > 0.0 and math.isfinite(s) else 0.0
            owed = (credit or {}).get(c, 0.0) + target - counts.get(c, 0)
            clipped = max(-max_credit, min(max_credit, owed))
            if s > 0.0 and abs(clipped) > 1e-12:
                new_credit[c] = clipped
    return counts, new_credit


def lineage_digest(sample_digests: Sequence[str]) -> str:
    """Hex SHA-256 over the ordered sample digests: the batch's lineage key.

    The digests (hex SHA-256 of each sample's normalized content) are hashed as ASCII,
    each followed by a newline, in batch order.
    """
    h = hashlib.sha256()
    for digest in sample_digests:
        h.update(digest.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def batch_id(partition: int, sequence: int, digest: str) -> str:
    """``<partition>-<sequence>-<first 12 hex digits of the content digest>``."""
    return f"{partition}-{sequence}-{digest[:12]}"


_BATCH_ID = re.compile(r"([0-9]{1,9})-([0-9]{1,18})-[0-9a-f]{12}")


def parse_batch_id(batch_id_: object) -> tuple[int, int]:
    """(partition, sequence) of a batch id; ``ComposeError`` for anything else."""
    match = _BATCH_ID.fullmatch(batch_id_) if isinstance(batch_id_, str) else None
    if match is None:
        raise ComposeError(f"not a batch id: {str(batch_id_)[:80]!r}")
    return int(match.group(1)), int(match.group(2))


def partition_of(batch_id_: str) -> int:
    """The samples partition a batch id names (its first field)."""
    return parse_batch_id(batch_id_)[0]


def batch_order(
    samples: Sequence[Mapping[str, Any]], seed: int, partition: int, sequence: int
) -> list[Mapping[str, Any]]:
    """The samples shuffled deterministically from (seed, partition, sequence).

    Draws come out grouped by class; the trainer should not see them so. The same inputs
    always give the same order, so the content digest is reproducible.
    """
    rng = random.Random(f"{seed}:{partition}:{sequence}")
    out = list(samples)
    rng.shuffle(out)
    return out


def assemble_batch(
    *,
    partition: int,
    sequence: int,
    samples: Sequence[Mapping[str, Any]],
    policy: str,
    class_shares: Mapping[str, float],
    target_shares: Mapping[str, float],
    weights: Mapping[str, float],
    difficulty: Mapping[str, float] | None,
    created_at: int,
) -> CuratedBatch:
    """The ``CuratedBatch`` record for these samples, in the order given.

    Each sample is a mapping with at least ``id, label, kind, source, content, digest,
    embedding, embedding_dim`` (what ``ClassBuffers.draw`` returns) and optionally
    ``replay``; its weight is ``weights[label]`` (1.0 for a class the policy has no
    weight for, e.g. a replayed sample of a class that left the stream).
    """
    if not samples:
        raise ComposeError("a batch needs at least one sample")
    out: list[BatchSample] = []
    digests: list[str] = []
    for s in samples:
        try:
            out.append(
                BatchSample(
                    id=str(s["id"]),
                    label=str(s["label"]),
                    kind=s["kind"],
                    source=str(s["source"]),
                    content=str(s["content"]),
                    embedding=bytes(s["embedding"]),
                    embedding_dim=int(s["embedding_dim"]),
                    weight=float(weights.get(str(s["label"]), 1.0)),
                    replay=bool(s.get("replay", False)),
                )
            )
            digests.append(str(s["digest"]))
        except KeyError as exc:
            raise ComposeError(f"sample {s.get('id')!r} lacks field {exc}") from exc
    digest = lineage_digest(digests)
    return CuratedBatch(
        batch_id=batch_id(partition, sequence, digest),
        partition=partition,
        sequence=sequence,
        created_at=created_at,
        policy=policy,
        samples=out,
        class_shares={c: float(v) for c, v in class_shares.items()},
        target_shares={c: float(v) for c, v in target_shares.items()},
        difficulty={c: float(v) for c, v in (difficulty or {}).items()},
        content_digest=digest,
    )
