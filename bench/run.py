"""Every benchmark, one after the other: ``python -m bench.run [--quick] [--only a,b]``.

Each runs in its own process (a fresh interpreter: no model, thread setting or Redis left
over from the one before) and writes ``bench/results/<name>[-quick].json``.
``--quick`` keeps each to about a minute on a 2-core machine once the embedding cache
(~/.cache/sluice/bench) is warm; the first run embeds the corpora once.

The long runs against live processes (``durability``, ``churn``: 10 minutes, ``soak``: 30)
run only when named: ``--only soak``, or ``--long`` for all of them after the rest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import REPO_ROOT, console

BENCHMARKS = ("embed", "index", "peers", "pipeline", "clones", "produce", "trainer",
              "curated_vs_raw")
LONG = ("durability", "churn", "soak")  # live stacks for minutes: only when asked for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", default="", help="comma-separated subset of "
                        + ", ".join(BENCHMARKS + LONG))
    parser.add_argument("--long", action="store_true",
                        help="also the long live runs: " + ", ".join(LONG))
    args = parser.parse_args(argv)
    chosen = ([b for b in args.only.split(",") if b]
              or list(BENCHMARKS) + (list(LONG) if args.long else []))
    unknown = set(chosen) - set(BENCHMARKS + LONG)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    failed = []
    for name in chosen:
        console.rule(f"bench.{name}{' --quick' if args.quick else ''}")
        started = time.perf_counter()
        command = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        if subprocess.call(command, cwd=REPO_ROOT) != 0:
            failed.append(name)
        console.print(f"[dim]bench.{name}: {time.perf_counter() - started:.0f} s[/dim]")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
