"""`sluice calibrate`: the choice is the one its sweep justifies, on real files with
planted copies, through the session stack's Redis; the pure parts against hand-made cases."""

from __future__ import annotations

import shutil
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sluice.calibrate import (
    SEMANTIC_GRID,
    Decisions,
    Point,
    calibrate,
    choose,
    choose_pair,
    closest_agreement,
    minhash_similarity,
    pair_points,
    semantic_grid,
    semantic_points,
    stream_keep,
)
from sluice.cli import cli
from sluice.settings import Settings, load_settings

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def real_corpus(folder: Path, n: int = 60) -> Path:
    """``n`` real stdlib modules (2-20 kB) copied into ``folder``."""
    picked = [p for p in sorted((STDLIB / "email").rglob("*.py"))
              + sorted((STDLIB / "json").rglob("*.py"))
              + sorted((STDLIB / "asyncio").rglob("*.py"))
              if 2_000 <= p.stat().st_size <= 20_000][:n]
    folder.mkdir()
    for k, path in enumerate(picked):
        shutil.copy(path, folder / f"{k:03d}_{path.name}")
    return folder


def test_stream_keep_drops_only_what_a_kept_item_matches() -> None:
    # 1 matches 0; 2 matches only 1 (dropped), so 2 is kept: the index compares with
    # what it admitted, not with everything it saw.
    sims = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.9], [0.1, 0.9, 1.0]])
    assert stream_keep(sims, 0.85).tolist() == [True, False, True]
    assert stream_keep(sims, 0.95).tolist() == [True, True, True]


def test_minhash_similarity_is_the_share_of_equal_minima() -> None:
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.uint32)
    b = np.array([[1, 2, 0, 0], [np.iinfo(np.uint32).max] * 4], dtype=np.uint32)
    assert minhash_similarity(a, b).tolist() == [[0.5, 0.0], [0.0, 0.0]]


def point(threshold: float, caught: float, lost: float) -> Point:
    return Point(threshold, {}, caught, lost, lost)


def test_choose_takes_the_most_recall_within_the_budget_then_the_stricter() -> None:
    points = [point(0.5, 1.0, 0.02), point(0.6, 0.9, 0.004), point(0.7, 0.9, 0.0),
              point(0.8, 0.5, 0.0)]
    assert choose(points, 0.005).threshold == 0.7
    assert choose(points, 0.05).threshold == 0.5
    assert choose([point(0.5, 1.0, 0.2), point(0.9, 0.4, 0.1)], 0.0).threshold == 0.9


def test_pairs_combine_the_layers_and_choose_within_the_budget() -> None:
    edits = ["rename", "edit", "edit"]
    # words catches the edits (copy 1 only at 0.5), code catches the rename; words at 0.5
    # also drops a distinct file that nothing drops at 0.9: that loss is beyond budget.
    words = Decisions(
        keep={0.5: np.array([True, False, True]), 0.9: np.array([True, True, True])},
        caught={0.5: np.array([False, True, True]), 0.9: np.array([False, False, True])})
    code = Decisions(
        keep={0.8: np.array([True, True, True]), 0.9: np.array([True, True, True])},
        caught={0.8: np.array([True, True, False]), 0.9: np.array([True, False, False])})
    pairs = pair_points(words, code, edits)
    assert len(pairs) == 4
    tw, tc, combined = choose_pair(pairs, max_lost=0.0)
    # (0.9, 0.8) catches all three without loss; (0.5, *) loses a third of the files.
    assert (tw, tc) == (0.9, 0.8)
    assert combined.caught == 1.0 and combined.recall == {"rename": 1.0, "edit": 1.0}
    assert choose_pair(pairs, max_lost=0.5)[:2] == (0.9, 0.8)  # ties go to the stricter


def cosines(copy: float) -> np.ndarray:
    """Three distinct files (the last two at cosine 0.96) and a copy of the first."""
    sims = np.eye(4)
    sims[1, 2] = sims[2, 1] = 0.96
    sims[0, 3] = sims[3, 0] = copy
    return sims


