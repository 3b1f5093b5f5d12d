"""Pacing: what each class can sustain.

Before allocating, the balance stage paces the targets by what each class can sustain
(``sustainable_caps``, ``paced_shares``; ``update_flow`` measures the arrivals): a class is
never drawn faster than its fresh samples, its arrivals times the reuse cap, and its
repeated uses spread over the pool's remaining life allow, so a scarce class does not use
up its reuse in the first batches of a data-limited run and then vanish from the rest.
Pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple


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
