"""Online statistics of the balance and feedback stages, in the river style.

Each statistic is a small object with ``update(...)`` and ``get()``, serialized with
``to_dict()``/``from_dict()`` to a JSON-able dict. A Faust table keeps that dict and the
agent *reassigns* it after every update (``table[key] = stat.to_dict()``): a value changed
in place never reaches the changelog, and ``to_dict`` always builds a fresh dict.

- ``ClassEMA``: exponentially-moving class counts per window of samples,
  ``ema_c ← α·ema_c + (1−α)·count_c(window)``; its half-life in samples is
  ``window · ln 2 / −ln α``.
- ``LossEMA``: the trainer's loss per class (EMA of the mean and of the squared loss, so a
  mean and a standard deviation) and the same over all classes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas.errors import SluiceError


class StatsStateError(SluiceError):
    """A serialized statistic is malformed or belongs to other parameters."""


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha < 1.0:
        raise StatsStateError(f"alpha must be in [0, 1), got {alpha}")
    return float(alpha)


def half_life_samples(alpha: float, window: int) -> float:
    """Samples after which a step change of the mix is half absorbed by ``ClassEMA``."""
    _check_alpha(alpha)
    if alpha == 0.0:
        return float(window)
    return window * math.log(2.0) / -math.log(alpha)


class ClassEMA:
    """Exponentially-moving counts of samples per class, updated once per window.

    Samples are counted in the current window; each time ``window`` samples have been
    seen, every class seen so far moves: ``ema_c ← α·ema_c + (1−α)·count_c`` (a class
    absent from the window decays). ``norm`` follows the same recursion with a count of 1,
    so ``ema_c / norm`` is the bias-corrected count per window (Adam's correction: all
    classes start at 0, so early estimates are not pulled towards 0).
    """

    def __init__(self, alpha: float, window: int) -> None:
        if window < 1:
            raise StatsStateError(f"window must be >= 1, got {window}")
        self.alpha = _check_alpha(alpha)
        self.window = int(window)
        self.ema: dict[str, float] = {}
        self.norm = 0.0
        self.current: dict[str, int] = {}
        self.seen = 0  # samples in the current window
        self.windows = 0  # full windows folded into the EMA
        self.total = 0  # samples ever counted

    # -- update --------------------------------------------------------------------------
    def update(self, label: str, n: int = 1) -> ClassEMA:
        """Count ``n`` samples of ``label`` (one at a time, so windows close exactly)."""
        for _ in range(n):
            self.current[label] = self.current.get(label, 0) + 1
            self.seen += 1
            self.total += 1
            if self.seen >= self.window:
                self._close_window()
        return self

    def update_many(self, labels: Iterable[str]) -> ClassEMA:
        """Count one sample per label, in order."""
        for label in labels:
            self.update(label)
        return self

    def _close_window(self) -> None:
        a = self.alpha
        for label in self.ema.keys() | self.current.keys():
            self.ema[label] = a * self.ema.get(label, 0.0) + (1.0 - a) * self.current.get(label, 0)
        self.norm = a * self.norm + (1.0 - a)
        self.windows += 1
        self.current = {}
        self.seen = 0

    # -- read ----------------------------------------------------------------------------
    def get(self) -> dict[str, float]:
        """Bias-corrected EMA count per window of each class.

        Before the first full window: the current window's counts scaled to a full window.
        """
        if self.windows == 0 or self.norm <= 0.0:
            if self.seen == 0:
                return {}
            scale = self.window / self.seen
            return {c: n * scale for c, n in sorted(self.current.items())}
        return {c: v / self.norm for c, v in sorted(self.ema.items())}

    def shares(self) -> dict[str, float]:
        """The EMA class mix, normalized to sum to 1 (empty before any sample)."""
        counts = self.get()
        total = sum(counts.values())
        if total <= 0.0:
            return {}
        return {c: v / total for c, v in counts.items()}

    # -- combine and serialize -----------------------------------------------------------
    def merge(self, other: ClassEMA) -> ClassEMA:
        """A new EMA whose ``get()`` is the sum of both (e.g. all partitions of a topic).

        Both must have the same α and window. The merged EMA keeps the larger ``norm``
        and rescales each side's raw values to it, so corrected counts add exactly.
        """
        if (self.alpha, self.window) != (other.alpha, other.window):
            raise StatsStateError("cannot merge ClassEMAs with different alpha or window")
        out = ClassEMA(self.alpha, self.window)
        out.norm = max(self.norm, other.norm)
        for part in (self, other):
            if part.norm > 0.0:
                for c, v in part.ema.items():
                    out.ema[c] = out.ema.get(c, 0.0) + v * out.norm / part.norm
            for c, n in part.current.items():
                out.current[c] = out.current.get(c, 0) + n
        out.windows = max(self.windows, other.windows)
        out.seen = self.seen + other.seen
        out.total = self.total + other.total
        return out

    def to_dict(self) -> dict[str, Any]:
        """A fresh JSON-able dict of the whole state."""
        return {
            "alpha": self.alpha,
            "window": self.window,
            "ema": dict(self.ema),
            "norm": self.norm,
            "current": dict(self.current),
            "seen": self.seen,
            "windows": self.windows,
            "total": self.total,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ClassEMA:
        """Rebuild from ``to_dict`` output; raise ``StatsStateError`` when malformed."""
        try:
            out = cls(float(state["alpha"]), int(state["window"]))
            out.ema = {str(c): float(v) for c, v in state["ema"].items()}
            out.norm = float(state["norm"])
            out.current = {str(c): int(v) for c, v in state["current"].items()}
            out.seen = int(state["seen"])
            out.windows = int(state["windows"])
            out.total = int(state["total"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StatsStateError(f"malformed ClassEMA state: {exc!r}") from exc
        return out

    @classmethod
    def restore(
        cls, state: Mapping[str, Any] | None, alpha: float, window: int
    ) -> ClassEMA:
        """The stored state, or a fresh EMA when there is none or its parameters changed.

        A change of α or window in the settings starts the statistics afresh rather
        than mixing two recursions.
        """
        if state:
            ema = cls.from_dict(state)
            if ema.alpha == alpha and ema.window == window:
                return ema
        return cls(alpha, window)

    def __repr__(self) -> str:
        return f"ClassEMA(alpha={self.alpha}, window={self.window}, shares={self.shares()})"


@dataclass
class EWMoments:
    """Exponentially-weighted mean and mean square, with bias correction.

    One ``update(mean, mean_sq)`` per observation group (a batch): the EMA of the group
    means and of the group mean squares, so ``std`` covers both the spread inside groups
    and between them.
    """

    alpha: float
    mean_raw: float = 0.0
    sq_raw: float = 0.0
    norm: float = 0.0
    count: int = 0  # individual values folded in

    def update(self, mean: float, mean_sq: float, count: int = 1) -> EWMoments:
        """Fold in one group with this mean and mean square of ``count`` values."""
        a = self.alpha
        self.mean_raw = a * self.mean_raw + (1.0 - a) * mean
        self.sq_raw = a * self.sq_raw + (1.0 - a) * mean_sq
        self.norm = a * self.norm + (1.0 - a)
        self.count += count
        return self

    def update_values(self, values: Iterable[float]) -> EWMoments:
        """Fold in one group given by its values (nothing happens for an empty group)."""
        xs = [float(x) for x in values]
        if xs:
            n = len(xs)
            self.update(sum(xs) / n, sum(x * x for x in xs) / n, n)
        return self

    @property
    def mean(self) -> float:
        """Bias-corrected mean (0 before any value)."""
        return self.mean_raw / self.norm if self.norm > 0.0 else 0.0

    @property
    def std(self) -> float:
        """Bias-corrected standard deviation (0 before any value)."""
        if self.norm <= 0.0:
            return 0.0
        var = self.sq_raw / self.norm - self.mean**2
        return math.sqrt(max(var, 0.0))  # rounding may leave a tiny negative

    def get(self) -> float:
        """The mean."""
        return self.mean

    def to_dict(self) -> dict[str, Any]:
        """A fresh JSON-able dict."""
        return {"mean": self.mean_raw, "sq": self.sq_raw, "norm": self.norm, "n": self.count}

    @classmethod
    def from_dict(cls, alpha: float, state: Mapping[str, Any]) -> EWMoments:
        """Rebuild from ``to_dict`` output."""
        return cls(
            alpha=alpha,
            mean_raw=float(state["mean"]),
            sq_raw=float(state["sq"]),
            norm=float(state["norm"]),
            count=int(state["n"]),
        )


class LossEMA:
    """The trainer's per-sample losses, as EMAs per class and over all classes.

    ``update`` takes one feedback record's losses: each class present moves once with the
    mean (and mean square) of its losses in that record; a class absent keeps its value
    (its loss is unknown, not zero). The overall statistic moves once per record with all
    its losses. EMAs, not all-time averages, because the trainer's loss keeps falling.
    """

    def __init__(
        self,
        alpha: float,
        classes: dict[str, EWMoments] | None = None,
        overall: EWMoments | None = None,
    ) -> None:
        self.alpha = _check_alpha(alpha)
        self.classes: dict[str, EWMoments] = classes if classes is not None else {}
        self.overall = overall if overall is not None else EWMoments(self.alpha)

    def update(self, losses: Iterable[tuple[str, float]]) -> LossEMA:
        """Fold in one record's ``(label, loss)`` pairs (non-finite losses are skipped)."""
        by_class: dict[str, list[float]] = {}
        for label, loss in losses:
            if math.isfinite(loss):
                by_class.setdefault(label, []).append(float(loss))
        for label in sorted(by_class):
            stat = self.classes.setdefault(label, EWMoments(self.alpha))
            stat.update_values(by_class[label])
        self.overall.update_values([x for label in sorted(by_class) for x in by_class[label]])
        return self

    def get(self) -> dict[str, float]:
        """Mean loss per class."""
        return {c: s.mean for c, s in sorted(self.classes.items())}

    def std(self) -> dict[str, float]:
        """Standard deviation of the loss per class."""
        return {c: s.std for c, s in sorted(self.classes.items())}

    def to_dict(self) -> dict[str, Any]:
        """A fresh JSON-able dict."""
        return {
            "alpha": self.alpha,
            "classes": {c: s.to_dict() for c, s in self.classes.items()},
            "overall": self.overall.to_dict(),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LossEMA:
        """Rebuild from ``to_dict`` output; raise ``StatsStateError`` when malformed."""
        try:
            alpha = float(state["alpha"])
            return cls(
                alpha=alpha,
                classes={
                    str(c): EWMoments.from_dict(alpha, s) for c, s in state["classes"].items()
                },
                overall=EWMoments.from_dict(alpha, state["overall"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StatsStateError(f"malformed LossEMA state: {exc!r}") from exc

    @classmethod
    def restore(cls, state: Mapping[str, Any] | None, alpha: float) -> LossEMA:
        """The stored state, or a fresh one when there is none or α changed."""
        if state:
            ema = cls.from_dict(state)
            if ema.alpha == alpha:
                return ema
        return cls(alpha)
