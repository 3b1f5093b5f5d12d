"""Helpers for the curation-pipeline tests: a real-code corpus with planted copies, isolated
settings per test, worker processes, and reading the outcomes back from Kafka.

The corpus is functions from the standard library, fixed by name. They were chosen (and
``tests/agents/test_dedup_step.py`` re-checks it with the real model) so that, at the
default thresholds, the four planted edits of each are caught as copies with a margin and
no two of them are copies of each other: cosine between any two ≤ 0.9, estimated Jaccard
of their word 5-shingles ≤ 0.3. Measured on 268 stdlib functions of 250-700 characters,
the comment edit is caught by MinHash or the model for 267 of 268, the rename edit (the
function and its first parameter renamed) for only 126 of 268 (cosine as low as 0.76): a
consistent rename of a short function is, for MiniLM at 0.97, a different text.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from agents.buffers import ClassBuffers
from agents.keys import vset_key
from schemas.embedding import decode_embedding
from schemas.records import RawEvent
from sluice.ports import free_port
from sluice.settings import Settings, settings_env
from sluice.stack import Stack
from streams.config import TOPIC_RECORDS
from streams.connections import kafka_client_options
from streams.producer import EventProducer
from streams.serde import DecodeError, decode
from streams.topics import ensure_topics

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REPO_ROOT = Path(__file__).resolve().parents[2]

#: (module, function): short (250-700 chars), unrelated functions of modules that exist in
#: every Python from 3.11 on. Calibrated: see the module doc.
CORPUS_NAMES: tuple[tuple[str, str], ...] = (
    ("__future__", "getMandatoryRelease"), ("_aix_support", "_aix_bos_rte"),
    ("_bootsubprocess", "wait"), ("_compression", "_check_can_seek"),
    ("_compression", "readall"), ("_osx_support", "_get_system_version_tuple"),
    ("_osx_support", "_remove_original_values"), ("_py_abc", "get_cache_token"),
    ("_pydecimal", "getcontext"), ("_pyio", "_open_code_with_warning"),
    ("_strptime", "_calc_julian_from_V"), ("_strptime", "_strptime_datetime"),
    ("_threading_local", "_patch"), ("_weakrefset", "_commit_removals"),
    ("base64", "b64encode"), ("bdb", "dispatch_line"), ("cmd", "emptyline"),
    ("codecs", "getstate"), ("contextlib", "_recreate_cm"), ("contextlib", "contextmanager"),
    ("dataclasses", "_recursive_repr"), ("dataclasses", "_fields_in_init_order"),
    ("difflib", "real_quick_ratio"), ("doctest", "_extract_future_flags"),
    ("filecmp", "phase0"), ("fileinput", "nextfile"), ("genericpath", "samefile"),
    ("getopt", "do_longs"), ("getopt", "do_shorts"), ("getpass", "win_getpass"),
    ("getpass", "fallback_getpass"), ("glob", "_glob0"), ("graphlib", "is_active"),
    ("graphlib", "static_order"), ("hmac", "copy"), ("hmac", "_current"),
    ("mailbox", "iteritems"), ("pathlib", "is_reserved"), ("pdb", "check"),
    ("platform", "_comparable_version"), ("plistlib", "_encode_base64"),
    ("poplib", "_getline"), ("poplib", "_getlongresp"), ("pstats", "get_top_level_stats"),
    ("pty", "master_open"), ("pydoc", "pathdirs"), ("queue", "join"),
    ("reprlib", "_repr_iterable"), ("runpy", "_get_code_from_file"), ("sched", "enterabs"),
    ("shlex", "push_source"), ("shlex", "pop_source"), ("shutil", "_fastcopy_fcopyfile"),
    ("shutil", "_copyfileobj_readinto"), ("site", "removeduppaths"),
    ("site", "_init_pathinfo"), ("socketserver", "shutdown"), ("ssl", "_ipaddress_match"),
    ("ssl", "get_default_verify_paths"), ("subprocess", "_optim_args_from_interpreter_flags"),
    ("subprocess", "_text_encoding"), ("sysconfig", "_getuserbase"), ("tabnanny", "main"),
    ("tempfile", "_sanitize_params"), ("tempfile", "_get_candidate_names"),
    ("textwrap", "_fix_sentence_endings"), ("tokenize", "_all_string_prefixes"),
    ("tokenize", "add_whitespace"), ("traceback", "format_list"), ("types", "resolve_bases"),
    ("uuid", "_ifconfig_getnode"), ("warnings", "_showwarnmsg_impl"),
)

DUPLICATE_REASONS = frozenset({"exact_duplicate", "near_duplicate", "semantic_duplicate"})


# -- the corpus ------------------------------------------------------------------------------


@cache
def stdlib_function(module: str, name: str) -> str:
    """The source of the first 250-700 character function ``name`` (top level or one class
    deep) in the stdlib module ``module``."""
    source = (STDLIB / f"{module}.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        for inner in [node, *(node.body if isinstance(node, ast.ClassDef) else [])]:
            if isinstance(inner, ast.FunctionDef) and inner.name == name:
                segment = ast.get_source_segment(source, inner)
                if segment and 250 <= len(segment) <= 700:
                    return segment
    raise LookupError(f"no 250-700 character function {name} in {module}.py")


@dataclass(frozen=True)
class Snippet:
    """One corpus entry: a stable name (``module.function``) and its source."""

    name: str
    text: str


def corpus(n: int | None = None, start: int = 0) -> list[Snippet]:
    """``n`` corpus functions from position ``start`` (all of them by default)."""
    names = CORPUS_NAMES[start:] if n is None else CORPUS_NAMES[start : start + n]
    return [Snippet(f"{m}.{f}", stdlib_function(m, f)) for m, f in names]


def exact_edit(text: str) -> str:
    """CRLF line endings, trailing spaces, trailing blank lines: equal after normalization."""
    return "\r\n".join(line + "   " for line in text.split("\n")) + "\r\n\r\n"


def whitespace_edit(text: str) -> str:
    """Trailing spaces on every third line and a blank line after the first: same words,
    another digest."""
    lines = [line + ("  " if i % 3 == 0 else "") for i, line in enumerate(text.split("\n"))]
    lines.insert(1, "")
    return "\n".join(lines)


def comment_edit(text: str) -> str:
    """A reviewer's comment line after the signature."""
    lines = text.split("\n")
    indent = re.match(r"\s*", lines[1]).group(0) if len(lines) > 1 else "    "  # type: ignore[union-attr]
    lines.insert(1, indent + "# NOTE: kept as is for backwards compatibility.")
    return "\n".join(lines)


