"""The pure half of semantic admission (``agents.admission``): decisions by FP32 cosine."""

from __future__ import annotations

import numpy as np

from agents.admission import Decision, decide, nearest, settle


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


A, A2, B = unit(1, 0, 0), unit(1, 0.1, 0), unit(0, 1, 0)
COS_A_A2 = float(A @ A2)  # ≈ 0.995


def test_nearest_is_the_highest_cosine_and_ties_go_to_the_first() -> None:
    assert nearest(A, [], np.zeros((0, 3), dtype=np.float32)) is None
    assert nearest(A, ["b", "a2"], np.stack([B, A2])) == ("a2", COS_A_A2)
    assert nearest(A, ["x", "y"], np.stack([A2, A2]))[0] == "x"  # type: ignore[index]


def test_decide_by_the_fp32_cosine_against_candidates_and_the_batch() -> None:
    got = decide(np.stack([A, B, A2]), ["a", "b", "a2"], [{}, {}, {}], threshold=0.99)
    assert got == [Decision(None, None), Decision(None, 0.0), Decision("a", COS_A_A2)]
    # The same pair just above the threshold is kept, naming how near it came.
    got = decide(np.stack([A, A2]), ["a", "a2"], [{}, {}], threshold=COS_A_A2 + 1e-6)
    assert got[1] == Decision(None, COS_A_A2)
    # An index candidate blocks like an earlier item of the batch.
    assert decide(A2[None], ["a2"], [{"old": A}], 0.99) == [Decision("old", COS_A_A2)]


def test_settle_the_later_registered_loses_to_the_first_winner_in_the_window() -> None:
    kept = {"mine-a": A2, "mine-b": B}
    window = {"far": unit(0, 0, 1), "theirs-a": A, "theirs-a-again": A2}
    assert settle(kept, window, 0.99) == {"mine-a": ("theirs-a", COS_A_A2)}
    assert settle(kept, {}, 0.99) == {} and settle({}, window, 0.99) == {}
