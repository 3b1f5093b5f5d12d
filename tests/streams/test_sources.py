"""Files, folders and JSONL become RawEvents in input order; what is skipped is counted."""

from __future__ import annotations

import gzip
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from streams.sources import (
    BadLine,
    SourceStats,
    detect_language,
    event_id,
    iter_events,
    read_file_event,
    read_jsonl,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MAX = 1024 * 1024


@pytest.mark.parametrize(("name", "head", "expected"), [
    ("bisect.py", "", ("python", "CODE")),
    ("types.pyi", "", ("python", "CODE")),
    ("main.RS", "", ("rust", "CODE")),          # extensions in any case
    ("Makefile", "", ("make", "CODE")),
    ("CMakeLists.txt", "", ("cmake", "CODE")),   # the name wins over .txt
    ("guide.md", "", ("markdown", "TEXT")),
    ("notes.txt", "", ("text", "TEXT")),
    ("README", "", ("text", "TEXT")),
    ("LICENSE.rst", "", ("restructuredtext", "TEXT")),
    ("NOTICE", "Copyright", ("text", "TEXT")),
    ("runme", "#!/usr/bin/env python3\nprint(1)\n", ("python", "CODE")),
    ("runme2", "#!/usr/bin/python3.11 -u\n", ("python", "CODE")),
    ("deploy", "#!/bin/bash\nset -e\n", ("shell", "CODE")),
    ("tool", "#!/usr/bin/env node\n", ("javascript", "CODE")),
    ("data.xyz", "just some words", None),
    ("script", "#!/usr/bin/env unknown-interpreter\n", None),
])
def test_detect_language(name: str, head: str, expected: tuple[str, str] | None) -> None:
    assert detect_language(Path("/repo") / name, head) == expected


def test_event_id_is_stable_and_short() -> None:
    assert event_id("src/a.py") == event_id("src/a.py")
    assert event_id("src/a.py") != event_id("src/b.py")
    assert len(event_id("src/a.py")) == 20


def test_read_file_event_from_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "bisect.py"
    shutil.copy(STDLIB / "bisect.py", path)
    stats = SourceStats()
    event = read_file_event(path, MAX, stats)
    assert event is not None
    assert event["id"] == event_id(str(path))
    assert (event["source"], event["kind"], event["language"], event["label"]) == (
        str(path), "CODE", "python", "python")
    assert event["content"] == (STDLIB / "bisect.py").read_text()
    assert event["attributes"] == {}
    assert not stats.skipped


def test_skipped_files_are_counted_by_reason(tmp_path: Path) -> None:
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    (tmp_path / "legacy.txt").write_bytes("Café crème, déjà vu.\n".encode("latin-1"))
    (tmp_path / "huge.txt").write_text("word " * 300)
    (tmp_path / "blank.md").write_text("   \n\n")
    (tmp_path / "data.xyz").write_text("unknown format\n")
    stats = SourceStats()
    for path in sorted(tmp_path.iterdir()):
        assert read_file_event(path, 1000, stats) is None, path
    assert stats.skipped == {"binary": 2, "too_large": 1, "empty": 1, "unknown_language": 1}


def test_size_limit_is_inclusive(tmp_path: Path) -> None:
    path = tmp_path / "exact.txt"
    path.write_text("x" * 99 + "\n")
    assert read_file_event(path, 100, SourceStats()) is not None
    stats = SourceStats()
    assert read_file_event(path, 99, stats) is None
    assert stats.skipped == {"too_large": 1}


def _write_jsonl(path: Path, lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


@pytest.mark.parametrize("name", ["events.jsonl", "events.jsonl.gz"])
def test_read_jsonl_events_and_bad_lines(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    _write_jsonl(path, [
        json.dumps({"id": "a1", "kind": "code", "language": "go", "label": "go",
                    "content": "package main\n", "timestamp": 5, "attributes": {"r": "x"}}),
        "",  # blank lines are not events
        json.dumps({"content": "A paragraph of text.", "label": "prose"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"content": 42}),
        json.dumps({"content": "x", "kind": "video"}),
    ])
    items = list(read_jsonl(path))
    first, second = items[0], items[1]
    assert not isinstance(first, BadLine) and not isinstance(second, BadLine)
    assert first == {"id": "a1", "source": f"{path}:1", "kind": "CODE", "language": "go",
                     "label": "go", "content": "package main\n", "timestamp": 5,
                     "attributes": {"r": "x"}}
    assert second["id"] == event_id(f"{path}:3")  # line numbers count blank lines
    assert (second["label"], second["kind"], second["source"]) == ("prose", "TEXT", f"{path}:3")
    assert items[2:] == [BadLine(f"{path}:4", "invalid_json"), BadLine(f"{path}:5", "invalid_json"),
                         BadLine(f"{path}:6", "invalid_field"),
                         BadLine(f"{path}:7", "invalid_field")]


def test_read_jsonl_invalid_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"content": "caf\xe9"}\n{"content": "ok text"}\n')
    items = list(read_jsonl(path))
    assert items[0] == BadLine(f"{path}:1", "invalid_utf8")
    assert not isinstance(items[1], BadLine) and items[1]["content"] == "ok text"


def test_read_jsonl_label_field(tmp_path: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    _write_jsonl(path, [json.dumps({"content": "Great product, works well.", "stars": 5}),
                        json.dumps({"content": "Broke after a day.", "stars": 1}),
                        json.dumps({"content": "No rating given."})])
    labels = [e["label"] for e in read_jsonl(path, label_field="stars")
              if not isinstance(e, BadLine)]
    assert labels == ["5", "1", None]


def test_iter_events_keeps_input_order_and_walks_folders(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "pkg" / "__pycache__").mkdir(parents=True)
    (tree / ".git").mkdir()
    for name in ("colorsys.py", "keyword.py", "fnmatch.py"):
        shutil.copy(STDLIB / name, tree / "pkg" / name)
    shutil.copy(STDLIB / "bisect.py", tree / "a_first.py")
    (tree / "pkg" / "__pycache__" / "x.py").write_text("skipped = True\n")
    (tree / ".git" / "config.py").write_text("skipped = True\n")
    (tree / "link.py").symlink_to(tree / "a_first.py")
    jsonl = tmp_path / "more.jsonl"
    _write_jsonl(jsonl, [json.dumps({"id": "j1", "content": "From JSONL."})])
    stats = SourceStats()
    items = list(iter_events([jsonl, tree, tmp_path / "missing"], MAX, stats))
    sources = [i.where if isinstance(i, BadLine) else i["source"] for i in items]
    assert sources == [
        f"{jsonl}:1", str(tree / "a_first.py"), str(tree / "pkg" / "colorsys.py"),
        str(tree / "pkg" / "fnmatch.py"), str(tree / "pkg" / "keyword.py"),
    ]
    assert stats.skipped == {"missing": 1}  # counted once, not also yielded


def test_read_jsonl_null_in_the_label_field_is_unlabeled(tmp_path: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    _write_jsonl(path, [json.dumps({"content": "Not rated yet.", "stars": None})])
    (event,) = read_jsonl(path, label_field="stars")
    assert not isinstance(event, BadLine)
    assert event["label"] is None
