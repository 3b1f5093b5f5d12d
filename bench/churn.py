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

This module also holds what ``bench.soak`` shares with it: the corpus, worker processes,
the steady producer, the outcome ledger and the accounting.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO_ROOT, console, private_stack, show, write_result

AGENTS = "ingest,dedup,balance"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SITE = Path(sysconfig.get_paths()["purelib"])
EDITS = ("exact", "whitespace", "comment")
# An exact copy has the original's normalized digest and a whitespace copy its word
# shingles (MinHash Jaccard 1): both are duplicates whatever the text, so a group of one of
# them with its original admitted twice is a double admission. A comment copy is a
# duplicate only if MinHash or the model at the threshold says so (on arbitrary short
# functions it is not always: a soak saw 5 of ~5,400 kept, none within the threshold of
# its original), so it is judged by the close-pairs check alone.
CAUGHT_BY_CONSTRUCTION = ("exact", "whitespace")


# -- the corpus: real functions with planted copies ------------------------------------------


def real_functions(n: int, skip: int = 0, min_chars: int = 250, max_chars: int = 1500
                   ) -> list[tuple[str, str]]:
    """``n`` distinct functions (id, source) of the standard library, then of
    site-packages if more are needed, in a fixed order (sorted paths, source order),
    after the first ``skip`` of them."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    excluded = {"test", "tests", "idlelib", "site-packages", "lib2to3"}
    for root in (STDLIB, SITE):
        for path in sorted(root.rglob("*.py")):
            if root == STDLIB and excluded & set(path.relative_to(root).parts):
                continue
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
                continue
            lines = source.splitlines()
            for node in ast.walk(tree):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                text = "\n".join(lines[node.lineno - 1 : node.end_lineno or node.lineno])
                if min_chars <= len(text) <= max_chars and text not in seen:
                    seen.add(text)
                    rel = path.relative_to(root).with_suffix("")
                    out.append((f"{'.'.join(rel.parts)}.{node.name}:{node.lineno}", text))
                    if len(out) >= skip + n:
                        return out[skip:]
    return out[skip:]


def planted(text: str, edit: str) -> str:
    """A copy every layer should catch: the exact digest (CRLF, trailing spaces), MinHash
    (spaces on some lines, a blank line), or MinHash / the model (a comment line)."""
    lines = text.split("\n")
    if edit == "exact":
        return "\r\n".join(line + "   " for line in lines) + "\r\n\r\n"
    if edit == "whitespace":
        lines = [line + ("  " if i % 3 == 0 else "") for i, line in enumerate(lines)]
        lines.insert(1, "")
        return "\n".join(lines)
    indent = lines[1][: len(lines[1]) - len(lines[1].lstrip())] if len(lines) > 1 else "    "
    lines.insert(1, indent + "# NOTE: kept as is for backwards compatibility.")
    return "\n".join(lines)


@dataclass
class Stream:
    """Events in the order they are produced, and the groups of copies among them (an
    original and a planted copy that every run must catch: at most one of a group may be
    admitted)."""

    events: list[dict[str, Any]]
    groups: list[set[str]]


LABELS = ("python", "tools", "web", "data")


def label_of(event_id: str) -> str:
    """One of a few classes, by the function's top-level module (a copy shares its
    original's): a small, fixed label set, as a real stream of a few classes has."""
    module = event_id.rsplit(":", 2)[-2].split(".")[0]
    return LABELS[zlib.crc32(module.encode()) % len(LABELS)]


