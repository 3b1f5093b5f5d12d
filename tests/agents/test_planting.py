"""The planted edits on real stdlib files, and reading a user's corpus for calibration."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

from pygments.token import Comment, String

from agents.code_tokens import CodeDoc, code_tokens
from agents.planting import EDITS, gather, lexer_of, planted, rename, reorder, strip

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXT = (STDLIB / "textwrap.py").read_text(encoding="utf-8")


def test_rename_changes_every_name_but_not_the_normalized_tokens() -> None:
    renamed = rename(TEXT, "python", random.Random(0))
    assert "def dedent" not in renamed and renamed != TEXT
    assert code_tokens(CodeDoc(renamed, "python")) == code_tokens(CodeDoc(TEXT, "python"))


def test_strip_removes_comments_and_docstrings_only() -> None:
    stripped = strip(TEXT, "python", random.Random(0))
    lexer = lexer_of("python")
    assert lexer is not None

    def comments(text: str) -> list[str]:
        return [v for k, v in lexer.get_tokens(text) if k in Comment or k in String.Doc]

    assert comments(TEXT) and not comments(stripped)
    assert '"""' not in stripped
    assert code_tokens(CodeDoc(stripped, "python")) == code_tokens(CodeDoc(TEXT, "python"))


def test_reorder_keeps_every_line() -> None:
    shuffled = reorder(TEXT, "python", random.Random(1))
    assert shuffled != TEXT
    assert sorted(filter(None, shuffled.split("\n"))) == sorted(filter(None, TEXT.split("\n")))


def test_edits_that_change_nothing_are_not_planted() -> None:
    code = {"id": "a", "content": TEXT, "language": "python", "kind": "CODE"}
    # No lexer knows this language: rename and strip have nothing to work on.
    prose = {"id": "b", "content": "Plain words here.\n\nAnd more words.\n", "language": "zz",
             "kind": "TEXT"}
    for kind in EDITS:
        copies = planted([code, prose], kind, seed=0)
        assert copies[0]["original"] == "a" and copies[0]["id"] == f"{kind}:a"
        assert copies[0]["content"] != TEXT
        if kind in ("rename", "strip", "rename+strip", "reformat"):
            assert [c["original"] for c in copies] == ["a"]


def test_gather_reads_folders_and_jsonl_without_byte_identical_copies(tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    for name in ("textwrap.py", "bisect.py", "colorsys.py"):
        (folder / name).write_text((STDLIB / name).read_text(encoding="utf-8"))
    (folder / "copy.py").write_text(TEXT)  # byte-identical to textwrap.py
    lines = tmp_path / "more.jsonl"
    lines.write_text(json.dumps({"kind": "text", "content": "A short line."}) + "\n"
                     + json.dumps({"kind": "code", "language": "python",
                                   "content": (STDLIB / "heapq.py").read_text()}) + "\n"
                     + "not json\n")
    events = gather([folder, lines], limit=10, max_file_bytes=1 << 20)
    assert len(events) == 4  # 3 distinct files + heapq; the copy and the short line left out
    assert sorted(e["language"] for e in events) == ["python"] * 4
    assert len(gather([folder, lines], limit=2, max_file_bytes=1 << 20)) == 2
