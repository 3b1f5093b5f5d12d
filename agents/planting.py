"""Planted copies: real files edited the way copiers edit them, and the corpus they come from.

Both ``sluice calibrate`` (on the user's own files) and ``bench.clones`` (on this machine's
files) plant these edits and measure which dedup layer catches each copy, so the workload
is defined once, here. The edits, each a function ``(text, language, rng) -> text``:

- ``rename``: every identifier renamed consistently (a pygments ``Name`` token that is not a
  builtin, as a refactoring tool renames: strings and comments untouched);
- ``strip``: comments (not preprocessor lines or ``#!``) and docstrings removed;
- ``rename+strip``: both;
- ``reformat``: indentation halved (tabs to 4 spaces first), the space after commas removed;
- ``reorder``: top-level blocks (a line at column 0 after a blank line starts one) shuffled,
  the first (the file's header) kept in place;
- ``edit``: a few lines deleted, a line of another file inserted, a line repeated.

The lexer comes from the record's language, else its source's extension; a record neither
names (or a TEXT record) gets only the edits that need no lexer to change it: ``edit`` and
``reorder`` (and ``reformat`` of its indentation). An edit that leaves a file unchanged is
not planted.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from pygments.lexer import Lexer
from pygments.lexers import find_lexer_class_for_filename, get_lexer_by_name
from pygments.token import Comment, Name, String, Text
from pygments.util import ClassNotFound

from streams.sources import BadLine, SourceStats, iter_events

EDITS = ("rename", "strip", "rename+strip", "reformat", "reorder", "edit")
_BLOCK_ENDS = ("}", ")", "]", "end", "fi", "esac", "done")

Event = dict[str, Any]


# -- lexing ----------------------------------------------------------------------------------


@lru_cache(maxsize=128)
def _lexer_named(name: str) -> Lexer | None:
    try:
        # ensurenl off: the edit must not add a final newline the file did not have.
        return get_lexer_by_name(name, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


@lru_cache(maxsize=128)
def _lexer_for_suffix(suffix: str) -> Lexer | None:
    cls = find_lexer_class_for_filename(f"file{suffix}")
    return cls(stripnl=False, ensurenl=False) if cls is not None else None


def lexer_of(language: str | None, source: str | None = None) -> Lexer | None:
    """The pygments lexer of ``language``, else of ``source``'s extension, else None."""
    if language:
        lexer = _lexer_named(language.strip().lower())
        if lexer is not None:
            return lexer
    suffix = PurePosixPath((source or "").replace("\\", "/")).suffix.lower()
    return _lexer_for_suffix(suffix) if 1 < len(suffix) <= 16 else None


def _tokens(text: str, language: str | None) -> list[tuple[Any, str]]:
    lexer = lexer_of(language)
    if lexer is None:  # no lexer: the whole text as one plain token, which no edit renames
        return [(Text, text)]
    return list(lexer.get_tokens(text))


# -- the edits -------------------------------------------------------------------------------


def rename(text: str, language: str | None, rng: random.Random) -> str:
    """Every identifier that is not a builtin renamed, consistently, to a fresh name."""
    names: dict[str, str] = {}
    out = []
    for kind, value in _tokens(text, language):
        if kind in Name and kind not in Name.Builtin and re.fullmatch(r"[$@%]?\w+", value):
            sigil = value[0] if value[0] in "$@%" else ""
            if value not in names:
                names[value] = sigil + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                                               for _ in range(rng.randint(3, 9)))
            value = names[value]
        out.append(value)
    return "".join(out)