def make_stream(n: int, prefix: str, every: int = 4, seed: int = 0, skip: int = 0,
                pool: list[tuple[str, str]] | None = None) -> Stream:
    """About ``n`` events: real functions and, for every ``every``-th one, a planted copy
    (edits in turn) inserted 3-20 events later, so original and copy are often in flight
    at once on different partitions. ``skip``: start that far into the corpus (streams
    that must not share content); ``pool``: the corpus (``real_functions`` by default)."""
    rng = random.Random(seed)
    count = max(1, n * every // (every + 1))
    originals = real_functions(count, skip) if pool is None else pool[skip : skip + count]
    order: list[tuple[str, str]] = []
    due: list[tuple[int, str, str]] = []  # (position it is due at, id, text)
    groups: list[set[str]] = []
    for k, (name, text) in enumerate(originals):
        order.append((f"{prefix}:{name}", text))
        ready = [d for d in due if d[0] <= len(order)]
        due = [d for d in due if d[0] > len(order)]
        order += [(i, t) for _, i, t in ready]
        if k % every == 0:
            edit = EDITS[(k // every) % len(EDITS)]
            copy_id = f"{prefix}:copy-{edit}:{name}"
            if edit in CAUGHT_BY_CONSTRUCTION:
                groups.append({f"{prefix}:{name}", copy_id})
            due.append((len(order) + rng.randint(3, 20), copy_id, planted(text, edit)))
    order += [(i, t) for _, i, t in due]
    now = int(time.time() * 1000)
    events = [{"id": i, "source": "bench", "kind": "CODE", "language": "python",
               "label": label_of(i), "content": t, "timestamp": now, "attributes": {}}
              for i, t in order]
    return Stream(events, groups)


# -- settings and processes ------------------------------------------------------------------


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
                                                       "policy": "natural"}),
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


# -- reading everything back -----------------------------------------------------------------


@dataclass
class Ledger:
    """Reads samples, rejections and batches from the beginning, as they come."""

    settings: Any
    decisions: dict[str, set[tuple[str, str | None, str | None]]] = field(default_factory=dict)
    messages: Counter[str] = field(default_factory=Counter)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    batches: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from streams.config import TOPIC_RECORDS
        from streams.connections import kafka_client_options

        self._consumer = KafkaConsumer(**kafka_client_options(self.settings.kafka),
                                       group_id=None, enable_auto_commit=False)
        topics = self.settings.topics.all()
        self._role = {topics[r]: r for r in ("samples", "rejected", "batches")}
        self._records = TOPIC_RECORDS
        tps = [TopicPartition(t, p) for t in self._role
               for p in sorted(self._consumer.partitions_for_topic(t) or ())]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning()

    def poll(self, timeout_ms: int = 500) -> int:
        """Read what arrived; how many messages."""
        from schemas.embedding import decode_embedding
        from streams.serde import decode

        count = 0
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            for message in records:
                count += 1
                role = self._role[message.topic]
                record = decode(message.value, self._records[role])
                if role == "batches":
                    self.batches.setdefault(record["batch_id"], []).append(
                        (record["content_digest"], [s["id"] for s in record["samples"]]))
                    continue
                event_id = record["id"]
                self.messages[event_id] += 1
                if role == "rejected":
                    decision = ("rejected", record["reason"], record["duplicate_of"])
                else:
                    decision = ("kept", None, None)
                    if event_id not in self.vectors and record.get("embedding_dim"):
                        self.vectors[event_id] = decode_embedding(record["embedding"],
                                                                  record["embedding_dim"])
                self.decisions.setdefault(event_id, set()).add(decision)
        return count

    def drain(self) -> None:
        """Read until nothing more arrives for a second."""
        while self.poll(1000):
            pass

    def close(self) -> None:
        self._consumer.close()


def index_members(settings: Any) -> set[str]:
    """Every id in the namespace's vector set."""
    from agents.keys import vset_key
    from streams.connections import redis_client

    client = redis_client(settings.redis)
    try:
        key = vset_key(settings.redis.namespace)
        size = int(client.execute_command("VCARD", key) or 0)
        members = client.execute_command("VRANDMEMBER", key, size) if size else []
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members or []}
    finally:
        client.close()


def buffered(settings: Any) -> set[str]:
    """Every id the balance stage has buffered (the ``seen`` hash of each partition)."""
    from agents.keys import buffer_prefix
    from streams.connections import redis_client

    client = redis_client(settings.redis)
    try:
        out: set[str] = set()
        for partition in range(settings.topics.partitions):
            keys = client.hkeys(buffer_prefix(settings.redis.namespace, partition) + ":seen")
            out |= {k.decode() if isinstance(k, bytes) else k for k in keys}
        return out
    finally:
        client.close()


def drain(ledger: Ledger, produced: list[str], drain_s: float, idle_s: float = 120.0) -> float:
    """Poll until every produced id has an outcome, ``drain_s`` passed, or nothing new came
    for ``idle_s``; prints progress every 30 s; the seconds it took."""
    began = last_new = last_print = time.monotonic()
    wanted = set(produced)
    while True:
        if ledger.poll(1000):
            last_new = time.monotonic()
        now = time.monotonic()
        left = len(wanted - set(ledger.decisions))
        if not left or now - began > drain_s or now - last_new > idle_s:
            return now - began
        if now - last_print > 30:
            console.print(f"  draining: {left} of {len(wanted)} without an outcome yet "
                          f"({now - began:.0f} s)")
            last_print = now


