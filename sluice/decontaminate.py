"""``sluice decontaminate``: load protected documents (evaluation sets, held-out data) into
the read-only indexes that ``agents.decontaminate`` checks every event against.

Each JSONL line is one document, ``{"id", "content", "kind", "language"}`` (``kind`` CODE or
TEXT, TEXT when absent); a line that is not one is skipped and reported with its number
and why, never loaded half. Loading again is idempotent (by id).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agents.decontaminate import (
    DecontaminateError,
    Loaded,
    ProtectedDoc,
    ProtectedStore,
    load_protected,
)
from agents.pipeline import load_embedder
from agents.semantic import Encoder
from sluice.settings import Settings
from streams.connections import redis_client

MAX_REPORTED = 20  # bad lines named one by one; the rest are only counted


@dataclass
class Report:
    """What a load did: documents added, already there, and the lines skipped (why)."""

    added: int = 0
    already: int = 0
    skipped: list[str] = field(default_factory=list)
    total: int = 0  # protected documents in the namespace afterwards


def documents(path: Path, skipped: list[str]) -> Iterator[ProtectedDoc]:
    """The documents of a JSONL(.gz) file; a bad line is added to ``skipped`` with why."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield ProtectedDoc.of(json.loads(line))
            except (ValueError, UnicodeDecodeError, DecontaminateError) as exc:
                skipped.append(f"{path}:{number}: {exc}")


def decontaminate_files(settings: Settings, paths: Sequence[Path], *,
                        namespace: str | None = None, semantic: bool = True,
                        console: Console | None = None) -> Report:
    """Load every document of ``paths`` into the protected indexes of the namespace (the
    embeddings too when ``semantic`` and ``dedup.enabled``)."""
    console = console or Console(stderr=True)
    client = redis_client(settings.redis)
    store = ProtectedStore(client, namespace or settings.redis.namespace,
                           settings.decontaminate, settings.fuzzy)
    encoder: Encoder | None = None
    if semantic and settings.dedup.enabled:
        with console.status("loading the embedding model"):
            encoder = load_embedder(settings)
    total = sum(1 for path in paths for _ in documents(path, []))
    report = Report()
    progress = Progress(TextColumn("[bold]protected"), BarColumn(bar_width=None),
                        MofNCompleteColumn(), TextColumn("{task.fields[added]:,} new"),
                        TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task("protected", total=total, added=0)

        def advance(done: Loaded) -> None:
            report.added += done.added
            progress.update(task, advance=done.added + done.already, added=report.added)

        for path in paths:
            loaded = load_protected(store, documents(path, report.skipped),
                                    settings.decontaminate.batch_size, encoder,
                                    settings.dedup.model, progress=advance)
            report.already += loaded.already
    report.total = len(store)
    _summary(console, report, settings)
    return report


def _summary(console: Console, report: Report, settings: Settings) -> None:
    console.print(f"{report.added:,} protected documents added, {report.already:,} already "
                  f"there, {len(report.skipped):,} lines skipped; {report.total:,} in the "
                  "namespace")
    for line in report.skipped[:MAX_REPORTED]:
        console.print(f"  skipped {line}")
    if len(report.skipped) > MAX_REPORTED:
        console.print(f"  … and {len(report.skipped) - MAX_REPORTED:,} more")
    if not settings.decontaminate.enabled:
        console.print("[yellow]decontaminate.enabled is false: the workers do not check "
                      "events against them until it is set")
