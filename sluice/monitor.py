"""``sluice monitor``: the dashboard's numbers live in the terminal (rich).

Per stage in/out/rejected, throughput and latency; rejections by reason; class shares raw vs
curated; the trainer's step, loss and accuracy; consumer lag. Refreshed every second from a
``MetricsFeed``; ``--once`` prints one frame and exits (for scripts and tests).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sluice.metrics_feed import DOWN, LIVE, NO_TOPIC, MetricsFeed

_STYLE = {LIVE: "green", DOWN: "red", NO_TOPIC: "yellow", "waiting": "yellow",
          "stale": "yellow", "connecting": "dim"}
_HINT = {
    DOWN: "start the local stack with `sluice up`, or set kafka.bootstrap_servers",
    NO_TOPIC: "`sluice up` (or `sluice topics`) creates it; then start `sluice worker`",
    "waiting": "connected; nothing published yet: start `sluice worker`",
    "stale": "no new metrics: is `sluice worker` still running?",
}


def _num(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    if digits is None:
        size = abs(value)
        digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
    return f"{value:,.{digits}f}"


def _int(value: float | None) -> str:
    return "–" if value is None else f"{round(value):,}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 90 else f"{seconds / 60:.0f} min ago"


def header(state: Mapping[str, Any]) -> Text:
    """One line: status, source, how old the newest snapshot is, and what to do if down."""
    status = state["status"]
    line = Text()
    line.append(f"● {status}", style=_STYLE.get(status, ""))
    source = state.get("source") or {}
    line.append(f"   Kafka {source.get('bootstrap')} · {source.get('topic')}", style="dim")
    if state.get("last_snapshot"):
        line.append(f"   last snapshot {_age((state['now'] - state['last_snapshot']) / 1000)}",
                    style="dim")
    if state.get("error"):
        line.append(f"\n{state['error']}", style="red")
    if status in _HINT:
        line.append(f"\n{_HINT[status]}", style="italic")
    return line


def stages_table(state: Mapping[str, Any]) -> Table:
    """Per stage: totals, rates over the window, latency percentiles, live workers."""
    # A light box and a fixed stage column keep the table readable in an 80-column terminal.
    table = Table(title=f"stages (rates over {state['window_s']:.0f} s)", title_justify="left",
                  expand=False, box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("stage", no_wrap=True, min_width=8)
    for name in ("in", "out", "rejected", "in/s", "out/s", "rej/s", "p50 ms", "p95 ms",
                 "p99 ms", "workers"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in state["stages"]:
        lat = row["latency_ms"]
        table.add_row(row["component"], _int(row["in"]), _int(row["out"]),
                      _int(row["rejected"]), _num(row["in_per_s"]), _num(row["out_per_s"]),
                      _num(row["rejected_per_s"]), _num(lat["p50"], 0), _num(lat["p95"], 0),
                      _num(lat["p99"], 0), f"{row['fresh']}/{row['instances']}")
    return table


def rejections_table(state: Mapping[str, Any]) -> Table:
    """Rejections by reason, largest first."""
    dup = state["duplicates"]
    table = Table(title=f"rejections (duplicates {_pct(dup['rate'])} of entering)",
                  title_justify="left")
    for name, justify in (("reason", "left"), ("stage", "left"), ("total", "right"),
                          ("/s", "right"), ("of entering", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in state["rejections"]:
        table.add_row(row["reason"], row["component"], _int(row["total"]),
                      _num(row["per_s"]), _pct(row["share"]))
    if not state["rejections"]:
        table.add_row(Text("none yet", style="dim"))
    return table


def classes_table(state: Mapping[str, Any]) -> Table:
    """Class shares before balancing vs in batches, with the policy's target."""
    table = Table(title="classes: raw vs curated", title_justify="left")
    table.add_column("class", no_wrap=True)
    for name in ("raw", "curated", "target", "buffered"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in state["classes"]:
        table.add_row(row["label"], _pct(row["raw"]), _pct(row["curated"]),
                      _pct(row["target"]), _int(row["buffer"]))
    if not state["classes"]:
        table.add_row(Text("no labels counted yet", style="dim"))
    return table


def trainer_table(state: Mapping[str, Any]) -> Table | Text:
    """The trainer's latest numbers (or a line saying none was seen)."""
    row = state.get("trainer")
    if row is None:
        return Text("trainer: no metrics seen", style="dim")
    table = Table(title=f"trainer (reported {_age(row['age_s'] or 0.0)})", title_justify="left")
    for name in ("step", "loss", "accuracy", "samples/s", "data wait", "lag", "samples"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row(_int(row["step"]), _num(row["loss"], 4), _pct(row["accuracy"]),
                  _num(row["samples_per_s"]), _pct(row["data_wait_share"]), _int(row["lag"]),
                  _int(row["samples"]))
    return table


def lag_line(state: Mapping[str, Any]) -> Text:
    """Workers' consumer lag per topic (messages behind)."""
    lag = state.get("lag")
    if lag is None:
        return Text("consumer lag: unknown", style="dim")
    if not lag:
        return Text("consumer lag: no committed offsets for group "
                    f"{(state.get('source') or {}).get('group')} yet", style="dim")
    parts = ", ".join(f"{topic} {n:,}" for topic, n in sorted(lag.items()))
    return Text(f"consumer lag: {parts}")


def render(state: Mapping[str, Any]) -> RenderableType:
    """One frame of the monitor."""
    parts: list[RenderableType] = [header(state)]
    if state["stages"]:
        side = Table.grid(padding=(0, 3))
        side.add_row(rejections_table(state), classes_table(state))
        parts += [stages_table(state), side]
    parts += [trainer_table(state), lag_line(state)]
    return Group(*parts)


@click.command()
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--wait", "wait_s", type=float, default=10.0, show_default=True,
              help="With --once: at most this long to read the recent history first.")
@click.pass_context
def monitor(ctx: click.Context, once: bool, interval: float, wait_s: float) -> None:
    """Show the pipeline's metrics live in the terminal (exit code 3 if Kafka is down)."""
    from sluice.cli import settings_of

    settings = settings_of(ctx)
    # The feed shows broker trouble itself; kafka-python's reconnect warnings would only
    # scroll over it.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    console = Console()
    with MetricsFeed(settings) as feed:
        if once:
            feed.wait_caught_up(wait_s)
            state = feed.state()
            console.print(render(state))
            if state["status"] == DOWN:
                sys.exit(3)
            return
        with contextlib.suppress(KeyboardInterrupt), \
                Live(render(feed.state()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(feed.state()), refresh=True)