def rename_edit(text: str) -> str:
    """The function renamed, and its first parameter other than self/cls, everywhere."""
    match = re.search(r"def (\w+)\(([^)]*)\)", text)
    if match is None:
        raise ValueError("no function definition")
    name = match.group(1)
    params = [p.split("=")[0].split(":")[0].strip().lstrip("*")
              for p in match.group(2).split(",")]
    text = re.sub(rf"\b{name}\b", f"{name}_v2", text)
    params = [p for p in params if p and p not in ("self", "cls")]
    if params:
        text = re.sub(rf"\b{params[0]}\b", f"{params[0]}_arg", text)
    return text


EDITS: dict[str, Callable[[str], str]] = {
    "exact": exact_edit,
    "whitespace": whitespace_edit,
    "comment": comment_edit,
    "rename": rename_edit,
}
"""The planted copies, by name."""

EXPECTED_REASONS: dict[str, frozenset[str]] = {
    "exact": frozenset({"exact_duplicate"}),
    "whitespace": frozenset({"near_duplicate"}),
    "comment": frozenset({"near_duplicate", "semantic_duplicate"}),
    "rename": frozenset({"near_duplicate", "semantic_duplicate"}),
}
"""Which layer may catch each planted edit: exact digest, MinHash, or the model."""


def raw_event(event_id: str, content: str, *, label: str = "python", kind: str = "CODE",
              source: str = "stdlib") -> RawEvent:
    """A RawEvent of real content."""
    return RawEvent(id=event_id, source=source, kind=kind,  # type: ignore[typeddict-item]
                    language="python" if kind == "CODE" else "en", label=label,
                    content=content, timestamp=int(time.time() * 1000), attributes={})


