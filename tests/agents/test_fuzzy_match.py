"""Which earlier item a near-duplicate names (``agents.near_match.earliest_match``).

Pure: signatures are built so that their estimated Jaccard is known exactly (the share of
equal positions). The rule is the earliest item at or above the threshold, not the most
similar one: an item admitted later never changes what an earlier decision named, so a
replay names the same original (the cluster replay test once saw the most-similar rule
flip between two members of one group of copies).
"""

from __future__ import annotations

import numpy as np

from agents.near_match import Stored, earliest_match

PERM = 100


def sig_like(base: np.ndarray, same: float, salt: int) -> np.ndarray:
    """A signature equal to ``base`` in the first ``same`` share of positions."""
    out = base.copy()
    k = round(same * PERM)
    out[k:] = np.arange(PERM - k, dtype=np.uint32) + np.uint32(10_000 * (salt + 1))
    return out


BASE = np.arange(PERM, dtype=np.uint32)


def test_the_earliest_item_over_the_threshold_is_named_not_the_most_similar() -> None:
    stored = {"late-close": Stored(sig_like(BASE, 0.95, 1), 7),
              "early-far-enough": Stored(sig_like(BASE, 0.85, 2), 3)}
    assert earliest_match(BASE, stored, np.empty((0, PERM), np.uint32), [], 0.8) == (
        "early-far-enough", 0.85)


def test_an_earlier_item_under_the_threshold_is_not_named() -> None:
    stored = {"early-far": Stored(sig_like(BASE, 0.5, 1), 1),
              "late-close": Stored(sig_like(BASE, 0.9, 2), 9)}
    assert earliest_match(BASE, stored, np.empty((0, PERM), np.uint32), [], 0.8) == (
        "late-close", 0.9)


def test_the_index_comes_before_the_batch_and_the_batch_in_its_order() -> None:
    batch = np.stack([sig_like(BASE, 0.82, 1), sig_like(BASE, 0.99, 2)])
    assert earliest_match(BASE, {}, batch, ["first", "second"], 0.8) == ("first", 0.82)
    stored = {"indexed": Stored(sig_like(BASE, 0.81, 3), 5)}
    assert earliest_match(BASE, stored, batch, ["first", "second"], 0.8) == ("indexed", 0.81)


def test_nothing_over_the_threshold_is_no_match() -> None:
    stored = {"far": Stored(sig_like(BASE, 0.6, 1), 1)}
    batch = np.stack([sig_like(BASE, 0.7, 2)])
    assert earliest_match(BASE, stored, batch, ["b"], 0.8) is None
    assert earliest_match(BASE, {}, np.empty((0, PERM), np.uint32), [], 0.8) is None
