"""Sampling policies: from EMA class counts to the class mix a batch should have.

Every policy gives each class a per-sample weight ``w_c`` (the class re-weighting of the
imbalanced-learning literature); a class is then *drawn* with probability proportional to
its natural share times that weight, times the difficulty factor from the trainer:

    target_c ∝ share_c · w_c · difficulty_c^γ

| policy             | w_c                | target ∝ (γ = 0)         | effect                   |
|--------------------|--------------------|--------------------------|--------------------------|
| `natural`          | 1                  | share_c                  | the stream's own mix     |
| `inverse`          | 1 / (ema_c + ε)    | ema_c / (ema_c + ε)      | ≈ uniform; ε damps rare  |
| `power`            | share_c^(−τ)       | share_c^(1−τ)            | τ=0 natural, τ=1 uniform |
| `effective_number` | (1−β) / (1−β^n_c)  | share_c·(1−β)/(1−β^n_c)  | Cui et al. 2019          |

``ema_c`` is the (bias-corrected) EMA count of class c per window, ``ClassEMA.get()``; ε is
in the same unit (samples per window), so with ε=1 a class seen about once per window gets
half the weight a uniform mix would give it. For ``effective_number`` the number of samples
``n_c`` is ``ema_c · horizon``: pass ``horizon = 1 / (1 − α)`` (windows the EMA remembers)
so ``n_c`` counts the samples in the EMA's memory — with an all-time count every class
would saturate and the policy would drift back to natural.

Source priorities (``balance.source_priorities``) multiply the targets too: a class's
``priority_c`` is the mean priority of the sources of its recent samples
(``update_priority``, an EMA as long as the class EMA's), so

    target_c ∝ share_c · w_c · difficulty_c^γ · priority_c

and a class fed mostly by a source of priority 2 gets twice the draw it would get.

The importance weight of a drawn sample is ``target_c / share_c`` (CuratedBatch.v1's
``weight``): how much more often its class is drawn than the stream offers it. A trainer
that wants the natural-mix risk back multiplies its loss by ``1 / weight``. When the pool
cannot sustain a class's target (``agents.sustain.paced_shares``) the balance stage draws
it at its paced share instead, and the weight it records is that share over ``share_c``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, NamedTuple, get_args

from agents.config import BalanceSettings
from schemas.errors import SluiceError

Policy = Literal["natural", "inverse", "power", "effective_number"]
POLICIES: tuple[str, ...] = get_args(Policy)


# The defaults of the keyword parameters below are the settings' declared defaults.
_DEFAULT = BalanceSettings()


class PolicyError(SluiceError):
    """An unknown policy or an invalid policy parameter."""


class Targets(NamedTuple):
    """What a policy aims at, per class."""

    shares: dict[str, float]
    """Target share of each class in a batch; sums to 1 (empty when nothing is known)."""
    weights: dict[str, float]
    """Importance weight of a sample of the class: target share / natural share."""
    natural: dict[str, float]
    """The natural (EMA) share of each class."""


def class_weights(
    ema: Mapping[str, float],
    policy: str,
    *,
    epsilon: float = _DEFAULT.epsilon,
    tau: float = _DEFAULT.tau,
    beta: float = _DEFAULT.beta,
    horizon: float = 1.0,
) -> dict[str, float]:
    """Per-sample weight ``w_c`` of each class with a positive EMA count (see module doc)."""
    if policy not in POLICIES:
        raise PolicyError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if epsilon <= 0 or tau < 0 or not 0 < beta < 1 or horizon <= 0:
        raise PolicyError(
            f"invalid policy parameters: epsilon={epsilon} tau={tau} beta={beta} "
            f"horizon={horizon}"
        )
    counts = {c: float(v) for c, v in ema.items() if v > 0.0 and math.isfinite(v)}
    total = sum(counts.values())
    if total <= 0.0:
        return {}
    if policy == "natural":
        return dict.fromkeys(counts, 1.0)
    if policy == "inverse":
        return {c: 1.0 / (v + epsilon) for c, v in counts.items()}
    if policy == "power":
        return {c: (v / total) ** -tau for c, v in counts.items()}
    # effective_number: E_n = (1 − β^n) / (1 − β), weight = 1 / E_n. -expm1(n·ln β) keeps
    # precision when β^n is close to 1 (few samples).
    log_beta = math.log(beta)
    return {c: (1.0 - beta) / -math.expm1(v * horizon * log_beta) for c, v in counts.items()}


def target_shares(
    ema: Mapping[str, float],
    policy: str,
    *,
    epsilon: float = _DEFAULT.epsilon,
    tau: float = _DEFAULT.tau,
    beta: float = _DEFAULT.beta,
    difficulty: Mapping[str, float] | None = None,
    gamma: float = _DEFAULT.difficulty_gamma,
    horizon: float = 1.0,
    priority: Mapping[str, float] | None = None,
) -> Targets:
    """The class mix the policy aims at, from EMA class counts per window.

    ``difficulty`` is the loss factor per class (class loss / mean class loss); a class
    missing from it counts as 1. Classes with a zero EMA count get no share. If the
    difficulty factors zero every class out, the policy's mix without them is used.
    ``priority`` is each class's source priority (``update_priority``; missing: 1).
    """
    weights = class_weights(
        ema, policy, epsilon=epsilon, tau=tau, beta=beta, horizon=horizon
    )
    total = sum(float(ema[c]) for c in weights)
    natural = {c: float(ema[c]) / total for c in sorted(weights)}
    if not natural:
        return Targets({}, {}, {})
    raw = {c: natural[c] * weights[c] for c in natural}
    if difficulty and gamma != 0.0:
        adjusted = {c: raw[c] * _factor(difficulty.get(c, 1.0), gamma) for c in raw}
        if sum(adjusted.values()) > 0.0:
            raw = adjusted
    if priority:
        prioritized = {c: raw[c] * _factor(priority.get(c, 1.0), 1.0) for c in raw}
        if sum(prioritized.values()) > 0.0:
            raw = prioritized
    norm = sum(raw.values())
    shares = {c: v / norm for c, v in raw.items()}
    return Targets(
        shares=shares,
        weights={c: shares[c] / natural[c] for c in shares},
        natural=natural,
    )


def update_priority(current: float | None, priority: float, alpha: float, window: int
                    ) -> float:
    """A class's source priority after one more sample from a source of ``priority``: an
    EMA per sample with decay ``alpha ** (1 / window)``, so it remembers as long as the class
    EMA (decay ``alpha`` per window); the first sample sets it."""
    if current is None:
        return float(priority)
    decay = alpha ** (1.0 / window)
    return decay * current + (1.0 - decay) * float(priority)


def _factor(difficulty: float, gamma: float) -> float:
    if not math.isfinite(difficulty) or difficulty <= 0.0:
        return 0.0
    return float(difficulty**gamma)


def policy_label(
    policy: str,
    *,
    epsilon: float = _DEFAULT.epsilon,
    tau: float = _DEFAULT.tau,
    beta: float = _DEFAULT.beta,
    gamma: float = _DEFAULT.difficulty_gamma,
) -> str:
    """The policy with its parameter, as recorded in ``CuratedBatch.policy``.

    E.g. ``inverse(epsilon=0.1,gamma=1.0)``, ``power(tau=0.5,gamma=0.0)``.
    """
    if policy not in POLICIES:
        raise PolicyError(f"unknown policy {policy!r}")
    params = {"natural": "", "inverse": f"epsilon={epsilon},", "power": f"tau={tau},",
              "effective_number": f"beta={beta},"}[policy]
    return f"{policy}({params}gamma={gamma})"


def targets_for(
    counts: Mapping[str, float],
    settings: BalanceSettings,
    difficulty: Mapping[str, float] | None = None,
    priority: Mapping[str, float] | None = None,
) -> Targets:
    """``target_shares`` with the balance settings (``counts`` is ``ClassEMA.get()``).

    ``horizon`` is the EMA's memory in windows, ``1 / (1 − α)``; ``priority``: the
    classes' source priorities (used only when ``source_priorities`` names any).
    """
    return target_shares(
        counts,
        settings.policy,
        epsilon=settings.epsilon,
        tau=settings.tau,
        beta=settings.beta,
        difficulty=difficulty,
        gamma=settings.difficulty_gamma,
        horizon=1.0 / (1.0 - settings.alpha),
        priority=priority if settings.source_priorities else None,
    )


def label_for(settings: BalanceSettings) -> str:
    """``policy_label`` with the balance settings."""
    return policy_label(
        settings.policy,
        epsilon=settings.epsilon,
        tau=settings.tau,
        beta=settings.beta,
        gamma=settings.difficulty_gamma,
    )
