"""``sluice demo``: the whole pipeline on a real corpus found on this machine.

Starts the embedded stack, a worker (all agents) and, when asked, the trainer; produces
real files (the Python standard library, C headers, the Debian package docs with their
many identical licence texts); follows the outcomes live; prints a summary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.errors import SluiceError
from sluice.settings import Settings, settings_env
from streams.connections import kafka_client_options
from streams.serde import DecodeError, decode


def default_corpus() -> list[Path]:
    """Real folders of code and text that exist on this machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = [stdlib / "email", stdlib / "json", stdlib / "logging", stdlib / "http",
                  stdlib / "asyncio", Path("/usr/share/doc"), Path("/usr/include/linux"),
                  stdlib / "unittest", stdlib / "xml"]
    found = [p for p in candidates if p.is_dir()]
    if not found:
        raise SluiceError("no corpus found on this machine: pass folders to `sluice demo`")
    return found


class OutcomeFollower:
    """Reads samples, rejections and batches produced after it was created."""

    def __init__(self, settings: Settings) -> None:
        t = settings.topics
        self.topics = {t.samples: "CuratedSample", t.rejected: "Rejection",
                       t.batches: "CuratedBatch", t.metrics: "MetricSnapshot"}
        self.consumer = KafkaConsumer(**kafka_client_options(settings.kafka), group_id=None,
                                      enable_auto_commit=False, consumer_timeout_ms=500)
        tps = [TopicPartition(topic, p) for topic in self.topics
               for p in sorted(self.consumer.partitions_for_topic(topic) or [])]
        self.consumer.assign(tps)
        self.consumer.seek_to_end()
        for tp in tps:  # resolve the lazy seek now, before anything is produced
            self.consumer.position(tp)
        self.outcome: dict[str, str] = {}  # event id → "kept" or a rejection reason
        self.kept_labels: Counter[str] = Counter()
        self.batch_labels: Counter[str] = Counter()
        self.batches = 0
        self.trainer: dict[str, float] = {}  # the trainer's latest gauges

    def poll(self) -> None:
        """Read whatever has arrived."""
        for message in self.consumer:
            try:
                record: dict[str, Any] = decode(message.value, self.topics[message.topic])
            except DecodeError:
                continue
            name = self.topics[message.topic]
            if name == "CuratedSample":
                if record["id"] not in self.outcome:
                    self.kept_labels[record["label"]] += 1
                self.outcome[record["id"]] = "kept"
            elif name == "Rejection":
                self.outcome.setdefault(record["id"], record["reason"])
            elif name == "CuratedBatch":
                self.batches += 1
                self.batch_labels.update(s["label"] for s in record["samples"])
            elif record["component"] == "trainer":
                self.trainer.update(record["gauges"])

    def trainer_line(self) -> str:
        """Step, loss and accuracy of the trainer, when it has reported."""
        g = self.trainer
        if "step" not in g:
            return "trainer: waiting for batches"
        return (f"trainer: step {g['step']:.0f}, loss {g.get('loss', float('nan')):.3f}, "
                f"accuracy {g.get('accuracy', float('nan')):.2f}")

    def close(self) -> None:
        self.consumer.close()


