"""Soak: one ``sluice worker`` at about 80 % of its own measured capacity for half an hour,
with the memory of every process printed each minute; then the accounting.

``python -m bench.soak [--quick] [--minutes N] [--load 0.8] [--horizon-items N]
[--horizon-age-s S]`` (30 minutes by default, ``--quick`` 3; the horizon options set the
worker's ``dedup.horizon``, which bounds every dedup layer).

A private embedded Kafka + Redis (the project's stack code, Redis append-only as
``sluice up`` runs it), four partitions, one worker (agents ingest, dedup, balance) and the
product's own producer. The events are real functions of the standard library (then of
site-packages, for long runs) with planted copies (``bench.live.corpus.make_stream``), drawn from
one pool shuffled once, so the capacity burst and every minute of the soak get the same
kind of events.

1. Capacity, measured first in the same run: a burst of events produced at once to the
   warmed-up worker; capacity = events / seconds from the first sent to the last outcome.
2. The soak: events at ``--load`` × that capacity, at a steady rate, for ``--minutes``.
   Every minute one row: events produced and decided, the backlog, the RSS of the worker
   (with any children), of Kafka and of Redis (``/proc``), Redis' ``used_memory`` and
   ``used_memory_rss`` (``INFO memory``), its key count (``DBSIZE``), the vector set's size
   and the two fuzzy indexes' sizes (words / code tokens).
3. The summary: memory after the warm-up against the last row, per process; flat within
   10 % is the goal. The warm-up ends when every store bounded by time is full: used
   samples keep their payload ``balance.retain_s`` (600 s) for replays, the dedup layers
   keep ``dedup.horizon.age_s``; so at the minute the longest of them ends, and at least
   a sixth of the run (``warmup_minute``). Without a horizon
   Redis holds every admitted sample in every layer, so its growth is also shown per new
   index member. Then Redis per layer at the end (keys and ``MEMORY USAGE`` by key prefix,
   one ``SCAN``), and the accounting of ``bench.churn``: produced / outcomes / double
   admissions / lost. With a horizon, samples that aged out of the vector set are counted
   as such, not as missing from it.

``reuse_cap`` is 1 and the policy ``natural`` (``bench.live.processes.isolated``), so a sample in
two batches is a fault. Bounded in time: start-up, the capacity burst (at most 10
minutes), the minutes, then at most ``--drain-s`` for the backlog. Every process it starts
is stopped.
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import console, private_stack, show, write_result
from bench.live.accounting import account
from bench.live.corpus import make_stream, real_functions
from bench.live.ledger import (
    Ledger,
    buffered,
    drain,
    index_members,
    wait_buffered,
    where_stuck,
)
from bench.live.processes import SteadyProducer, Worker, crew, isolated, wait_for_group, workdir
from bench.live.report import report

MIB = 2**20
MAX_RATE = 20.0  # events/s the corpus is sized for (one CPU worker decides ~5-10)
FLAT = 0.10  # the goal: memory after warm-up within 10 % of the end


def rss_bytes(pid: int | None, with_children: bool = False) -> int:
    """Resident memory of ``pid`` (and of its descendants), from /proc; 0 when gone."""
    if pid is None:
        return 0
    pids = [pid]
    if with_children:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        frontier = [pid]
        while frontier:
            kids = children.get(frontier.pop(), [])
            pids += kids
            frontier += kids
    total = 0
    for one in pids:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


def redis_memory(settings: Any) -> dict[str, int]:
    """``used_memory`` and ``used_memory_rss`` of the stack's Redis (INFO memory)."""
    from streams.connections import redis_client

    client = redis_client(settings.redis)
    try:
        info = client.info("memory")
        return {"used": int(info["used_memory"]), "rss": int(info["used_memory_rss"])}
    finally:
        client.close()


