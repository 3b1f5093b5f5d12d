"""The report of a live run's accounting (``bench.churn``, ``bench.soak``): the table, then
each broken guarantee with the workers' notable log lines."""

from __future__ import annotations

from typing import Any

from bench.common import console, show
from bench.live.accounting import failures
from bench.live.processes import Worker


def report(title: str, figures: dict[str, Any], workers: list[Worker]) -> list[str]:
    """The accounting table, then each failure with the workers' notable log lines."""
    show(title, ["figure", "value"], [
        ["events produced", figures["produced"]],
        ["outcomes: ids with one", figures["with_outcome"]],
        ["outcomes: messages (re-sent after crashes: ids)",
         f"{figures['outcome_messages']} ({figures['resent_ids']})"],
        ["samples / rejected", f"{figures['samples']} / {figures['rejected']}"],
        ["double admissions", figures["double_admissions"]],
        ["lost (no outcome, its stage's offset committed past it)", figures["lost"]],
        ["still in flight (the drain ended first; the lag holds them)",
         f"{figures['in_flight']} (+{figures['unbuffered_in_flight']} samples not yet "
         "buffered)"],
        ["samples lost by balance (committed, never buffered)", figures["unbuffered_n"]],
        ["vector set: members (missing samples, extra)",
         f"{figures['vset']} ({figures['vset_missing_n']}, {figures['vset_extra_n']})"],
        ["batches (samples in two batches)",
         f"{figures['batches']} ({len(figures['in_two_batches'])})"],
    ])
    problems = failures(figures)
    for line in problems:
        console.print(f"[red]FAIL[/red] {line}")
    if figures["in_flight"] or figures["unbuffered_in_flight"]:
        console.print(f"[yellow]not finished when the drain ended: {figures['in_flight']} "
                      f"events and {figures['unbuffered_in_flight']} samples still in flight "
                      f"(their stage has not committed past them; e.g. "
                      f"{figures['in_flight_ids'][:5]}): the accounting is incomplete, "
                      "not failed[/yellow]")
    if problems:
        for worker in workers:
            notable = worker.notable()
            if notable:
                console.print(f"[dim]{worker.log}:[/dim]\n  " + "\n  ".join(notable))
    else:
        console.print("[green]every id accounted for: nothing lost, nothing admitted twice, "
                      "no sample in two batches[/green]")
    return problems
