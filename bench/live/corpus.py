"""The corpus of ``bench.churn`` and ``bench.soak``: real functions of the standard library
(then of site-packages), and after every few of them, some events later, a planted copy
(exact, whitespace or comment edit), so every dedup layer has work."""

from __future__ import annotations

import ast
import random
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SITE = Path(sysconfig.get_paths()["purelib"])
EDITS = ("exact", "whitespace", "comment")
# An exact copy has the original's normalized digest and a whitespace copy its word
# shingles (MinHash Jaccard 1): both are duplicates whatever the text, so a group of one of
# them with its original admitted twice is a double admission. A comment copy is a
# duplicate only if MinHash or the model at the threshold says so (on arbitrary short
# functions it is not always: a soak saw 5 of ~5,400 kept, none within the threshold of
# its original), so it is judged by the close-pairs check alone.
CAUGHT_BY_CONSTRUCTION = ("exact", "whitespace")


def real_functions(n: int, skip: int = 0, min_chars: int = 250, max_chars: int = 1500
                   ) -> list[tuple[str, str]]:
    """``n`` distinct functions (id, source) of the standard library, then of
    site-packages if more are needed, in a fixed order (sorted paths, source order),
    after the first ``skip`` of them."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    excluded = {"test", "tests", "idlelib", "site-packages", "lib2to3"}
    for root in (STDLIB, SITE):
        for path in sorted(root.rglob("*.py")):
            if root == STDLIB and excluded & set(path.relative_to(root).parts):
                continue
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
                continue
            lines = source.splitlines()
            for node in ast.walk(tree):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                text = "\n".join(lines[node.lineno - 1 : node.end_lineno or node.lineno])
                if min_chars <= len(text) <= max_chars and text not in seen:
                    seen.add(text)
                    rel = path.relative_to(root).with_suffix("")
                    out.append((f"{'.'.join(rel.parts)}.{node.name}:{node.lineno}", text))
                    if len(out) >= skip + n:
                        return out[skip:]
    return out[skip:]


def planted(text: str, edit: str) -> str:
    """A copy every layer should catch: the exact digest (CRLF, trailing spaces), MinHash
    (spaces on some lines, a blank line), or MinHash / the model (a comment line)."""
    lines = text.split("\n")
    if edit == "exact":
        return "\r\n".join(line + "   " for line in lines) + "\r\n\r\n"
    if edit == "whitespace":
        lines = [line + ("  " if i % 3 == 0 else "") for i, line in enumerate(lines)]
        lines.insert(1, "")
        return "\n".join(lines)
    indent = lines[1][: len(lines[1]) - len(lines[1].lstrip())] if len(lines) > 1 else "    "
    lines.insert(1, indent + "# NOTE: kept as is for backwards compatibility.")
    return "\n".join(lines)


@dataclass
class Stream:
    """Events in the order they are produced, and the groups of copies among them (an
    original and a planted copy that every run must catch: at most one of a group may be
    admitted)."""

    events: list[dict[str, Any]]
    groups: list[set[str]]


LABELS = ("python", "tools", "web", "data")


def label_of(event_id: str) -> str:
    """One of a few classes, by the function's top-level module (a copy shares its
    original's): a small, fixed label set, as a real stream of a few classes has."""
    module = event_id.rsplit(":", 2)[-2].split(".")[0]
    return LABELS[zlib.crc32(module.encode()) % len(LABELS)]


def make_stream(n: int, prefix: str, every: int = 4, seed: int = 0, skip: int = 0,
                pool: list[tuple[str, str]] | None = None) -> Stream:
    """About ``n`` events: real functions and, for every ``every``-th one, a planted copy
    (edits in turn) inserted 3-20 events later, so original and copy are often in flight
    at once on different partitions. ``skip``: start that far into the corpus (streams
    that must not share content); ``pool``: the corpus (``real_functions`` by default)."""
    rng = random.Random(seed)
    count = max(1, n * every // (every + 1))
    originals = real_functions(count, skip) if pool is None else pool[skip : skip + count]
    order: list[tuple[str, str]] = []
    due: list[tuple[int, str, str]] = []  # (position it is due at, id, text)
    groups: list[set[str]] = []
    for k, (name, text) in enumerate(originals):
        order.append((f"{prefix}:{name}", text))
        ready = [d for d in due if d[0] <= len(order)]
        due = [d for d in due if d[0] > len(order)]
        order += [(i, t) for _, i, t in ready]
        if k % every == 0:
            edit = EDITS[(k // every) % len(EDITS)]
            copy_id = f"{prefix}:copy-{edit}:{name}"
            if edit in CAUGHT_BY_CONSTRUCTION:
                groups.append({f"{prefix}:{name}", copy_id})
            due.append((len(order) + rng.randint(3, 20), copy_id, planted(text, edit)))
    order += [(i, t) for _, i, t in due]
    now = int(time.time() * 1000)
    events = [{"id": i, "source": "bench", "kind": "CODE", "language": "python",
               "label": label_of(i), "content": t, "timestamp": now, "attributes": {}}
              for i, t in order]
    return Stream(events, groups)