@dataclass(frozen=True)
class Planted:
    """A planted copy: its id, which edit made it, and the id of its original."""

    id: str
    edit: str
    original: str


def plant(originals: Iterable[tuple[str, str]], edits: Iterable[str], prefix: str = "copy"
          ) -> list[tuple[Planted, str]]:
    """One copy per (original id, text) and edit: (what was planted, its content)."""
    chosen = list(edits)
    return [(Planted(f"{prefix}-{edit}-{oid}", edit, oid), EDITS[edit](text))
            for oid, text in originals for edit in chosen]


# -- settings and processes ------------------------------------------------------------------


def unique_id() -> str:
    """A short unique suffix for topic names, app ids and Redis namespaces."""
    return uuid.uuid4().hex[:10]


def isolated(settings: Settings, *, partitions: int = 2, create: bool = True,
             **sections: Mapping[str, Any]) -> Settings:
    """``settings`` with this test's own topics, Faust app id (consumer group) and Redis
    namespace; small micro-batches; ``sections`` update other sub-settings
    (``balance={"batch_size": 16}``). Creates the topics unless ``create`` is False."""
    uid = unique_id()
    names: dict[str, Any] = {role: f"{role}-{uid}" for role in settings.topics.all()}
    update: dict[str, Any] = {
        "app_id": f"t{uid}",
        "topics": settings.topics.model_copy(update={**names, "partitions": partitions}),
        "redis": settings.redis.model_copy(update={"namespace": uid,
                                                    **sections.pop("redis", {})}),
        "ingest": settings.ingest.model_copy(update={
            "batch_size": 32, "batch_within_s": 0.5, **sections.pop("ingest", {})}),
        "dedup": settings.dedup.model_copy(update={
            "batch_size": 8, "batch_within_s": 0.5,
            **sections.pop("dedup", {})}),
    }
    for name, values in sections.items():
        update[name] = getattr(settings, name).model_copy(update=dict(values))
    result = settings.model_copy(update=update)
    if create:
        ensure_topics(result.kafka, result.topics)
    return result


def worker_env(settings: Settings) -> dict[str, str]:
    """This process's environment without its own SLUICE_* variables, plus ``settings_env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    base.setdefault("HF_HUB_OFFLINE", "1")
    base.setdefault("TRANSFORMERS_OFFLINE", "1")
    base.setdefault("TOKENIZERS_PARALLELISM", "false")
    return base | settings_env(settings)


def _sluice_command() -> list[str]:
    script = Path(sys.executable).parent / "sluice"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sluice.cli"]


@dataclass
class WorkerProcess:
    """A ``sluice worker`` subprocess with its own state folder and log file."""

    settings: Settings
    agents: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start it (returns at once: the model and the group join take a while); its log
        level is ``SLUICETEST_LOGLEVEL`` (default info; debug shows every fetch)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Faust creates <state_dir>/faust without parents: the folder must exist.
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*_sluice_command(), "worker", "--agents", self.agents, "--loglevel",
                 os.environ.get("SLUICETEST_LOGLEVEL", "info"), "--web-port", str(free_port())],
                env=worker_env(self.settings), cwd=REPO_ROOT, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, no goodbye to the group."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        """The end of its log, for assertion messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def workers(settings: Settings, agents: str, folder: Path, count: int = 1
            ) -> Iterator[list[WorkerProcess]]:
    """``count`` workers of ``agents``, each with its own state folder; always stopped."""
    started = []
    try:
        for n in range(count):
            own = settings.model_copy(update={"state_dir": folder / f"worker{n}"})
            started.append(WorkerProcess(own, agents, folder / f"worker{n}.log").start())
        yield started
    finally:
        for worker in started:
            worker.stop()


