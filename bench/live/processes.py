"""The processes of a live run (``bench.churn``, ``bench.soak``): settings isolated per run,
``sluice worker`` processes with their own state folders and logs, their consumer group,
and the steady producer."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, console

AGENTS = "ingest,dedup,balance"


def isolated(settings: Any, partitions: int, **sections: dict[str, Any]) -> Any:
    """``settings`` with fresh topics, consumer group and Redis namespace; ``reuse_cap`` 1
    (so a sample in two batches is a fault); ``sections`` update other sub-settings."""
    from streams.topics import ensure_topics

    uid = uuid.uuid4().hex[:8]
    names = {role: f"{role}-{uid}" for role in settings.topics.all()}
    update: dict[str, Any] = {
        "app_id": f"bench{uid}",
        "topics": settings.topics.model_copy(update={**names, "partitions": partitions}),
        "redis": settings.redis.model_copy(update={"namespace": uid}),
        "balance": settings.balance.model_copy(update={"reuse_cap": 1, "batch_size": 16,
                                                       "policy": "natural",
                                                       "pace": "arrivals"}),
    }
    for name, values in sections.items():
        section = update.get(name) or getattr(settings, name)
        update[name] = section.model_copy(update=values)
    out = settings.model_copy(update=update)
    ensure_topics(out.kafka, out.topics)
    return out


def worker_env(settings: Any) -> dict[str, str]:
    """The environment that makes ``sluice worker`` load ``settings`` (``settings_env``)."""
    from sluice.settings import settings_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env | settings_env(settings)


@dataclass
class Worker:
    """One ``sluice worker`` process with its own state folder and log."""

    name: str
    settings: Any
    folder: Path
    agents: str = AGENTS
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    def start(self) -> Worker:
        from sluice.ports import free_port

        own = self.settings.model_copy(update={"state_dir": self.folder / self.name})
        own.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sluice.cli", "worker", "--agents", self.agents,
                 "--loglevel", "info", "--web-port", str(free_port())],
                env=worker_env(own), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive and self.proc else None

    def kill(self) -> None:
        """SIGKILL: a crash, no goodbye to the group."""
        if self.proc is not None and self.alive:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        if self.proc is None or not self.alive:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def notable(self, lines: int = 8) -> list[str]:
        """Its last error, traceback and outage lines."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        keys = ("ERROR", "CRITICAL", "Traceback", "unreachable")
        return [line[:240] for line in text.splitlines() if any(k in line for k in keys)][-lines:]


@contextlib.contextmanager
def workdir(keep: Path | None, prefix: str) -> Iterator[str]:
    """Where the stack's state and the workers' logs go: ``keep`` (left there afterwards,
    to inspect a failure: restart the stack from it with ``sluice up``'s code) or a
    temporary folder removed at the end."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield str(keep)
        console.print(f"[dim]state and logs kept in {keep}[/dim]")
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield tmp


@contextlib.contextmanager
def crew(settings: Any, folder: Path) -> Iterator[list[Worker]]:
    """A list to start workers into; every one of them is stopped at the end."""
    members: list[Worker] = []
    try:
        yield members
    finally:
        for worker in members:
            worker.stop()


def group_members(settings: Any) -> tuple[str, int]:
    """The state of the workers' consumer group and its member count."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    from streams.connections import kafka_client_options

    logging.getLogger("kafka").setLevel(logging.ERROR)
    try:
        admin = KafkaAdminClient(**kafka_client_options(settings.kafka), request_timeout_ms=10000)
    except KafkaError:
        return "Unknown", 0
    try:
        info = admin.describe_groups([settings.app_id])[settings.app_id]
    except KafkaError:
        return "Unknown", 0
    finally:
        admin.close()
    return str(info.get("group_state") or info.get("state")), len(info.get("members") or [])


def wait_for_group(settings: Any, members: int, workers: list[Worker],
                   timeout_s: float = 300.0) -> float:
    """Wait until ``members`` workers are in the group and it is stable; the seconds."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if group_members(settings) == ("Stable", members):
            return time.monotonic() - began
        if not all(w.alive for w in workers):
            break
        time.sleep(1.0)
    raise RuntimeError(f"the group never reached {members} stable members; logs: "
                       + ", ".join(str(w.log) for w in workers))


class SteadyProducer(threading.Thread):
    """Sends events at ``rate`` per second with the product's ``EventProducer`` until the
    list ends or ``stop()``; ``sent`` holds the ids Kafka acknowledged."""

    def __init__(self, settings: Any, events: list[dict[str, Any]], rate: float) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.settings = settings
        self.events = events
        self.rate = rate
        self.sent: list[str] = []
        self.queued = 0  # handed to the producer (``sent``: acknowledged, flushed in 16s)
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        from streams.producer import EventProducer

        queued: list[str] = []
        try:
            with EventProducer(self.settings.kafka, self.settings.topics, self.settings.produce,
                               rate=self.rate) as producer:
                for event in self.events:
                    if self._halt.is_set():
                        break
                    producer.send(event)  # type: ignore[arg-type]
                    queued.append(event["id"])
                    self.queued += 1
                    if len(queued) >= 16:
                        producer.flush()
                        self.sent += queued
                        queued = []
                producer.flush()
                self.sent += queued
        except BaseException as exc:  # shown in the report
            self.error = exc

    def stop(self) -> list[str]:
        self._halt.set()
        self.join(120.0)
        return list(self.sent)
