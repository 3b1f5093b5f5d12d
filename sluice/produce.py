"""``sluice produce``: read inputs, send them with a progress bar, print a summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sluice.settings import Settings
from streams.producer import EventProducer, ProduceStats
from streams.sources import BadLine, SourceStats, iter_events


def produce_paths(settings: Settings, paths: list[Path], *, rate: float | None = None,
                  limit: int | None = None, label_field: str = "label",
                  topic: str | None = None, console: Console | None = None) -> ProduceStats:
    """Send every event under ``paths``; show progress (events, MB, events/s) and totals."""
    console = console or Console(stderr=True)
    source_stats = SourceStats()
    bad: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    progress = Progress(
        SpinnerColumn(), TextColumn("[bold]producing"), BarColumn(bar_width=None),
        TextColumn("{task.fields[events]:>8,} events  {task.fields[mb]:>8.1f} MB  "
                   "{task.fields[rate]:>7,.0f} events/s"),
        TimeElapsedColumn(), console=console, transient=False,
    )
    with EventProducer(settings.kafka, settings.topics, settings.produce, topic=topic,
                       rate=rate) as producer, progress:
        task = progress.add_task("produce", total=limit, events=0, mb=0.0, rate=0.0)
        stats = producer.stats
        for item in iter_events(paths, settings.produce.max_file_bytes, source_stats, label_field):
            if isinstance(item, BadLine):
                bad[item.reason] += 1
                continue
            producer.send(item)
            labels[item["label"] or "unlabeled"] += 1
            if stats.events % 50 == 0:
                progress.update(task, completed=stats.events, events=stats.events,
                                mb=stats.bytes / 1e6, rate=stats.events / stats.elapsed)
            if limit is not None and stats.events >= limit:
                break
        producer.flush()
        progress.update(task, completed=stats.events, events=stats.events,
                        mb=stats.bytes / 1e6, rate=stats.events / stats.elapsed)
    _summary(console, stats, source_stats, bad, labels, topic or settings.topics.raw)
    return stats


def _summary(console: Console, stats: ProduceStats, source_stats: SourceStats,
             bad: Counter[str], labels: Counter[str], topic: str) -> None:
    table = Table(title=f"sent to {topic}", show_header=False, box=None)
    table.add_row("events", f"{stats.events:,}")
    table.add_row("bytes", f"{stats.bytes / 1e6:,.1f} MB (Avro, before compression)")
    table.add_row("time", f"{stats.elapsed:.1f} s")
    table.add_row("rate", f"{stats.events / stats.elapsed:,.0f} events/s, "
                          f"{stats.bytes / 1e6 / stats.elapsed:,.2f} MB/s")
    for reason, n in sorted(source_stats.skipped.items()):
        table.add_row(f"skipped: {reason}", f"{n:,}")
    for reason, n in sorted(bad.items()):
        table.add_row(f"bad JSONL lines: {reason}", f"{n:,}")
    top = ", ".join(f"{label} {n:,}" for label, n in labels.most_common(8))
    table.add_row("classes", top or "-")
    console.print(table)
