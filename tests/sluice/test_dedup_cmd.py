"""`sluice dedup` over a JSONL file of real stdlib functions with planted copies, through
the real command line (``CliRunner``), the session stack's Redis and the real model.

Prints precision and recall of "rejected as a duplicate" against the planted truth (run
with ``-s`` to see them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sluice.cli import cli
from sluice.settings import Settings
from tests.agents.pipeline_util import (
    DUPLICATE_REASONS,
    EDITS,
    EXPECTED_REASONS,
    Planted,
    corpus,
    plant,
    unique_id,
)

pytestmark = pytest.mark.integration


def line(event_id: str | None, content: str, label: str = "python") -> str:
    record: dict[str, Any] = {"source": "stdlib", "kind": "CODE", "language": "python",
                              "label": label, "content": content}
    if event_id is not None:
        record["id"] = event_id
    return json.dumps(record)


class Planting:
    """The input file: originals, distinct functions and planted copies (after their
    originals), two lines without an id, one broken line, one blank line."""

    def __init__(self, folder: Path) -> None:
        originals = [(f"orig-{s.name}", s.text) for s in corpus(8, start=0)]
        distinct = [(f"dist-{s.name}", s.text) for s in corpus(8, start=8)]
        copies = plant(originals, EDITS)
        self.planted: dict[str, Planted] = {p.id: p for p, _ in copies}
        # Originals come first: an earlier record wins over a later copy.
        body = [line(p.id, text) for p, text in copies]
        for n, (event_id, text) in enumerate(distinct):
            body.insert(5 * n, line(event_id, text, label="tools"))
        body.insert(5, '{"content": "this line is broken')
        no_id = corpus(2, start=16)
        body += [line(None, no_id[0].text), "", line(None, no_id[1].text)]
        self.lines = [line(i, t) for i, t in originals] + body
        self.path = folder / "input.jsonl"
        self.path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        self.kept = [i for i, _ in originals + distinct]


def run_dedup(settings: Settings, planting: Planting, out: Path, *extra: str
              ) -> list[dict[str, Any]]:
    result = CliRunner().invoke(
        cli, ["dedup", str(planting.path), "--out", str(out), *extra], obj=settings,
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]


def expected_ids(planting: Planting) -> list[str]:
    """The id each non-blank input line should be reported under, in order."""
    ids = []
    for number, text in enumerate(planting.lines, 1):
        if not text.strip():
            continue
        try:
            ids.append(json.loads(text).get("id") or f"line:{number}")
        except ValueError:
            ids.append(f"{planting.path}-0-{number}")
    return ids


def scores(planting: Planting, decisions: list[dict[str, Any]]) -> tuple[float, float]:
    """Precision and recall of 'rejected as a duplicate' against the planted copies."""
    flagged = {d["id"] for d in decisions if d["reason"] in DUPLICATE_REASONS}
    truth = set(planting.planted)
    hits = len(flagged & truth)
    return hits / max(len(flagged), 1), hits / len(truth)


def test_one_decision_per_line_in_order_and_every_copy_caught(
        stack: Settings, tmp_path: Path) -> None:
    planting = Planting(tmp_path)
    namespace = unique_id()
    decisions = run_dedup(stack, planting, tmp_path / "out.jsonl", "--namespace", namespace)
    assert [d["id"] for d in decisions] == expected_ids(planting)
    by_id = {d["id"]: d for d in decisions}
    for event_id in planting.kept:
        assert by_id[event_id]["keep"], by_id[event_id]
    wrong = []
    for copy_id, planted in planting.planted.items():
        d = by_id[copy_id]
        if (d["keep"] or d["reason"] not in EXPECTED_REASONS[planted.edit]
                or d["duplicate_of"] != planted.original):
            wrong.append(d)
    assert not wrong, wrong
    broken = [d for d in decisions if d["id"].startswith(str(planting.path))]
    assert [(d["keep"], d["reason"]) for d in broken] == [(False, "invalid:invalid_json")]
    assert all(by_id[i]["keep"] for i in by_id if i.startswith("line:"))
    precision, recall = scores(planting, decisions)
    print(f"\n[sluice dedup] {len(decisions)} lines, {len(planting.planted)} planted copies: "
          f"precision {precision:.3f}, recall {recall:.3f}")
    assert (precision, recall) == (1.0, 1.0)

    # Run again on the same namespace (a replay): every line gets the same decision.
    again = run_dedup(stack, planting, tmp_path / "again.jsonl", "--namespace", namespace)
    assert [(d["id"], d["keep"], d["reason"], d["duplicate_of"]) for d in again] == [
        (d["id"], d["keep"], d["reason"], d["duplicate_of"]) for d in decisions]


def test_without_the_model_only_exact_and_minhash_copies_are_caught(
        stack: Settings, tmp_path: Path) -> None:
    planting = Planting(tmp_path)
    decisions = run_dedup(stack, planting, tmp_path / "out.jsonl", "--namespace", unique_id(),
                          "--no-semantic")
    by_id = {d["id"]: d for d in decisions}
    assert "semantic_duplicate" not in {d["reason"] for d in decisions}
    for copy_id, planted in planting.planted.items():
        if planted.edit in ("exact", "whitespace"):
            assert by_id[copy_id]["duplicate_of"] == planted.original
    precision, recall = scores(planting, decisions)
    print(f"\n[sluice dedup --no-semantic] precision {precision:.3f}, recall {recall:.3f}")
    assert precision == 1.0
    assert 0.5 <= recall < 1.0