def group_state(settings: Settings) -> tuple[str, int]:
    """The state of the workers' consumer group (``settings.app_id``) and its member count."""
    # kafka-python warns that it cannot decode Faust's own assignor metadata: harmless.
    logging.getLogger("kafka.admin").setLevel(logging.ERROR)
    admin = KafkaAdminClient(**kafka_client_options(settings.kafka), request_timeout_ms=10000)
    try:
        info = admin.describe_groups([settings.app_id])[settings.app_id]
    except KafkaError:
        return "Unknown", 0
    finally:
        admin.close()
    return str(info.get("group_state") or info.get("state")), len(info.get("members") or [])


def wait_for_group(settings: Settings, members: int, started: Iterable[WorkerProcess],
                   timeout_s: float = 180.0) -> None:
    """Wait until ``members`` workers have joined the group and it is stable (the model is
    loaded and partitions are assigned); AssertionError with the workers' logs if not."""
    chosen = list(started)
    deadline = time.monotonic() + timeout_s
    state = ("Unknown", 0)
    while time.monotonic() < deadline:
        state = group_state(settings)
        if state == ("Stable", members):
            return
        if not all(w.alive for w in chosen):
            break
        time.sleep(1.0)
    logs = "\n\n".join(f"--- {w.log_path.name}:\n{w.log_tail()}" for w in chosen)
    raise AssertionError(f"group {settings.app_id} is {state}, not (Stable, {members}):\n{logs}")


def produce(settings: Settings, events: Iterable[RawEvent]) -> list[str]:
    """Send the events to raw-events and wait until Kafka has them; returns their ids."""
    ids = []
    with EventProducer(settings.kafka, settings.topics) as producer:
        for event in events:
            producer.send(event)
            ids.append(event["id"])
    return ids


# -- reading outcomes back -------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One message read from a sluice topic: its role, decoded record and coordinates."""

    role: str
    record: dict[str, Any]
    partition: int
    offset: int

    @property
    def id(self) -> str:
        return str(self.record.get("id", self.record.get("batch_id")))

    @property
    def rejected(self) -> bool:
        return self.role == "rejected"

    @property
    def reason(self) -> str | None:
        return self.record["reason"] if self.rejected else None

    @property
    def decision(self) -> tuple[str, str | None, str | None]:
        """What must not change on a replay: kept/rejected, reason, duplicate_of."""
        if self.rejected:
            return ("rejected", self.record["reason"], self.record["duplicate_of"])
        return ("kept", None, None)