def index_sizes(settings: Any) -> dict[str, int]:
    """Items in the vector set and in the two fuzzy indexes, the ids the balance buffers
    remember for idempotency (every partition's ``seen``), and Redis' key count."""
    from agents.keys import buffer_prefix, code_lsh_prefix, lsh_prefix, vset_key
    from streams.connections import redis_client

    ns = settings.redis.namespace
    client = redis_client(settings.redis)
    try:
        seen = sum(int(client.hlen(f"{buffer_prefix(ns, p)}:seen"))
                   for p in range(settings.topics.partitions))
        return {"vset": int(client.execute_command("VCARD", vset_key(ns)) or 0),
                "fuzzy": int(client.hlen(f"{lsh_prefix(ns)}:sig")),
                "fuzzy_code": int(client.hlen(f"{code_lsh_prefix(ns)}:sig")),
                "seen": seen, "keys": int(client.dbsize())}
    finally:
        client.close()


#: Key prefixes of the namespace's stores (``agents.keys``), in the order shown.
LAYERS = (("exact claims", "sluice:{ns}:exact:"), ("first digests", "sluice:{ns}:first:"),
          ("fuzzy words", "sluice:{{{ns}:lsh}}:"), ("fuzzy code", "sluice:{{{ns}:lsh-code}}:"),
          ("semantic", "sluice:{{{ns}:vset}}:"), ("buffers", "sluice:{{{ns}:buf:"))


def layer_memory(settings: Any) -> list[dict[str, Any]]:
    """Keys and bytes (``MEMORY USAGE``) per store of the namespace, by one ``SCAN``: cheap
    enough once at the end (a soak's namespace holds thousands of keys, not millions)."""
    from streams.connections import redis_client

    ns = settings.redis.namespace
    prefixes = [(name, pattern.format(ns=ns)) for name, pattern in LAYERS]
    client = redis_client(settings.redis)
    try:
        keys = [k.decode() if isinstance(k, bytes) else str(k)
                for k in client.scan_iter(match="sluice:*", count=1000)]
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key)
        sizes = pipe.execute() if keys else []
    finally:
        client.close()
    count: dict[str, int] = {name: 0 for name, _ in [*prefixes, ("other", "")]}
    used = dict(count)
    for key, size in zip(keys, sizes, strict=True):
        name = next((n for n, p in prefixes if key.startswith(p)), "other")
        count[name] += 1
        used[name] += int(size or 0)
    return [{"layer": name, "keys": count[name], "bytes": used[name]} for name in count]


def corpus(minutes: int, burst: int) -> list[tuple[str, str]]:
    """Enough real functions for the warm-up, the burst and the soak at up to
    ``MAX_RATE``, shuffled once, so the burst and every minute of the soak draw the same
    kind of events (the standard library first, then site-packages, when read in order)."""
    pool = real_functions(int(MAX_RATE * 60 * minutes * 0.9) + burst + 100)
    random.Random(0).shuffle(pool)
    return pool


def measure_capacity(settings: Any, worker: Worker, ledger: Ledger, burst: int,
                     pool: list[tuple[str, str]]
                     ) -> tuple[float, list[str], list[set[str]], float]:
    """Warm the worker up, then produce ``burst`` events at once; (events/s, every id
    produced, the burst's groups of copies, seconds from the first sent to the last
    outcome). Corpus positions 0-9 warm up, the burst starts at 10."""
    warm = make_stream(6, "warm", pool=pool).events
    _send_all(settings, warm)
    _wait_outcomes(ledger, [e["id"] for e in warm], worker, 300.0)
    stream = make_stream(burst, "capacity", skip=10, pool=pool)
    began = time.monotonic()
    _send_all(settings, stream.events)
    _wait_outcomes(ledger, [e["id"] for e in stream.events], worker, 300.0)
    seconds = time.monotonic() - began
    ids = [e["id"] for e in warm + stream.events]
    return len(stream.events) / seconds, ids, stream.groups, seconds


def _send_all(settings: Any, events: list[dict[str, Any]]) -> None:
    from streams.producer import EventProducer

    with EventProducer(settings.kafka, settings.topics, settings.produce) as producer:
        for event in events:
            producer.send(event)  # type: ignore[arg-type]