def strip(text: str, language: str | None, rng: random.Random) -> str:
    """Comments and docstrings removed; the blank lines they leave squeezed."""
    out: list[str] = []
    previous = None
    for kind, value in _tokens(text, language):
        if kind in String.Doc and previous is not None and previous in String.Affix:
            out[-1] = ""  # the r of r"""…""" goes with its docstring
        previous = kind
        if kind in String.Doc or (kind in Comment and kind not in Comment.Preproc
                                  and kind not in Comment.PreprocFile
                                  and kind not in Comment.Hashbang):
            # A line comment may carry its newline (pygments' C lexer): keep the newline.
            value = "\n" if value.endswith("\n") else ""
        out.append(value)
    lines = [line.rstrip() for line in "".join(out).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def rename_strip(text: str, language: str | None, rng: random.Random) -> str:
    """``strip`` then ``rename``."""
    return rename(strip(text, language, rng), language, rng)


def reformat(text: str, language: str | None, rng: random.Random) -> str:
    """Indentation halved (tabs to 4 spaces first); no space after a comma."""
    out = []
    after_comma = False
    for _, value in _tokens(text, language):
        if not (after_comma and value == " "):
            out.append(value)
        after_comma = value == ","
    lines = []
    for line in "".join(out).split("\n"):
        body = line.lstrip(" \t")
        indent = line[: len(line) - len(body)].replace("\t", "    ")
        lines.append(" " * (len(indent) // 2) + body)
    return "\n".join(lines)


def _inside_tokens(text: str, language: str | None) -> set[int]:
    """Line numbers that begin inside a multi-line token (a block comment, a string, a
    heredoc, POD): no definition starts there."""
    if lexer_of(language) is None:
        return set()
    inside: set[int] = set()
    line = 0
    for _, value in _tokens(text, language):
        breaks = value.count("\n")
        # Lines after the token's first break and up to its last start inside it, unless
        # the token ends exactly at a line's end (whitespace, a line comment's newline).
        last = breaks - 1 if value.endswith("\n") else breaks
        inside.update(range(line + 1, line + last + 1))
        line += breaks
    return inside


def reorder(text: str, language: str | None, rng: random.Random) -> str:
    """Top-level blocks shuffled, the header block (and anything after a Perl
    ``__END__``/``__DATA__``) kept in place. A block starts at a line at column 0, after a
    blank line, outside any comment or string."""
    lines = text.split("\n")
    tail: list[str] = []
    for k, line in enumerate(lines):
        if line.strip() in ("__END__", "__DATA__"):
            lines, tail = lines[:k], lines[k:]
            break
    inside = _inside_tokens("\n".join(lines), language)
    blocks: list[list[str]] = [[]]
    for k, line in enumerate(lines):
        starts = (k > 0 and not lines[k - 1].strip() and line[:1].strip() != ""
                  and k not in inside and not line.startswith(_BLOCK_ENDS))
        if starts and blocks[-1]:
            blocks.append([])
        blocks[-1].append(line)
    head, rest = blocks[0], blocks[1:]
    rng.shuffle(rest)
    for block in rest:  # each block ends with its blank separator line
        if block[-1].strip():
            block.append("")
    body = "\n".join(head + [line for block in rest for line in block]).rstrip("\n")
    return body + "\n" + ("\n".join(tail) if tail else "")


def near_copy(text: str, rng: random.Random, donor: str) -> str:
    """A realistic near-duplicate: a few lines dropped, one line of another real file
    inserted, one line duplicated (as edits, merges and copy-paste do)."""
    lines = text.split("\n")
    for _ in range(max(1, len(lines) // 40)):
        if len(lines) > 3:
            del lines[rng.randrange(len(lines))]
    donor_lines = [d for d in donor.split("\n") if d.strip()] or ["# edited"]
    lines.insert(rng.randrange(len(lines) + 1), rng.choice(donor_lines))
    k = rng.randrange(len(lines))
    lines.insert(k, lines[k])
    return "\n".join(lines)


def edit(text: str, language: str | None, rng: random.Random, donor: str = "") -> str:
    """A few lines deleted, one of another file inserted, one repeated."""
    return near_copy(text, rng, donor)


EDITORS: dict[str, Callable[..., str]] = {
    "rename": rename, "strip": strip, "rename+strip": rename_strip, "reformat": reformat,
    "reorder": reorder, "edit": edit}


def planted(originals: Sequence[Event], kind: str, seed: int) -> list[Event]:
    """One edited copy per original (``kind``, one of ``EDITS``), skipping edits that
    change nothing; each copy names its ``original`` and keeps the original's fields."""
    if kind not in EDITORS:
        raise ValueError(f"unknown edit {kind!r}; choose from {', '.join(EDITS)}")
    rng = random.Random(f"{seed}:{kind}")
    copies = []
    for k, original in enumerate(originals):
        text, language = original["content"], original.get("language")
        args: dict[str, Any] = {}
        if kind == "edit":
            args["donor"] = originals[(k + 1) % len(originals)]["content"]
        copy = EDITORS[kind](text, language, rng, **args)
        if copy.split() == text.split():  # a no-op edit (nothing to strip, one block…)
            continue
        copies.append({**original, "id": f"{kind}:{original['id']}", "content": copy,
                       "original": original["id"]})
    return copies


# -- the corpus ------------------------------------------------------------------------------


def distinct_events(events: Iterable[Any], limit: int, *, min_chars: int = 200) -> list[Event]:
    """Up to ``limit`` events whose stripped content is new (byte-identical files are the
    exact layer's business, not what is calibrated) and at least ``min_chars`` long."""
    seen: set[str] = set()
    out: list[Event] = []
    for event in events:
        if isinstance(event, BadLine):
            continue
        text = event["content"]
        if len(text.strip()) < min_chars:
            continue
        digest = hashlib.sha256(text.strip().encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        out.append(dict(event))
        if len(out) == limit:
            break
    return out


def gather(paths: Sequence[Path], limit: int, max_file_bytes: int, *, seed: int = 0,
           stats: SourceStats | None = None) -> list[Event]:
    """A sample of ``limit`` distinct records of the user's files, folders or JSONL, read as
    ``sluice produce`` reads them; sampled evenly over everything found (with ``seed``)."""
    stats = stats or SourceStats()
    found = distinct_events(iter_events(paths, max_file_bytes, stats), 10**9)
    rng = random.Random(seed)
    if len(found) > limit:
        keep = sorted(rng.sample(range(len(found)), limit))  # sampled, in input order
        found = [found[k] for k in keep]
    return found