def start_process(settings: Settings, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Run ``sluice ARGS`` in the background with the same settings, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "sluice.cli", *args],
                                env=os.environ | settings_env(settings), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_processes(processes: list[subprocess.Popen[bytes]], grace_s: float = 30.0) -> None:
    """SIGTERM every process, then SIGKILL those still running after ``grace_s``."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()


def run_demo(settings: Settings, paths: list[Path], limit: int | None, idle_s: float,
             console: Console, train: bool = True) -> None:
    """Stack up, worker, produce, follow until every event has an outcome, summarize."""
    from sluice.produce import produce_paths
    from sluice.stack import Stack

    # SIGTERM unwinds like Ctrl-C, so the worker and trainer are stopped with the demo.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not train:
        # No trainer sets the pace: batches every batch_size samples, so the demo shows some.
        settings = settings.model_copy(update={
            "balance": settings.balance.model_copy(update={"pace": "arrivals"})})
    if settings.embedded:
        with console.status("starting the embedded Kafka and Redis"):
            Stack(settings).up()
    logs = settings.state_dir / "logs"
    from sluice.ports import free_port, port_is_free

    web_port = settings.metrics.worker_web_port
    if not port_is_free(web_port):
        web_port = free_port()
    worker = start_process(settings, ["worker", "--loglevel", "warning", "--web-port",
                                      str(web_port)], logs / "worker.log")
    console.print(f"worker started (pid {worker.pid}, log {logs / 'worker.log'}, "
                  f"metrics http://127.0.0.1:{web_port}/metrics)")
    processes = [worker]
    board_port = (settings.metrics.dashboard_port
                  if port_is_free(settings.metrics.dashboard_port) else free_port())
    processes.append(start_process(settings, ["dashboard", "--port", str(board_port)],
                                   logs / "dashboard.log"))
    console.print(f"[bold]dashboard: http://127.0.0.1:{board_port}[/]  "
                  "(or `sluice monitor` in another terminal)")
    if train:
        trainer = start_process(settings, ["train", "--start", "earliest"], logs / "trainer.log")
        processes.append(trainer)
        console.print(f"trainer started (pid {trainer.pid}, log {logs / 'trainer.log'})")
    follower = OutcomeFollower(settings)
    try:
        stats = produce_paths(settings, paths or default_corpus(), limit=limit, console=console)
        _follow(follower, stats.events, idle_s, worker, console)
        if train:
            _let_trainer_catch_up(follower, console)
    finally:
        stop_processes(processes)
        follower.close()
    _summary(console, follower)


def _follow(follower: OutcomeFollower, expected: int, idle_s: float,
            worker: subprocess.Popen[bytes], console: Console) -> None:
    progress = Progress(TextColumn("[bold]curating"), BarColumn(bar_width=None),
                        MofNCompleteColumn(), TextColumn("{task.fields[kept]:,} kept, "
                                                         "{task.fields[batches]:,} batches; "
                                                         "{task.fields[trainer]}"),
                        TimeElapsedColumn(), console=console)
    last_change, seen = time.monotonic(), 0
    with progress:
        task = progress.add_task("curate", total=expected, kept=0, batches=0,
                                 trainer=follower.trainer_line())
        while len(follower.outcome) < expected:
            follower.poll()
            if len(follower.outcome) != seen:
                seen, last_change = len(follower.outcome), time.monotonic()
            progress.update(task, completed=seen, kept=sum(follower.kept_labels.values()),
                            batches=follower.batches, trainer=follower.trainer_line())
            if worker.poll() is not None:
                raise SluiceError(f"the worker exited with code {worker.returncode}; "
                                  "see its log in the state folder")
            if time.monotonic() - last_change > idle_s:
                console.print(f"[yellow]no new outcome for {idle_s:.0f} s; stopping")
                break
        follower.poll()


def _let_trainer_catch_up(follower: OutcomeFollower, console: Console,
                          timeout_s: float = 60.0) -> None:
    """Give the trainer time to report on the last batches (it trains continuously)."""
    deadline = time.monotonic() + timeout_s
    with console.status("letting the trainer catch up") as status:
        while time.monotonic() < deadline and follower.batches:
            follower.poll()
            status.update(follower.trainer_line())
            lag = follower.trainer.get("lag")
            if lag is not None and lag <= 0 and "step" in follower.trainer:
                break


def _summary(console: Console, follower: OutcomeFollower) -> None:
    reasons = Counter(follower.outcome.values())
    table = Table(title="outcomes", show_header=True)
    table.add_column("outcome")
    table.add_column("events", justify="right")
    total = sum(reasons.values())
    for reason, n in reasons.most_common():
        table.add_row(reason, f"{n:,} ({100 * n / max(total, 1):.1f} %)")
    table.add_row("[bold]total", f"{total:,}")
    console.print(table)
    shares = Table(title=f"class shares: admitted samples vs {follower.batches} curated batches")
    for column in ("class", "admitted", "in batches"):
        shares.add_column(column, justify="right" if column != "class" else "left")
    kept_total = max(sum(follower.kept_labels.values()), 1)
    batch_total = max(sum(follower.batch_labels.values()), 1)
    for label in sorted(set(follower.kept_labels) | set(follower.batch_labels),
                        key=lambda c: -follower.kept_labels[c]):
        shares.add_row(label, f"{100 * follower.kept_labels[label] / kept_total:.1f} %",
                       f"{100 * follower.batch_labels[label] / batch_total:.1f} %")
    console.print(shares)
    if follower.trainer:
        console.print(follower.trainer_line())