@dataclass
class OutcomeReader:
    """Reads some sluice topics from the beginning, decoding as it goes.

    ``roles`` name ``TopicSettings`` roles: ``samples`` and ``rejected`` hold the outcomes
    of ingest + dedup; ``candidates`` those of ingest alone; ``batches`` the balance output.
    """

    settings: Settings
    roles: tuple[str, ...] = ("samples", "rejected")
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._consumer = KafkaConsumer(**kafka_client_options(self.settings.kafka), group_id=None,
                                       enable_auto_commit=False)
        topics = self.settings.topics.all()
        self._role_of = {topics[role]: role for role in self.roles}
        tps = []
        for topic in self._role_of:
            partitions = self._consumer.partitions_for_topic(topic) or set()
            tps += [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning()

    def poll(self, timeout_ms: int = 500) -> list[Seen]:
        """Whatever arrived since the last poll (also appended to ``seen``)."""
        new = []
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            for message in records:
                role = self._role_of[message.topic]
                try:
                    record = decode(message.value, TOPIC_RECORDS[role])
                except DecodeError:  # poison a test wrote to the topic, not an outcome
                    continue
                new.append(Seen(role, record, message.partition, message.offset))
        self.seen.extend(new)
        return new

    def by_id(self, roles: Iterable[str] | None = None) -> dict[str, list[Seen]]:
        """Everything seen so far, grouped by record id (batch id for batches)."""
        wanted = set(roles or self.roles)
        out: dict[str, list[Seen]] = {}
        for item in self.seen:
            if item.role in wanted:
                out.setdefault(item.id, []).append(item)
        return out

    def wait_for(self, ids: Iterable[str], timeout_s: float = 90.0,
                 roles: Iterable[str] = ("samples", "rejected"),
                 alive: Callable[[], bool] | None = None) -> dict[str, list[Seen]]:
        """Poll until every id has an outcome in ``roles`` or the time is up (or ``alive``
        says the workers are gone); returns the outcomes of those ids."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if wanted <= set(self.by_id(roles)):
                break
            if alive is not None and not alive():
                break
        found = self.by_id(roles)
        return {i: found[i] for i in wanted if i in found}

    def wait_until(self, predicate: Callable[[OutcomeReader], bool],
                   timeout_s: float = 90.0) -> bool:
        """Poll until ``predicate(self)`` holds or the time is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if predicate(self):
                return True
        return predicate(self)

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> OutcomeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def one_decision(outcomes: Mapping[str, list[Seen]]) -> dict[str, tuple[str, str | None,
                                                                         str | None]]:
    """The single decision of each id; AssertionError naming the ids a replay changed."""
    changed = {i: {s.decision for s in seen} for i, seen in outcomes.items()
               if len({s.decision for s in seen}) > 1}
    assert not changed, f"a replay changed outcomes: {changed}"
    return {i: seen[0].decision for i, seen in outcomes.items()}


def missing(ids: Iterable[str], outcomes: Mapping[str, Any]) -> list[str]:
    """The ids without an outcome, sorted."""
    return sorted(set(ids) - set(outcomes))


# -- chaos: private stacks, hard kills, steady producers, accounting --------------------------

CHAOS_EDITS: tuple[str, ...] = ("exact", "whitespace", "comment")
"""Edits whose copies of one original are all copies of each other too (cliques: the race
test in test_pipeline.py relies on the same), so at most one member of each group may
ever be admitted, whoever decides first. The rename edit is left out: a rename and a
comment copy of one function are not always within the threshold of each other."""


@contextlib.contextmanager
def private_stack(session: Settings, folder: Path, *, kafka: bool
                  ) -> Iterator[tuple[Settings, Stack]]:
    """A stack of this test's own from the project's stack code (``sluice.stack.Stack``),
    so stopping or killing it disturbs no other test: Kafka and Redis both on fresh ports
    when ``kafka``, else only a Redis of its own beside the session's Kafka. Append-only
    Redis, as ``sluice up`` runs it. Yields (settings, the ``Stack``); always stopped."""
    ports: dict[str, int] = {"redis_port": free_port()}
    if kafka:
        ports |= {"kafka_port": free_port(), "controller_port": free_port()}
    stack = session.stack.model_copy(update=ports)
    update: dict[str, Any] = {
        "state_dir": folder / "stack",
        "stack": stack,
        "redis": session.redis.model_copy(update={"url": f"redis://127.0.0.1:{stack.redis_port}/0"}),
    }
    if kafka:
        update["kafka"] = session.kafka.model_copy(
            update={"bootstrap_servers": f"127.0.0.1:{stack.kafka_port}"})
    settings = session.model_copy(update=update)
    own = Stack(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        if kafka:
            own.up()
        else:
            own.redis.start()
        yield settings, own
    finally:
        own.down()


def kill9(component: Any, timeout_s: float = 10.0) -> int:
    """SIGKILL one server of a ``Stack`` (``stack.redis`` or ``stack.kafka``): a crash with
    no shutdown, no last fsync. Waits until it is gone and reaps it; returns its pid."""
    pid = component.pid()
    if pid is None:
        raise AssertionError(f"{component.name} is not running")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while component.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    # The stack started it as a child of this process: reap it, or it lingers as a zombie.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    component.pid_file.unlink(missing_ok=True)
    return int(pid)


class SteadyProducer:
    """Sends events to raw-events at a steady rate from a thread (the product's own
    ``EventProducer``), as a live source does while the test kills things around it.
    ``sent`` holds the ids Kafka acknowledged (it flushes every ``flush_every`` events)."""

    def __init__(self, settings: Settings, events: Iterable[RawEvent], rate: float,
                 flush_every: int = 8) -> None:
        self.settings = settings
        self.events = list(events)
        self.rate = rate
        self.flush_every = flush_every
        self.sent: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-producer", daemon=True)

    def start(self) -> SteadyProducer:
        self._thread.start()
        return self

    def _run(self) -> None:
        queued: list[str] = []
        try:
            with EventProducer(self.settings.kafka, self.settings.topics,
                               rate=self.rate) as producer:
                for event in self.events:
                    if self._stop.is_set():
                        break
                    producer.send(event)
                    queued.append(event["id"])
                    if len(queued) >= self.flush_every:
                        producer.flush()
                        self.sent += queued
                        queued = []
                producer.flush()
                self.sent += queued
        except BaseException as exc:  # reported by join(): a test must see it
            self.error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout_s: float = 300.0) -> list[str]:
        """Wait until every event is sent; the acknowledged ids (raises the thread's error)."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(30.0)
            raise AssertionError(f"producer still sending after {timeout_s} s "
                                 f"({len(self.sent)} of {len(self.events)} acknowledged)")
        if self.error is not None:
            raise AssertionError(f"producer failed after {len(self.sent)} events: "
                                 f"{self.error!r}") from self.error
        return list(self.sent)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60.0)


def vset_members(client: Any, namespace: str) -> set[str]:
    """Every id in the namespace's vector set (``VRANDMEMBER`` with a count ≥ its size
    returns each member once)."""
    key = vset_key(namespace)
    size = int(client.execute_command("VCARD", key) or 0)
    if not size:
        return set()
    members = client.execute_command("VRANDMEMBER", key, size) or []
    return {m.decode() if isinstance(m, bytes) else str(m) for m in members}


def buffered_ids(client: Any, settings: Settings) -> set[str]:
    """Every id the balance stage has taken into its Redis buffers, over all partitions
    (the ``seen`` hash of ``agents.buffers.ClassBuffers``)."""
    out: set[str] = set()
    for partition in range(settings.topics.partitions):
        buffers = ClassBuffers(client, settings.redis.namespace, partition, 1, 1)
        out |= {k.decode() if isinstance(k, bytes) else k
                for k in client.hkeys(buffers.prefix + ":seen")}
    return out


def wait_for_buffers(client: Any, settings: Settings, samples: Iterable[str],
                     timeout_s: float, idle_s: float = 30.0) -> set[str]:
    """Wait until the balance stage has buffered every sample (it catches up after the
    samples are out), the time is up, or nothing new was buffered for ``idle_s`` (a sample
    that is still missing then was skipped, not delayed); returns what is buffered."""
    wanted = set(samples)
    deadline = time.monotonic() + timeout_s
    buffered = buffered_ids(client, settings)
    progress_at = time.monotonic()
    while not wanted <= buffered and time.monotonic() < deadline:
        if time.monotonic() - progress_at > idle_s:
            break
        time.sleep(1.0)
        now = buffered_ids(client, settings)
        if now != buffered:
            buffered, progress_at = now, time.monotonic()
    return buffered


def chaos_events(prefix: str, n: int | None = None, every: int = 4, seed: int = 0
                 ) -> tuple[list[RawEvent], list[set[str]]]:
    """Small real events for a chaos test: ``n`` corpus functions (all by default) and,
    for every ``every``-th one, its ``CHAOS_EDITS`` copies, shuffled with ``seed`` so a
    copy may come before or after its original and land on another partition. Two
    labels, so the balance stage has classes to mix. Returns (events, groups): each group
    is an original and its copies, of which at most one may ever be admitted."""
    originals = [(f"{prefix}-{s.name}", s.text) for s in corpus(n)]
    planted = plant(originals[::every], CHAOS_EDITS, prefix=f"{prefix}-copy")
    groups: dict[str, set[str]] = {oid: {oid} for oid, _ in originals[::every]}
    for copy, _ in planted:
        groups[copy.original].add(copy.id)
    items = originals + [(p.id, text) for p, text in planted]
    random.Random(seed).shuffle(items)
    events = [raw_event(i, t, label="python" if k % 3 else "tools")
              for k, (i, t) in enumerate(items)]
    return events, list(groups.values())


_LOG_SIGNALS = re.compile(r"ERROR|CRITICAL|Traceback|Exception|Error:|unreachable|"
                          r"[Rr]ebalanc|crash|Killed", re.ASCII)


def log_evidence(started: Iterable[WorkerProcess], lines: int = 25) -> str:
    """For an assertion message: each worker's notable log lines (errors, tracebacks,
    rebalances, store outages; the last ``lines`` of them) and the end of its log."""
    parts = []
    for worker in started:
        try:
            text = worker.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        notable = [line for line in text.splitlines() if _LOG_SIGNALS.search(line)]
        state = "alive" if worker.alive else f"exited {worker.proc.poll() if worker.proc else '-'}"
        parts.append(f"--- {worker.log_path.name} ({state}), notable lines:\n"
                     + "\n".join(notable[-lines:])
                     + f"\n--- {worker.log_path.name}, last lines:\n{worker.log_tail(12)}")
    return "\n".join(parts)


@dataclass
class Accounting:
    """What a chaos run must add up to, from the topics and Redis after the run.

    At-least-once in: a worker that dies before committing re-sends the outcome of what it
    had done, so an id may have several outcome messages, all with the same decision
    (``resent``, counted, allowed). Anything else is a failure: an id without an outcome
    (``lost``), an id whose outcomes disagree (``changed``), two members of one group of
    copies admitted (``groups_doubled``), two admitted samples within the dedup threshold
    of each other (``close_pairs``), a sample missing from the vector set or a member of
    the vector set that is no sample (``vset_missing`` / ``vset_extra``), a sample in two
    batches (``in_two_batches``, with ``reuse_cap`` 1), a batch id re-sent with other
    content (``batch_changed``), a sample the balance stage never buffered
    (``unbuffered``), a batch sample that is no sample (``phantom``).
    """

    produced: list[str]
    outcomes: dict[str, list[Seen]]
    batches: dict[str, list[Seen]]
    vset: set[str]
    buffered: set[str]
    groups: list[set[str]]
    threshold: float

    @property
    def decided(self) -> dict[str, set[tuple[str, str | None, str | None]]]:
        return {i: {s.decision for s in seen} for i, seen in self.outcomes.items()}

    @property
    def samples(self) -> set[str]:
        return {i for i, d in self.decided.items() if ("kept", None, None) in d}

    @property
    def lost(self) -> list[str]:
        return missing(self.produced, self.outcomes)

    @property
    def unexpected(self) -> list[str]:
        return sorted(set(self.outcomes) - set(self.produced))

    @property
    def changed(self) -> dict[str, list[tuple[str, str | None, str | None]]]:
        return {i: sorted(d, key=str) for i, d in self.decided.items() if len(d) > 1}

    @property
    def resent(self) -> dict[str, int]:
        return {i: len(seen) for i, seen in self.outcomes.items() if len(seen) > 1}

    @property
    def groups_doubled(self) -> list[list[str]]:
        return [sorted(g & self.samples) for g in self.groups if len(g & self.samples) > 1]

    @property
    def close_pairs(self) -> list[tuple[str, str, float]]:
        """Pairs of admitted samples at or above the threshold, from their own embeddings
        (float16 on the wire: a margin of 1e-3 keeps rounding from counting)."""
        vectors: dict[str, Any] = {}
        for i in sorted(self.samples):
            record = next(s.record for s in self.outcomes[i] if not s.rejected)
            if record.get("embedding_dim"):
                vectors[i] = decode_embedding(record["embedding"], record["embedding_dim"])
        if len(vectors) < 2:
            return []
        names = list(vectors)
        matrix = np.vstack([vectors[n] for n in names])
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        cos = matrix @ matrix.T
        rows, cols = np.where(np.triu(cos, 1) >= self.threshold + 1e-3)
        return [(names[r], names[c], float(cos[r, c])) for r, c in zip(rows, cols, strict=True)]

    @property
    def vset_missing(self) -> list[str]:
        return sorted(self.samples - self.vset)

    @property
    def vset_extra(self) -> list[str]:
        return sorted(self.vset - self.samples)

    @property
    def batch_changed(self) -> list[str]:
        return sorted(b for b, seen in self.batches.items()
                      if len({s.record["content_digest"] for s in seen}) > 1)

    @property
    def batch_uses(self) -> dict[str, list[str]]:
        """Sample id → the distinct batches it entered."""
        uses: dict[str, list[str]] = {}
        for batch_id, seen in sorted(self.batches.items()):
            for sample in seen[0].record["samples"]:
                uses.setdefault(sample["id"], []).append(batch_id)
        return uses

    @property
    def in_two_batches(self) -> dict[str, list[str]]:
        return {i: b for i, b in self.batch_uses.items() if len(b) > 1}

    @property
    def phantom(self) -> list[str]:
        return sorted(set(self.batch_uses) - self.samples)

    @property
    def unbuffered(self) -> list[str]:
        return sorted(self.samples - self.buffered)

    @property
    def double_admissions(self) -> int:
        """Admissions that should not be: a second member of a group, a second sample of a
        close pair, an id both admitted and rejected."""
        changed_kept = sum(1 for d in self.changed.values() if ("kept", None, None) in d)
        return (sum(len(g) - 1 for g in self.groups_doubled) + len(self.close_pairs)
                + changed_kept)

    def problems(self) -> list[str]:
        """Every broken guarantee, with the ids (empty: all accounted for)."""
        checks: list[tuple[str, Any]] = [
            ("lost (no outcome)", self.lost),
            ("outcomes for ids never produced", self.unexpected),
            ("outcomes that disagree (a replay changed the decision)", self.changed),
            ("groups of copies with more than one admitted", self.groups_doubled),
            ("admitted samples within the threshold of each other", self.close_pairs),
            ("samples missing from the vector set", self.vset_missing),
            ("vector-set members that are no sample", self.vset_extra),
            ("samples in two batches", self.in_two_batches),
            ("batch ids re-sent with other content", self.batch_changed),
            ("batch samples that are no sample", self.phantom),
            ("samples the balance stage never buffered", self.unbuffered),
        ]
        return [f"{what}: {len(found)}: {found}" for what, found in checks if found]

    def summary(self) -> str:
        """One line of figures for the report."""
        resent = self.resent
        return (f"produced {len(self.produced)}, with an outcome "
                f"{len(set(self.produced) & set(self.outcomes))} (samples {len(self.samples)}, "
                f"rejected {len(set(self.outcomes) - self.samples)}), outcome messages re-sent "
                f"{sum(resent.values()) - len(resent)} for {len(resent)} ids, double "
                f"admissions {self.double_admissions}, lost {len(self.lost)}; vector set "
                f"{len(self.vset)}; {len(self.batches)} batches, samples in two batches "
                f"{len(self.in_two_batches)}, unbuffered {len(self.unbuffered)}")
