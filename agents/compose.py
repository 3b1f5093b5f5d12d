"""Batch composition: how many samples per class, and the CuratedBatch record itself.

Pure functions. ``allocate`` turns target shares into whole counts (largest remainder,
deterministic); ``allocate_with_credit`` carries each class's rounding remainder to the
next batch, so over many batches the composed mix follows the target to within one
sample per class instead of drifting by the same rounding every time. ``assemble_batch``
builds the ``CuratedBatch`` dict from drawn samples (``ClassBuffers.draw`` output).

Before allocating, the balance stage paces the targets by what each class can sustain
(``sustainable_caps``, ``paced_shares``; ``update_flow`` measures the arrivals): a class is
never drawn faster than its fresh samples, its arrivals times the reuse cap, and its
repeated uses spread over the pool's remaining life allow, so a scarce class does not use
up its reuse in the first batches of a data-limited run and then vanish from the rest.

Bounds, so that nothing a producer sends can grow a batch or a key without limit:

- ``label_problem`` says what is wrong with a label's text (the check the balance stage
  applies before a label becomes a Redis key or a metric label; ingest may call it too).
- ``fit_samples`` keeps a batch within the broker's message limit: Avro sizes are computed
  exactly (``sample_bytes``, ``batch_overhead``), and when the samples do not fit, the
  longest contents are cut (at a UTF-8 boundary) to one common level, the smallest cut that
  fits (water filling: short samples are never touched).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

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


# -- sizes -------------------------------------------------------------------------------------

#: The single-object encoding's header: the 2-byte marker and the 8-byte fingerprint.
AVRO_HEADER_BYTES = 10


def _long_bytes(n: int) -> int:
    """Bytes of an Avro int/long: a zig-zag varint."""
    z = (n << 1) ^ (n >> 63)
    return max(1, (z.bit_length() + 6) // 7)


def _text_bytes(text: str) -> int:
    return _bytes_bytes(len(text.encode("utf-8")))


def _bytes_bytes(n: int) -> int:
    """Bytes of an Avro string or bytes value of ``n`` bytes: length, then the bytes."""
    return _long_bytes(n) + n


def sample_bytes(sample: Mapping[str, Any]) -> int:
    """Exact Avro size of one ``BatchSample`` made from ``sample``.

    id, label, kind (an enum index: 1 byte), source, content, embedding, embedding_dim,
    weight (a double: 8 bytes), replay (1 byte).
    """
    return (_text_bytes(str(sample["id"])) + _text_bytes(str(sample["label"])) + 1
            + _text_bytes(str(sample["source"])) + _text_bytes(str(sample["content"]))
            + _bytes_bytes(len(bytes(sample["embedding"])))
            + _long_bytes(int(sample["embedding_dim"])) + 8 + 1)


def _map_bytes(values: Mapping[str, float]) -> int:
    if not values:
        return 1
    return _long_bytes(len(values)) + sum(_text_bytes(k) + 8 for k in values) + 1


def batch_overhead(*, partition: int, sequence: int, created_at: int, policy: str,
                   class_shares: Mapping[str, float], target_shares: Mapping[str, float],
                   difficulty: Mapping[str, float] | None, samples: int) -> int:
    """Exact Avro size (single-object encoding) of a ``CuratedBatch`` less its samples.

    ``samples`` is how many there will be (the array's count takes a varint).
    """
    digest = "0" * 64
    return (AVRO_HEADER_BYTES + _text_bytes(batch_id(partition, sequence, digest))
            + _long_bytes(partition) + _long_bytes(sequence) + _long_bytes(created_at)
            + _text_bytes(policy)
            + (_long_bytes(samples) + 1 if samples else 1)
            + _map_bytes(class_shares) + _map_bytes(target_shares) + _map_bytes(difficulty or {})
            + _text_bytes(digest))


def kafka_reserve(limit: int, key_bytes: int) -> int:
    """What a Kafka message of at most ``limit`` bytes needs besides its value: the key, the
    record and record-batch framing (under 100 bytes), and gzip's framing of data that does
    not compress (5 bytes per 32 KiB block, at most): a generous bound."""
    return 512 + key_bytes + limit // 1024


def utf8_prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding has at most ``max_bytes`` bytes."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max(max_bytes, 0)].decode("utf-8", errors="ignore")


class Fitted(NamedTuple):
    """Samples that fit a byte budget, and which of them were cut or left out."""

    samples: list[dict[str, Any]]
    """The samples, in the order given, contents cut where needed."""
    truncated: list[Mapping[str, Any]]
    """The samples whose content was cut (as given)."""
    dropped: list[Mapping[str, Any]]
    """The samples left out: even with no content at all they would not fit (as given)."""


def _level(sizes: Sequence[int], budget: int) -> int:
    """The largest ``c`` with ``sum(min(s, c)) <= budget`` (0 when even 0 is too much)."""
    low, high = 0, max(sizes, default=0)
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(s, mid) for s in sizes) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def fit_samples(samples: Sequence[Mapping[str, Any]], budget: int) -> Fitted:
    """The samples, their ``BatchSample`` sizes summing to at most ``budget`` bytes.

    Nothing changes when they fit. Otherwise every sample above a common level ``c`` (the
    largest that fits) has its content cut to reach it; a sample that is above ``c`` even
    with an empty content (a huge id or source) is left out, the one with the largest such
    floor first, and the level is found again. Deterministic.
    """
    sizes = [sample_bytes(s) for s in samples]
    floors = [size - _text_bytes(str(s["content"])) + 1 for s, size in zip(samples, sizes,
                                                                          strict=True)]
    kept = list(range(len(samples)))
    dropped: list[int] = []
    level = max(sizes, default=0)
    while kept and sum(sizes[i] for i in kept) > budget:
        level = _level([sizes[i] for i in kept], budget)
        worst = max((i for i in kept if sizes[i] > level), key=lambda i: (floors[i], -i))
        if floors[worst] <= level:
            break
        kept.remove(worst)
        dropped.append(worst)
    out: list[dict[str, Any]] = []
    truncated: list[Mapping[str, Any]] = []
    for i in kept:
        sample = dict(samples[i])
        if sizes[i] > level:
            content = str(sample["content"])
            keep = len(content.encode("utf-8")) - (sizes[i] - level)
            sample["content"] = utf8_prefix(content, keep)
            truncated.append(samples[i])
        out.append(sample)
    return Fitted(out, truncated, [samples[i] for i in sorted(dropped)])


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


# -- pacing: what each class can sustain -------------------------------------------------------


class Supply(NamedTuple):
    """What one class's buffer can still give (``ClassBuffers.supply``)."""

    waiting: int
    """Samples queued, each with at least one use left."""
    uses: int
    """Uses left in them: the sum of ``reuse_cap − uses`` (between ``waiting`` and
    ``reuse_cap · waiting``)."""
    fresh: int
    """Queued samples never drawn yet."""


class Paced(NamedTuple):
    """The shares one batch is allocated by, after pacing (``paced_shares``)."""

    shares: dict[str, float]
    """Share of each class with a target in this batch; sums to 1 (empty: no targets)."""
    caps: dict[str, float]
    """The share of this batch each class can sustain (``sustainable_caps``)."""
    short: dict[str, float]
    """Classes held below their target share, by how much: the pool cannot meet the
    targets (empty when it can)."""


def sustainable_caps(
    draws: int,
    supply: Mapping[str, Supply],
    natural: Mapping[str, float],
    flow: float,
    reuse_cap: int,
) -> dict[str, float]:
    """The share of a batch of ``draws`` pool draws each buffered class can sustain.

    One rule for both regimes. With ``k = reuse_cap``, ``ρ = flow`` (samples arriving per
    sample drawn), ``ν_c`` the class's natural share (EMA) and ``U`` the pool's uses left::

        cap_c = fresh_c / draws + k·ρ·ν_c + max(0, 1 − k·ρ) · (uses_c − fresh_c) / U

    - A fresh sample is spent by the targets: drawing it now takes nothing from later
      that a later draw of it would not (``fresh_c / draws``: all of them, if wanted).
    - Arrivals sustain ``k·ρ·ν_c`` for good: each arriving sample of c gives k uses.
    - The repeated uses already buffered are spread over the pool's life: the pool loses
      ``1 − k·ρ`` uses per draw, so with no arrivals a class's reuse keeps pace with the
      pool's (its share of what is left stays put) instead of burning out in the first
      batches and leaving the later ones without the class. When arrivals alone sustain
      the pool (``k·ρ ≥ 1``, compute-limited) the stock needs no pacing.

    A class with nothing waiting gets 0. Pure; ``paced_shares`` applies the caps.
    """
    if draws <= 0:
        return {c: 0.0 for c in supply}
    k, rho = max(int(reuse_cap), 1), max(float(flow), 0.0)
    if not math.isfinite(rho):
        rho = 0.0
    left = sum(max(s.uses, 0) for s in supply.values())
    drain = max(0.0, 1.0 - k * rho)
    caps: dict[str, float] = {}
    for c, s in supply.items():
        if s.waiting <= 0:
            caps[c] = 0.0
            continue
        nu = float(natural.get(c, 0.0))
        reuse = max(s.uses - s.fresh, 0) / left if left > 0 else 0.0
        caps[c] = s.fresh / draws + k * rho * (nu if math.isfinite(nu) else 0.0) + drain * reuse
    return caps


def paced_shares(targets: Mapping[str, float], caps: Mapping[str, float],
                 tolerance: float = 1e-6) -> Paced:
    """The targets, each class held to its sustainable ``caps`` (water filling): what a
    class cannot sustain goes to the others in proportion to their targets, up to their
    caps. When even all caps together fall short of a batch, the rest still goes by target
    to the classes that have something waiting (cap > 0): the batch is composed as soon as
    the pool allows, with capped reuse, and ``short`` says that the targets were not met.
    Classes without a positive target get no share. Pure and deterministic."""
    active = {c: float(t) for c, t in sorted(targets.items()) if t > 0.0 and math.isfinite(t)}
    total = sum(active.values())
    if total <= 0.0:
        return Paced({}, dict(caps), {})
    target = {c: t / total for c, t in active.items()}
    out = dict.fromkeys(target, 0.0)
    free, left = dict(target), 1.0
    while free and left > 1e-12:
        norm = sum(free.values())
        want = {c: left * t / norm for c, t in free.items()}
        over = sorted(c for c in free if want[c] > max(caps.get(c, 0.0), 0.0))
        if not over:
            out.update(want)
            left = 0.0
            break
        for c in over:
            out[c] = max(caps.get(c, 0.0), 0.0)
            left -= out[c]
            del free[c]
    able = {c: t for c, t in target.items() if caps.get(c, 0.0) > 0.0}
    if left > 1e-12 and able:
        norm = sum(able.values())
        for c, t in able.items():
            out[c] += left * t / norm
    short = {c: target[c] - out[c] for c in target if out[c] < target[c] - tolerance}
    return Paced(out, dict(caps), short)


class Flow(NamedTuple):
    """Samples arriving per sample drawn: an EMA per drawn sample, bias-corrected as
    ``ClassEMA`` is (``weight`` is what the same recursion makes of a constant 1), so the
    first observation counts in full instead of being pulled towards 0."""

    total: float = 0.0
    weight: float = 0.0

    def get(self) -> float:
        """The estimate (0 before any observation)."""
        return self.total / self.weight if self.weight > 0.0 else 0.0


def update_flow(flow: Flow, arrived: int, drawn: int, alpha: float, window: int) -> Flow:
    """``flow`` after one batch that drew ``drawn`` samples from the pool while ``arrived``
    new ones came in since the previous batch. The decay per drawn sample is
    ``alpha ** (1 / window)``: as long a memory, in samples, as the class EMA's."""
    if drawn <= 0:
        return flow
    keep = alpha ** (drawn / window)
    return Flow(keep * flow.total + (1.0 - keep) * max(int(arrived), 0) / drawn,
                keep * flow.weight + (1.0 - keep))


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