def wait_buffered(settings: Any, samples: set[str], timeout_s: float = 180.0,
                  idle_s: float = 30.0) -> set[str]:
    """What the balance stage buffered, once it holds every sample or stopped moving."""
    began = moved = time.monotonic()
    have = buffered(settings)
    while not samples <= have and time.monotonic() - began < timeout_s:
        if time.monotonic() - moved > idle_s:
            break
        time.sleep(1.0)
        now = buffered(settings)
        if now != have:
            have, moved = now, time.monotonic()
    return have


def committed_offsets(settings: Any) -> dict[tuple[str, int], int]:
    """The workers' group's committed offset of every partition it consumes."""
    from kafka.admin import KafkaAdminClient

    from streams.connections import kafka_client_options

    admin = KafkaAdminClient(**kafka_client_options(settings.kafka), request_timeout_ms=10000)
    try:
        found = admin.list_group_offsets(settings.app_id)
    finally:
        admin.close()
    if settings.app_id in found:  # kafka-python 3 answers by group
        found = found[settings.app_id]
    return {(tp.topic, tp.partition): int(meta.offset) for tp, meta in found.items()}


def positions(settings: Any, topic: str, ids: set[str]) -> dict[str, list[tuple[int, int]]]:
    """Where (partition, offset) each of ``ids`` is on ``topic``, read by key to the end."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.connections import kafka_client_options

    out: dict[str, list[tuple[int, int]]] = {}
    if not ids:
        return out
    consumer = KafkaConsumer(**kafka_client_options(settings.kafka), group_id=None,
                             enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for records in consumer.poll(timeout_ms=1000).values():
                for message in records:
                    key = (message.key or b"").decode("utf-8", "replace")
                    if key in ids:
                        out.setdefault(key, []).append((message.partition, message.offset))
    finally:
        consumer.close()
    return out


def where_stuck(settings: Any, undecided: set[str], unbuffered: set[str]) -> dict[str, str]:
    """Why each id without an outcome (or sample never buffered) is so: ``lost at <stage>``
    when the stage's committed offset has passed its record (acked without an outcome), else
    ``in flight`` (the stage has not got to it yet: the lag shows it)."""
    committed = committed_offsets(settings)
    t = settings.topics

    def passed(topic: str, coords: list[tuple[int, int]]) -> bool:
        return any(offset < committed.get((topic, p), 0) for p, offset in coords)

    raw = positions(settings, t.raw, undecided)
    candidates = positions(settings, t.candidates, undecided)
    samples = positions(settings, t.samples, unbuffered)
    out = {}
    for event_id in undecided:
        if candidates.get(event_id):
            out[event_id] = ("lost at dedup" if passed(t.candidates, candidates[event_id])
                             else "in flight")
        else:
            out[event_id] = ("lost at ingest" if passed(t.raw, raw.get(event_id, []))
                             else "in flight")
    for sample_id in unbuffered:
        out[sample_id] = ("lost at balance" if passed(t.samples, samples.get(sample_id, []))
                          else "in flight")
    return out


def account(ledger: Ledger, produced: list[str], groups: list[set[str]], index: set[str],
            in_buffers: set[str], threshold: float, where: dict[str, str] | None = None,
            live: set[str] | None = None) -> dict[str, Any]:
    """Every figure of the accounting, and the ids behind each failure. ``where``
    (``where_stuck``) tells lost from still in flight; without it every id without an
    outcome counts as lost. ``live`` (with a ``dedup.horizon``): the samples still in the
    index, the only ones "no two admitted within the threshold" covers — a copy that
    arrives after its original aged out is admitted, as the horizon means."""
    where = where or {}
    decided = ledger.decisions
    samples = {i for i, d in decided.items() if ("kept", None, None) in d}
    covered = samples if live is None else samples & live
    changed = {i: sorted(map(str, d)) for i, d in decided.items() if len(d) > 1}
    doubled_groups = [sorted(g & covered) for g in groups if len(g & covered) > 1]
    close = close_pairs(ledger.vectors, covered, threshold)
    uses: dict[str, set[str]] = {}
    for batch_id, copies in ledger.batches.items():
        for sample_id in copies[0][1]:
            uses.setdefault(sample_id, set()).add(batch_id)
    undecided = set(produced) - set(decided)
    in_flight = sorted(i for i in undecided if where.get(i) == "in flight")
    lost = sorted(undecided - set(in_flight))
    unbuffered = samples - in_buffers
    unbuffered_in_flight = sorted(i for i in unbuffered if where.get(i) == "in flight")
    unbuffered_lost = sorted(unbuffered - set(unbuffered_in_flight))
    changed_kept = sorted(i for i, d in decided.items()
                          if len(d) > 1 and ("kept", None, None) in d)
    return {
        "produced": len(produced),
        "with_outcome": len(set(produced) & set(decided)),
        "outcome_messages": sum(ledger.messages[i] for i in produced),
        "samples": len(samples),
        "rejected": len(set(decided) - samples),
        "resent_ids": sum(1 for i in produced if ledger.messages[i] > 1),
        "double_admissions": len(changed_kept) + sum(len(g) - 1 for g in doubled_groups)
        + len(close),
        "lost": len(lost),
        "lost_ids": {i: where.get(i, "no outcome") for i in lost[:50]},
        "in_flight": len(in_flight),
        "in_flight_ids": in_flight[:20],
        "changed": dict(list(changed.items())[:50]),
        "groups_doubled": doubled_groups[:50],
        "close_pairs": close[:50],
        "vset": len(index),
        "vset_missing": sorted(samples - index)[:50],
        "vset_missing_n": len(samples - index),
        "vset_extra": sorted(index - samples)[:50],
        "vset_extra_n": len(index - samples),
        "batches": len(ledger.batches),
        "batches_changed": sorted(b for b, c in ledger.batches.items()
                                  if len({d for d, _ in c}) > 1)[:50],
        "in_two_batches": {i: sorted(b) for i, b in uses.items() if len(b) > 1},
        "phantom": sorted(set(uses) - samples)[:50],
        "unbuffered": {i: where.get(i, "never buffered") for i in unbuffered_lost[:50]},
        "unbuffered_n": len(unbuffered_lost),
        "unbuffered_in_flight": len(unbuffered_in_flight),
        "unexpected": sorted(set(decided) - set(produced))[:50],
    }


def close_pairs(vectors: dict[str, np.ndarray], samples: set[str], threshold: float
                ) -> list[tuple[str, str, float]]:
    """Pairs of admitted samples at or above the cosine threshold, from the embeddings they
    carry (float16 on the wire: a margin of 1e-3 keeps rounding out)."""
    names = sorted(i for i in samples if i in vectors)
    if len(names) < 2:
        return []
    matrix = np.vstack([vectors[n] for n in names]).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    out = []
    for start in range(0, len(names), 1024):  # blocks: bounded memory on long runs
        block = matrix[start : start + 1024] @ matrix.T
        rows, cols = np.where(block >= threshold + 1e-3)
        out += [(names[start + r], names[c], float(block[r, c]))
                for r, c in zip(rows, cols, strict=True) if start + r < c]
    return out


def failures(figures: dict[str, Any]) -> list[str]:
    """Every broken guarantee, one line each with the ids."""
    checks = [("lost (no outcome)", figures["lost_ids"], figures["lost"]),
              ("outcomes that disagree", figures["changed"], len(figures["changed"])),
              ("groups of copies with two admitted", figures["groups_doubled"],
               len(figures["groups_doubled"])),
              ("samples within the threshold of each other", figures["close_pairs"],
               len(figures["close_pairs"])),
              ("samples missing from the vector set", figures["vset_missing"],
               figures["vset_missing_n"]),
              ("vector-set members that are no sample", figures["vset_extra"],
               figures["vset_extra_n"]),
              ("samples in two batches", figures["in_two_batches"],
               len(figures["in_two_batches"])),
              ("batch ids re-sent with other content", figures["batches_changed"],
               len(figures["batches_changed"])),
              ("batch samples that are no sample", figures["phantom"], len(figures["phantom"])),
              ("samples never buffered by balance (committed past)", figures["unbuffered"],
               figures["unbuffered_n"]),
              ("outcomes for ids never produced", figures["unexpected"],
               len(figures["unexpected"]))]
    return [f"{what}: {n}: {ids}" for what, ids, n in checks if n]


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


# -- the churn -------------------------------------------------------------------------------


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