def test_a_backend_gets_the_threshold_where_it_agrees_with_torch() -> None:
    grid = (0.95, 0.965, 0.97, 0.99)
    edits, fuzzy_caught = ["rename"], np.array([False])
    torch_points, torch_keep = semantic_points(grid, cosines(0.975), 3, fuzzy_caught, edits,
                                               None)
    # 0.95 also drops a distinct file; 0.97 catches the copy and loses nothing.
    assert [p.caught for p in torch_points] == [1.0, 1.0, 1.0, 0.0]
    assert [round(p.lost, 3) for p in torch_points] == [0.333, 0.0, 0.0, 0.0]
    chosen = choose(torch_points, 0.0)
    assert chosen.threshold == 0.97
    # A backend that sees the copy at 0.968 keeps it at 0.97: it agrees fully only at 0.965.
    points, _ = semantic_points(grid, cosines(0.968), 3, fuzzy_caught, edits,
                                torch_keep[0.97])
    assert [p.agreement for p in points] == [0.75, 1.0, 0.75, 0.75]
    assert closest_agreement(points, 0.97).threshold == 0.965


def test_a_backend_that_sees_everything_closer_is_searched_above_torch_s_grid() -> None:
    """A static model puts unrelated files closer (two distinct files at 0.996, the copy at
    0.999): it agrees with torch only at 0.9975, above torch's grid, which stays as it is
    (its "lost" is measured against its own strictest threshold)."""
    assert semantic_grid("torch") == SEMANTIC_GRID and max(SEMANTIC_GRID) == 0.99
    _, torch_keep = semantic_points(SEMANTIC_GRID, cosines(0.975), 3, np.array([False]),
                                    ["rename"], None)
    sims = cosines(0.999)
    sims[1, 2] = sims[2, 1] = 0.996
    points, _ = semantic_points(semantic_grid("static"), sims, 3, np.array([False]),
                                ["rename"], torch_keep[0.97])
    best = closest_agreement(points, 0.97)
    assert (best.threshold, best.agreement) == (0.9975, 1.0)
    assert max(p.agreement or 0.0 for p in points if p.threshold <= 0.99) == 0.75


@pytest.mark.integration
def test_calibration_on_real_files_chooses_what_its_sweep_justifies(
        stack: Settings, tmp_path: Path) -> None:
    corpus = real_corpus(tmp_path / "corpus")
    result = calibrate(stack, [corpus], limit=60, originals=15, max_lost=0.02,
                       semantic=False)
    assert result.distinct >= 30 and sum(result.copies.values()) >= 60
    tw, tc, combined = choose_pair(result.pairs, 0.02)
    assert result.chosen["words"].threshold == tw
    assert result.chosen["code-tokens"].threshold == tc
    assert combined.lost <= 0.02
    # No pair within the budget catches more, and every pair the grid allows was weighed.
    assert all(p.caught <= combined.caught for _, _, p in result.pairs if p.lost <= 0.02)
    assert len(result.pairs) == len(result.sweeps["words"]) * len(result.sweeps["code-tokens"])
    # The code layer is what catches renamed copies: the words layer alone misses them.
    assert result.chosen["code-tokens"].recall["rename"] >= 0.9
    assert result.chosen["words"].recall["rename"] < 0.5
    # The product's pipeline at the chosen thresholds does what the sweep predicted (LSH
    # finds a pair at the threshold with probability ~0.95, so a little less is allowed).
    assert result.verified["caught"] >= combined.caught - 0.05
    assert result.verified["dropped"] <= combined.dropped + 0.02
    assert result.settings() == {"fuzzy": {"threshold": tw}, "fuzzy.code": {"threshold": tc}}


@pytest.mark.integration
def test_command_writes_the_settings_and_never_overwrites_without_force(
        stack: Settings, tmp_path: Path) -> None:
    corpus = real_corpus(tmp_path / "corpus", n=30)
    out = tmp_path / "calibrated.toml"
    out.write_text("# mine\n")
    args = ["calibrate", str(corpus), "--no-semantic", "--limit", "30", "--originals", "8",
            "--out", str(out)]
    refused = CliRunner().invoke(cli, args, obj=stack)
    assert refused.exit_code == 1 and "--force" in refused.output
    assert out.read_text() == "# mine\n"
    result = CliRunner().invoke(cli, [*args, "--force"], obj=stack, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = tomllib.loads(out.read_text())
    assert set(written) == {"fuzzy"} and set(written["fuzzy"]) == {"threshold", "code"}
    settings = load_settings(out)  # the file is valid settings as it stands
    assert settings.fuzzy.threshold == written["fuzzy"]["threshold"]
    assert settings.fuzzy.code.threshold == written["fuzzy"]["code"]["threshold"]
