"""``sluice dedup``: the ingest and dedup steps over a JSONL file, without Kafka.

Writes one decision per input line, in input order (an earlier record wins over a later
copy): ``{"id", "keep", "reason", "duplicate_of", "similarity"}``.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.pipeline import Pipeline, build_pipeline
from agents.step import Coords, Item, Outcome
from sluice.settings import Settings
from streams.connections import redis_client


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, line.strip()


def _with_id(line: bytes, number: int) -> bytes:
    """Give a line without an id one from its line number, so that copies stay distinct."""
    if not line.startswith(b"{"):
        return line
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return line
    if isinstance(obj, dict) and not obj.get("id"):
        obj["id"] = f"line:{number}"
        return json.dumps(obj).encode("utf-8")
    return line


def decision(outcome: Outcome) -> dict[str, Any]:
    """The output line for one outcome."""
    record = outcome.record
    return {
        "id": record["id"],
        "keep": not outcome.rejected,
        "reason": outcome.reason,
        "duplicate_of": record.get("duplicate_of") if outcome.rejected else None,
        "similarity": record.get("similarity") if outcome.rejected else None,
    }


def dedup_file(settings: Settings, input_path: Path, out_path: Path, *,
               namespace: str | None = None, semantic: bool = True,
               chunk: int | None = None, console: Console | None = None) -> Counter[str]:
    """Decide every line of ``input_path``; returns counts by outcome."""
    console = console or Console(stderr=True)
    client = redis_client(settings.redis)
    stages = ["ingest", "dedup"] if semantic else ["ingest"]
    with console.status("loading the steps (embedding model, indexes)"):
        pipeline = build_pipeline(settings, client, stages=stages, namespace=namespace)
    chunk = chunk or settings.dedup.batch_size
    counts: Counter[str] = Counter()
    total = sum(1 for _ in _lines(input_path))
    progress = Progress(TextColumn("[bold]dedup"), BarColumn(bar_width=None),
                        MofNCompleteColumn(), TextColumn("{task.fields[kept]:,} kept"),
                        TimeElapsedColumn(), console=console)
    with progress, out_path.open("w", encoding="utf-8") as out:
        task = progress.add_task("dedup", total=total, kept=0)
        batch: list[Item] = []
        for number, line in _lines(input_path):
            batch.append(Item(_with_id(line, number), Coords(str(input_path), 0, number)))
            if len(batch) >= chunk:
                _run(pipeline, batch, out, counts)
                progress.update(task, advance=len(batch), kept=counts["kept"])
                batch = []
        if batch:
            _run(pipeline, batch, out, counts)
            progress.update(task, advance=len(batch), kept=counts["kept"])
    _summary(console, counts, out_path)
    _where_time_went(console, pipeline)
    return counts


def _run(pipeline: Pipeline, batch: list[Item], out: IO[str], counts: Counter[str]) -> None:
    for outcome in pipeline.run(batch):
        counts[outcome.reason or "kept"] += 1
        out.write(json.dumps(decision(outcome), ensure_ascii=False) + "\n")


def _where_time_went(console: Console, pipeline: Pipeline) -> None:
    """Seconds per step and timed part (``embed`` and ``admit`` inside ``semantic``)."""
    parts = pipeline.seconds()
    steps = {step.name for step in pipeline.steps}
    total = sum(seconds for name, seconds in parts.items() if name in steps)
    console.print("time: " + ", ".join(
        f"{name} {seconds:.1f} s ({100 * seconds / max(total, 1e-9):.0f} %)"
        for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1])
        if name in steps or name in ("embed", "admit")))


def _summary(console: Console, counts: Counter[str], out_path: Path) -> None:
    table = Table(title=f"decisions written to {out_path}", show_header=False, box=None)
    total = sum(counts.values())
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(reason, f"{n:,}", f"{100 * n / max(total, 1):.1f} %")
    table.add_row("total", f"{total:,}", "")
    console.print(table)
