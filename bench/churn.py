"""Rebalance churn: three ``sluice worker`` processes of one group, one SIGKILLed and a new
one started every minute, while events arrive at a steady rate; then the accounting.

``python -m bench.churn [--quick] [--minutes N] [--rate R]`` (10 minutes by default,
``--quick`` 2 minutes).

A private embedded Kafka + Redis (the project's stack code), six partitions, the product's
own producer (``streams.producer.EventProducer``) and workers (agents ingest, dedup,
balance). The events are real functions of the standard library, and after every fourth
one, some events later, a planted copy of it (exact, whitespace or comment edit), so every
dedup layer has work while partitions move. Every minute, half-way through it, the oldest
live worker gets SIGKILL (no goodbye: its partitions wait out the session timeout) and a
new one is started (it loads the model, joins, and takes partitions: another rebalance).

At the end, after the stream has drained, every outcome, batch and vector-set member is
read back and the run prints: events produced; outcomes (ids with one, and messages);
double admissions (an id both admitted and rejected, an original and its exact or
whitespace copy both admitted, two samples within the dedup threshold of each other);
the vector set against the samples; lost (an id without an outcome, or a sample the
balance stage never buffered, whose stage has committed its offset past it: acked without
an outcome; one whose stage has not got to it yet is counted apart as still in flight);
samples in two batches (``reuse_cap`` is 1). Bounded in time: start-up, the minutes, then
at most ``--drain-s`` for the stream to drain; every process it starts is stopped.
``--keep DIR`` leaves the stack's state and the logs there, to inspect a failure.

Its parts, shared with ``bench.soak``, are in ``bench.live``: the corpus, worker processes,
the steady producer, the outcome ledger, the accounting and its report.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import console, private_stack, write_result
from bench.live.accounting import account
from bench.live.corpus import make_stream
from bench.live.ledger import Ledger, drain, index_members, wait_buffered, where_stuck
from bench.live.processes import SteadyProducer, Worker, crew, isolated, wait_for_group, workdir
from bench.live.report import report


def run(minutes: int, rate: float, drain_s: float, quick: bool, keep: Path | None = None
        ) -> dict[str, Any]:
    """Three workers; every minute (half-way through it) the oldest live one is killed and
    a new one started, while events arrive at ``rate``; then drain and account."""
    stream = make_stream(int(rate * 60 * minutes * 1.2) + 50, "churn")
    events = stream.events
    churn: list[dict[str, Any]] = []
    with workdir(keep, "sluice-churn-") as tmp, \
            private_stack(Path(tmp) / "stack") as base, \
            crew(base, Path(tmp)) as workers:
        settings = isolated(base, partitions=6)
        folder = Path(tmp)
        for n in range(3):
            workers.append(Worker(f"worker{n}", settings, folder).start())
        joined_s = wait_for_group(settings, 3, workers)
        console.print(f"3 workers joined in {joined_s:.0f} s; producing {rate:g} events/s "
                      f"for {minutes} min, one worker killed and one started every minute")
        ledger = Ledger(settings)
        producer = SteadyProducer(settings, events, rate)
        began = time.monotonic()
        producer.start()
        try:
            for minute in range(minutes):
                at = began + 60 * minute + 30
                while time.monotonic() < at:
                    ledger.poll(1000)
                victim = next(w for w in workers if w.alive)
                victim.kill()
                fresh = Worker(f"worker{len(workers)}", settings, folder).start()
                workers.append(fresh)
                churn.append({"at_s": round(time.monotonic() - began), "killed": victim.name,
                              "started": fresh.name})
                console.print(f"  {time.monotonic() - began:4.0f} s: killed {victim.name}, "
                              f"started {fresh.name}; produced {producer.queued}, "
                              f"with an outcome {len(ledger.decisions)}")
            while time.monotonic() < began + 60 * minutes:
                ledger.poll(1000)
        finally:
            produced = producer.stop()
        if producer.error is not None:
            console.print(f"[red]producer failed: {producer.error!r}[/red]")
        drained_s = drain(ledger, produced, drain_s)
        samples = {i for i, d in ledger.decisions.items() if ("kept", None, None) in d}
        in_buffers = wait_buffered(settings, samples)
        ledger.drain()
        where = where_stuck(settings, set(produced) - set(ledger.decisions),
                            samples - in_buffers)
        figures = account(ledger, produced, stream.groups, index_members(settings), in_buffers,
                          settings.dedup.threshold, where)
        ledger.close()
        title = (f"rebalance churn: {minutes} min, {rate:g} events/s, 3 workers, "
                 f"{len(churn)} kills + starts; drained {drained_s:.0f} s after the last event")
        problems = report(title, figures, workers)
    payload = {"minutes": minutes, "rate": rate, "churn": churn, "joined_s": joined_s,
               "drain_s": drained_s, "figures": figures, "failures": problems}
    write_result("churn", quick, payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 minutes")
    parser.add_argument("--minutes", type=int, default=None, help="default 10 (quick: 2)")
    parser.add_argument("--rate", type=float, default=2.0, help="events per second")
    parser.add_argument("--drain-s", type=float, default=300.0,
                        help="most seconds to wait for the backlog after the last event")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the stack's state and the logs in this folder")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the workers and the stack are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    minutes = args.minutes or (2 if args.quick else 10)
    result = run(minutes, args.rate, args.drain_s, args.quick, args.keep)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
