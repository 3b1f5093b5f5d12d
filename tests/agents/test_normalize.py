"""Normalization and the exact-dedup key."""

from __future__ import annotations

import hashlib
import sysconfig
import time
from pathlib import Path

import pytest

from agents.normalize import ID_PREFIX, content_digest, derive_id, normalize

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REAL_FILES = ["textwrap.py", "shlex.py", "bisect.py", "heapq.py"]


def _read(name: str) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")


def test_unicode_is_composed() -> None:
    decomposed = "cafe\u0301 nai\u0308ve"
    assert normalize(decomposed) == "caf\u00e9 na\u00efve"


@pytest.mark.parametrize("ending", ["\r\n", "\r", "\n"])
def test_line_endings_become_lf(ending: str) -> None:
    text = ending.join(["def f():", "    return 1", ""])
    assert normalize(text) == "def f():\n    return 1"


def test_trailing_space_stripped_indentation_kept() -> None:
    text = "class A:  \n\tdef f(self):\t \n        pass   \n"
    assert normalize(text) == "class A:\n\tdef f(self):\n        pass"


def test_trailing_blank_lines_dropped_leading_kept() -> None:
    assert normalize("\n\nx = 1\n\n   \n\t\n") == "\n\nx = 1"


def test_blank_lines_inside_kept() -> None:
    assert normalize("a\n\n\nb") == "a\n\n\nb"


def test_bom_dropped() -> None:
    assert normalize("\ufeffimport os\n") == "import os"


def test_empty_and_whitespace_only() -> None:
    assert normalize("") == ""
    assert normalize(" \n\t\r\n ") == ""


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_variants_share_one_digest(name: str) -> None:
    original = _read(name)
    windows = original.replace("\n", "   \r\n") + "\r\n\r\n"
    bom = "\ufeff" + original
    digests = {content_digest(normalize(v)) for v in (original, windows, bom)}
    assert len(digests) == 1


@pytest.mark.parametrize("name", REAL_FILES)
def test_idempotent_on_real_files(name: str) -> None:
    once = normalize(_read(name))
    assert normalize(once) == once


def test_real_edit_changes_digest() -> None:
    original = normalize(_read("textwrap.py"))
    edited = original.replace("def wrap(", "def wrap2(", 1)
    assert content_digest(original) != content_digest(edited)


def test_digest_is_sha256_hex_of_utf8() -> None:
    text = "héllo\nwörld"
    assert content_digest(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert len(content_digest("")) == 64


def test_digest_of_lone_surrogate_does_not_raise() -> None:
    assert len(content_digest("bad \ud800 text")) == 64


def test_derive_id_is_prefixed_and_deterministic() -> None:
    digest = content_digest("x = 1")
    assert derive_id(digest) == ID_PREFIX + digest[:32]
    assert derive_id(digest) == derive_id(content_digest(normalize("x = 1  \r\n")))


def test_linear_on_pathological_lines() -> None:
    # A megabyte of spaces inside one line: a regex like r"[ \t]+$" would be quadratic.
    text = "a" + " " * 1_000_000 + "b\n" + " " * 1_000_000
    start = time.perf_counter()
    out = normalize(text)
    assert out == "a" + " " * 1_000_000 + "b"
    assert time.perf_counter() - start < 2.0