def _wait_outcomes(ledger: Ledger, ids: list[str], worker: Worker, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    wanted = set(ids)
    while not wanted <= set(ledger.decisions):
        if time.monotonic() > deadline or not worker.alive:
            raise RuntimeError(f"{len(wanted - set(ledger.decisions))} of {len(wanted)} "
                               f"events without an outcome; see {worker.log}")
        ledger.poll(500)


def sample(minute: float, settings: Any, stack: Any, worker: Worker, producer: SteadyProducer,
           ledger: Ledger, decided_before: int) -> dict[str, Any]:
    """One row of the memory curve (``decided_before``: outcomes before the soak began)."""
    redis = redis_memory(settings)
    decided = len(ledger.decisions) - decided_before
    return {"minute": round(minute, 1), "produced": len(producer.sent), "decided": decided,
            "backlog": len(producer.sent) - decided,
            "worker_rss": rss_bytes(worker.pid, with_children=True),
            "kafka_rss": rss_bytes(stack.kafka.pid()), "redis_rss": rss_bytes(stack.redis.pid()),
            "redis_used": redis["used"], "redis_used_rss": redis["rss"],
            **index_sizes(settings)}


COLUMNS = ["min", "produced", "decided", "backlog", "worker RSS MiB", "Kafka RSS MiB",
           "Redis RSS MiB", "Redis used MiB", "Redis keys", "vector set", "fuzzy words/code",
           "seen ids"]


def _row(r: dict[str, Any]) -> list[Any]:
    return [r["minute"], r["produced"], r["decided"], r["backlog"],
            f"{r['worker_rss'] / MIB:.0f}", f"{r['kafka_rss'] / MIB:.0f}",
            f"{r['redis_rss'] / MIB:.1f}", f"{r['redis_used'] / MIB:.1f}", r["keys"],
            r["vset"], f"{r['fuzzy']}/{r['fuzzy_code']}", r.get("seen", "")]


def warmup_minute(minutes: int, retain_s: float, horizon_age_s: float) -> int:
    """The minute from which memory should be flat: every store bounded by time is full
    (used payloads kept ``retain_s``, dedup layers ``horizon_age_s``), and at least a
    sixth of the run; never the last minute (a run shorter than that says so)."""
    full = math.ceil(max(retain_s, horizon_age_s) / 60)
    wanted = max(1, minutes // 6, full)
    if wanted >= minutes:
        console.print(f"[yellow]the stores bounded by time fill for {full} minutes; a "
                      f"{minutes}-minute soak cannot show them flat[/yellow]")
    return min(wanted, max(1, minutes - 1))


def summary(rows: list[dict[str, Any]], warmup_minute: int) -> list[dict[str, Any]]:
    """Per process: memory at the end of the warm-up against the end; flat or not (the
    verdict). Beside it, ``trend``: the least-squares line through every minute after the
    warm-up, its change over that span relative to its start — a noisy series (the
    worker's RSS swings by 10 % from minute to minute) shows there as what it is."""
    warm = next((r for r in rows if r["minute"] >= warmup_minute), rows[0])
    end = rows[-1]
    after = [r for r in rows if r["minute"] >= warm["minute"]]
    out = []
    for key, what in (("worker_rss", "worker RSS"), ("kafka_rss", "Kafka RSS"),
                      ("redis_rss", "Redis RSS"), ("redis_used", "Redis used_memory")):
        change = (end[key] - warm[key]) / warm[key] if warm[key] else float("nan")
        trend = float("nan")
        if len(after) > 2:
            minutes = np.array([r["minute"] for r in after], dtype=float)
            slope, start = np.polyfit(minutes - minutes[0], [float(r[key]) for r in after], 1)
            span = minutes[-1] - minutes[0]
            trend = slope * span / start if start else float("nan")
        out.append({"what": what, "after_warmup_mib": warm[key] / MIB,
                    "end_mib": end[key] / MIB, "change": change,
                    "flat": abs(change) <= FLAT, "trend": trend})
    grown = end["vset"] - warm["vset"]
    if grown > 0.05 * max(1, warm["vset"]):  # a full index turning over is not growth
        out.append({"what": "Redis used_memory per new index member (bytes)",
                    "per_member": (end["redis_used"] - warm["redis_used"]) / grown})
    return out


def run(minutes: int, load: float, burst: int, drain_s: float, quick: bool,
        keep: Path | None = None, horizon: dict[str, float] | None = None,
        seen_cap: int | None = None) -> dict[str, Any]:
    """Capacity, then the soak at ``load`` × capacity, then the accounting. ``horizon``:
    the worker's ``dedup.horizon`` fields (``items``, ``age_s``, ``evict_per_call``);
    ``seen_cap``: its ``balance.seen_cap`` (None: the setting's default)."""
    from agents.config import HorizonSettings
    from sluice.stack import Stack

    rows: list[dict[str, Any]] = []
    pool = corpus(minutes, burst)
    with workdir(keep, "sluice-soak-") as tmp, \
            private_stack(Path(tmp) / "stack") as base, crew(base, Path(tmp)) as workers:
        stack = Stack(base)
        # A validated section, not a dict: ``isolated`` copies it in without validating.
        sections: dict[str, dict[str, Any]] = (
            {"dedup": {"horizon": HorizonSettings(**horizon)}} if horizon else {})
        if seen_cap is not None:
            sections["balance"] = {"seen_cap": seen_cap}
        settings = isolated(base, partitions=4, **sections)
        worker = Worker("worker0", settings, Path(tmp)).start()
        workers.append(worker)
        wait_for_group(settings, 1, workers)
        ledger = Ledger(settings)
        capacity, earlier, groups, burst_s = measure_capacity(settings, worker, ledger, burst,
                                                              pool)
        burst_n = len(earlier) - 6
        rate = load * capacity
        stream = make_stream(int(rate * 60 * minutes * 1.1) + 50, "soak", skip=burst + 20,
                             pool=pool)
        if len(stream.events) < rate * 60 * minutes:
            console.print(f"[yellow]the corpus holds {len(stream.events)} events: the soak "
                          "ends early at this rate (raise MAX_RATE)[/yellow]")
        console.print(f"capacity of one worker: {capacity:.2f} events/s ({burst_n} events in "
                      f"{burst_s:.1f} s); soaking at {rate:.2f} events/s ({load:.0%}) for "
                      f"{minutes} min ({len(stream.events)} events ready)")
        producer = SteadyProducer(settings, stream.events, rate)
        decided_before = len(ledger.decisions)
        # Read every minute: a bounded ``seen`` forgets the oldest ids long before the end
        # (2,000 a partition last ~9 minutes at 20 events/s), the accounting needs them all.
        ever_buffered = buffered(settings)
        began = time.monotonic()
        producer.start()
        try:
            rows.append(sample(0, settings, stack, worker, producer, ledger, decided_before))
            console.print("  " + " | ".join(COLUMNS))
            console.print("  " + " | ".join(map(str, _row(rows[-1]))))
            for minute in range(1, minutes + 1):
                while time.monotonic() < began + 60 * minute:
                    ledger.poll(1000)
                rows.append(sample(minute, settings, stack, worker, producer, ledger,
                                   decided_before))
                ever_buffered |= buffered(settings)
                console.print("  " + " | ".join(map(str, _row(rows[-1]))))
                if not worker.alive:
                    console.print(f"[red]the worker exited ({worker.log})[/red]")
                    break
        finally:
            produced = producer.stop()
        if producer.error is not None:
            console.print(f"[red]producer failed: {producer.error!r}[/red]")
        drained_s = drain(ledger, produced, drain_s)
        samples = {i for i, d in ledger.decisions.items() if ("kept", None, None) in d}
        in_buffers = wait_buffered(settings, samples, earlier=ever_buffered)
        ledger.drain()
        # Accounted over every event this worker saw: warm-up, capacity burst and soak.
        everything = earlier + produced
        where = where_stuck(settings, set(everything) - set(ledger.decisions),
                            samples - in_buffers)
        members = index_members(settings)
        # With a horizon a sample missing from the vector set aged out of it (bounded
        # memory is the point): counted apart, so only members that are no sample fail.
        aged = (samples - members) if horizon else set()
        figures = account(ledger, everything, groups + stream.groups, members | aged,
                          in_buffers, settings.dedup.threshold, where,
                          live=members if horizon else None)
        figures["vset"], figures["vset_aged_out"] = len(members), len(aged)
        layers = layer_memory(settings)
        ledger.close()
        show(f"soak: one worker at {rate:.2f} events/s ({load:.0%} of {capacity:.2f}), "
             f"memory every minute", COLUMNS, [_row(r) for r in rows])
        warm_minute = warmup_minute(minutes, settings.balance.retain_s,
                                    float((horizon or {}).get("age_s") or 0.0))
        flat = summary(rows, warm_minute)
        show(f"memory after the warm-up (minute {warm_minute}) vs the end "
             f"(minute {rows[-1]['minute']}); goal: within {FLAT:.0%}",
             ["process", "after warm-up MiB", "end MiB", "change", "flat",
              "trend (fit, same span)"],
             [[f["what"], f["after_warmup_mib"], f["end_mib"], f"{f['change']:+.1%}",
               "yes" if f["flat"] else "NO", f"{f['trend']:+.1%}"]
              for f in flat if "change" in f])
        for f in flat:
            if "per_member" in f:
                console.print(f"{f['what']}: {f['per_member']:,.0f}")
        show(f"Redis per layer at the end (dedup.horizon: {horizon or 'none'}; "
             f"{len(aged)} samples aged out of the vector set)",
             ["layer", "keys", "MEMORY USAGE MiB"],
             [[x["layer"], x["keys"], f"{x['bytes'] / MIB:.2f}"] for x in layers])
        problems = report(f"soak accounting (drained {drained_s:.0f} s after the last event)",
                          figures, workers)
    payload = {"minutes": minutes, "load": load, "capacity_events_per_s": capacity,
               "capacity_burst": {"events": burst_n, "seconds": burst_s}, "rate": rate,
               "rows": rows, "warmup_minute": warm_minute, "memory": flat,
               "drain_s": drained_s, "figures": figures,
               "horizon": horizon or {}, "seen_cap": settings.balance.seen_cap,
               "layers": layers, "failures": problems}
    write_result("soak", quick, payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 minutes")
    parser.add_argument("--minutes", type=int, default=None, help="default 30 (quick: 3)")
    parser.add_argument("--load", type=float, default=0.8, help="share of measured capacity")
    parser.add_argument("--burst", type=int, default=None,
                        help="events of the capacity burst (default 300, quick 100)")
    parser.add_argument("--drain-s", type=float, default=300.0,
                        help="most seconds to wait for the backlog after the last event")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the stack's state and the logs in this folder")
    parser.add_argument("--horizon-items", type=int, default=0,
                        help="dedup.horizon.items: items each semantic / fuzzy index keeps "
                             "at most (default 0: no limit)")
    parser.add_argument("--horizon-age-s", type=float, default=0.0,
                        help="dedup.horizon.age_s: every layer forgets (and exact claims "
                             "expire) after this many seconds (default 0: never)")
    parser.add_argument("--horizon-evict", type=int, default=None,
                        help="dedup.horizon.evict_per_call (default: the setting's default)")
    parser.add_argument("--seen-cap", type=int, default=None,
                        help="balance.seen_cap: ids each samples partition remembers for "
                             "idempotency (default: the setting's default)")
    args = parser.parse_args(argv)
    horizon: dict[str, float] = {}
    if args.horizon_items or args.horizon_age_s:
        horizon = {"items": args.horizon_items, "age_s": args.horizon_age_s}
        if args.horizon_evict is not None:
            horizon["evict_per_call"] = args.horizon_evict
    # SIGTERM unwinds like Ctrl-C: the worker and the stack are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    minutes = args.minutes or (3 if args.quick else 30)
    burst = args.burst or (100 if args.quick else 300)
    result = run(minutes, args.load, burst, args.drain_s, args.quick, args.keep, horizon,
                 args.seen_cap)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
