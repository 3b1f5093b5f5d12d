"""Turn files, folders and JSONL into RawEvents, in input order, for ``sluice produce``.

Files: the kind and label come from the language, recognised by extension or shebang;
binary files (a NUL byte, or not UTF-8) and files over the size limit are skipped and
counted. JSONL (``.jsonl`` / ``.jsonl.gz``): one RawEvent-shaped object a line; a line
that is not one is yielded as a ``BadLine`` so that the caller can count and report it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from schemas.records import Kind, RawEvent
from streams.serde import DecodeError, raw_event_from_mapping

# Extension → (language, kind). Languages are the classes a file-fed stream balances.
LANGUAGES: dict[str, tuple[str, Kind]] = {
    ".py": ("python", "CODE"), ".pyi": ("python", "CODE"), ".pyx": ("cython", "CODE"),
    ".c": ("c", "CODE"), ".h": ("c", "CODE"), ".cc": ("cpp", "CODE"), ".cpp": ("cpp", "CODE"),
    ".hpp": ("cpp", "CODE"), ".cxx": ("cpp", "CODE"), ".java": ("java", "CODE"),
    ".js": ("javascript", "CODE"), ".mjs": ("javascript", "CODE"), ".cjs": ("javascript", "CODE"),
    ".ts": ("typescript", "CODE"), ".tsx": ("typescript", "CODE"), ".go": ("go", "CODE"),
    ".rs": ("rust", "CODE"), ".rb": ("ruby", "CODE"), ".php": ("php", "CODE"),
    ".sh": ("shell", "CODE"), ".bash": ("shell", "CODE"), ".pl": ("perl", "CODE"),
    ".pm": ("perl", "CODE"), ".lua": ("lua", "CODE"), ".sql": ("sql", "CODE"),
    ".scala": ("scala", "CODE"), ".kt": ("kotlin", "CODE"), ".cs": ("csharp", "CODE"),
    ".swift": ("swift", "CODE"), ".r": ("r", "CODE"), ".tcl": ("tcl", "CODE"),
    ".html": ("html", "CODE"), ".css": ("css", "CODE"), ".xml": ("xml", "CODE"),
    ".json": ("json", "CODE"), ".yaml": ("yaml", "CODE"), ".yml": ("yaml", "CODE"),
    ".toml": ("toml", "CODE"), ".cmake": ("cmake", "CODE"), ".mk": ("make", "CODE"),
    ".md": ("markdown", "TEXT"), ".rst": ("restructuredtext", "TEXT"), ".txt": ("text", "TEXT"),
    ".tex": ("latex", "TEXT"), ".adoc": ("asciidoc", "TEXT"),
}
NAMES: dict[str, tuple[str, Kind]] = {
    "Makefile": ("make", "CODE"), "Dockerfile": ("dockerfile", "CODE"),
    "CMakeLists.txt": ("cmake", "CODE"), "README": ("text", "TEXT"), "LICENSE": ("text", "TEXT"),
    "COPYING": ("text", "TEXT"), "NEWS": ("text", "TEXT"), "changelog": ("text", "TEXT"),
    "copyright": ("text", "TEXT"), "AUTHORS": ("text", "TEXT"),
}
SHEBANGS: dict[str, tuple[str, Kind]] = {
    "python": ("python", "CODE"), "bash": ("shell", "CODE"), "sh": ("shell", "CODE"),
    "perl": ("perl", "CODE"), "ruby": ("ruby", "CODE"), "node": ("javascript", "CODE"),
}
SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".tox"}


@dataclass
class SourceStats:
    """What reading the inputs skipped, by reason."""

    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that is not a RawEvent: where and why."""

    where: str
    reason: str


def detect_language(path: Path, head: str) -> tuple[str, Kind] | None:
    """Language and kind from the file name, extension or shebang line; None if unknown."""
    if path.name in NAMES:
        return NAMES[path.name]
    found = LANGUAGES.get(path.suffix.lower())
    if found:
        return found
    if head.startswith("#!"):
        words = head[2:].split("\n", 1)[0].replace("/usr/bin/env", " ").split()
        for word in words:
            name = os.path.basename(word).rstrip("0123456789.")
            if name in SHEBANGS:
                return SHEBANGS[name]
    if path.stem.upper() in {"README", "LICENSE", "COPYING", "NOTICE", "CHANGES"}:
        return ("text", "TEXT")
    return None


def event_id(source: str) -> str:
    """A stable id for an event read from ``source`` (a path, or path:line)."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:20]


def read_file_event(path: Path, max_bytes: int, stats: SourceStats) -> RawEvent | None:
    """The RawEvent for one file, or None (counted in ``stats``) when it is skipped."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            stats.skipped["too_large"] += 1
            return None
        data = path.read_bytes()
    except OSError:
        stats.skipped["unreadable"] += 1
        return None
    if b"\x00" in data[:8192]:
        stats.skipped["binary"] += 1
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped["binary"] += 1
        return None
    language = detect_language(path, text[:200])
    if language is None:
        stats.skipped["unknown_language"] += 1
        return None
    if not text.strip():
        stats.skipped["empty"] += 1
        return None
    lang, kind = language
    source = str(path)
    return RawEvent(id=event_id(source), source=source, kind=kind, language=lang, label=lang,
                    content=text, timestamp=int(time.time() * 1000), attributes={})


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_symlink():
                yield path


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _extra_to_attributes(obj: dict[str, object]) -> dict[str, object]:
    """Columns that are not RawEvent fields become string attributes, not an error."""
    extra = {k: obj[k] for k in obj if k not in RawEvent.__annotations__}
    if not extra:
        return obj
    fields = {k: v for k, v in obj.items() if k in RawEvent.__annotations__}
    attributes = dict(fields.get("attributes") or {})  # type: ignore[call-overload]
    for key, value in extra.items():
        attributes.setdefault(key, value if isinstance(value, str) else json.dumps(value))
    fields["attributes"] = attributes
    return fields


def read_jsonl(path: Path, label_field: str = "label") -> Iterator[RawEvent | BadLine]:
    """Events of a JSONL file, in order; ids default to a hash of file and line number."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise DecodeError("invalid_json", "a line must be a JSON object")
                if label_field != "label" and label_field in obj:
                    value = obj.pop(label_field)
                    obj["label"] = None if value is None else str(value)
                event = raw_event_from_mapping(_extra_to_attributes(obj))
            except UnicodeDecodeError:
                yield BadLine(where, "invalid_utf8")
                continue
            except json.JSONDecodeError:
                yield BadLine(where, "invalid_json")
                continue
            except DecodeError as exc:
                yield BadLine(where, exc.reason)
                continue
            if not event["id"]:
                event["id"] = event_id(where)
            if not event["source"]:
                event["source"] = where
            yield event


def iter_events(
    paths: Iterable[Path], max_file_bytes: int, stats: SourceStats, label_field: str = "label"
) -> Iterator[RawEvent | BadLine]:
    """Every event under ``paths`` (files, folders, JSONL), in input order."""
    for root in paths:
        if not root.exists():
            stats.skipped["missing"] += 1
            continue
        files = [root] if root.is_file() else _walk(root)
        for path in files:
            if _is_jsonl(path):
                yield from read_jsonl(path, label_field)
            else:
                event = read_file_event(path, max_file_bytes, stats)
                if event is not None:
                    yield event
