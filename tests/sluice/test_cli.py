"""The command line against the session stack: produce (API and CLI), tail, status, errors.

Each test writes to topics of its own (fresh names set in a copy of the settings), so tests
sharing the session broker never read each other's records.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from kafka import KafkaProducer
from rich.console import Console

from sluice.cli import cli
from sluice.produce import produce_paths
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.serde import decode_raw_event, encode
from streams.sources import event_id
from tests.conftest import stack_settings
from tests.streams.kafka_io import consume_all, create_topic

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# 29 small, real modules of the standard library, plus real text, a real shared library
# (binary) and a real module over the size limit below.
STDLIB_FILES = [
    "abc.py", "bisect.py", "bz2.py", "cProfile.py", "chunk.py", "cmd.py", "code.py",
    "codeop.py", "colorsys.py", "contextvars.py", "copy.py", "copyreg.py", "crypt.py",
    "csv.py", "filecmp.py", "fileinput.py", "fnmatch.py", "genericpath.py", "getopt.py",
    "getpass.py", "glob.py", "graphlib.py", "hashlib.py", "hmac.py", "keyword.py",
    "linecache.py", "reprlib.py", "sched.py", "shlex.py",
]
MAX_FILE_BYTES = 64_000  # _pydecimal.py (~230 KB) is over it, every module above under it

REVIEWS = [
    {"id": "r-1", "content": "Sturdy and light; the hinge still works after a year.",
     "label": "positive", "kind": "text"},
    {"content": "Stopped charging after two weeks and support never answered.",
     "label": "negative", "attributes": {"stars": "1"}},
    {"id": "r-3", "kind": "Code", "content": "print('hello from a JSONL line')\n",
     "label": "python", "language": "python"},
]
# A corpus whose class is in another field (``--label-field category``).
TICKETS = [
    {"id": "t-1", "content": "The export button does nothing in Firefox.", "category": "bug"},
    {"content": "Please add a dark theme to the settings page.", "category": "feature"},
    {"id": "t-3", "content": "How do I reset my password?", "category": "question"},
]


@dataclass(frozen=True)
class Corpus:
    folder: Path
    jsonl: Path
    tickets: Path
    kept: list[Path]       # the files that become events, in walk order
    binary: Path
    oversized: Path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "files"
    folder.mkdir()
    for name in STDLIB_FILES:
        shutil.copy(STDLIB / name, folder / name)
    shutil.copy(STDLIB / "LICENSE.txt", folder / "LICENSE.txt")
    shutil.copy(STDLIB / "base64.py", folder / "b64tool")  # "#! /usr/bin/env python3"
    (folder / "deploy").write_text("#!/bin/bash\nset -euo pipefail\nrsync -a build/ host:/srv/\n")
    (folder / "README.md").write_text("# Corpus\n\nA few real files for the produce tests.\n")
    binary = folder / "_bisect.so"
    shutil.copy(next((STDLIB / "lib-dynload").glob("_bisect.*.so")), binary)
    oversized = folder / "_pydecimal.py"
    shutil.copy(STDLIB / "_pydecimal.py", oversized)
    assert oversized.stat().st_size > MAX_FILE_BYTES
    jsonl = root / "reviews.jsonl.gz"
    lines = [json.dumps(r) for r in REVIEWS] + [
        '{"content": "truncated line',                      # invalid_json
        '{"content": 5}',                                   # invalid_field: wrong type
        '{"content": "An extra column.", "stars": 4}',      # kept: extra column → attribute
    ]
    jsonl.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    tickets = root / "tickets.jsonl"
    tickets.write_text("".join(json.dumps(t) + "\n" for t in TICKETS))
    kept = sorted(p for p in folder.iterdir() if p not in (binary, oversized))
    return Corpus(folder, jsonl, tickets, kept, binary, oversized)


def _with(settings: Settings, section: str, **values: Any) -> Settings:
    part = getattr(settings, section).model_copy(update=values)
    return settings.model_copy(update={section: part})


def _in_order_per_partition(records: list[Any], expected_keys: list[bytes]) -> None:
    """Within each partition, the keys arrive in the order they were sent."""
    position = {key: i for i, key in enumerate(expected_keys)}
    by_partition: dict[int, list[int]] = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(position[r.key])
    for partition, order in by_partition.items():
        assert order == sorted(order), f"partition {partition} is out of input order"
    assert len(by_partition) > 1  # hash partitioning spread them (else order is trivial)


@pytest.mark.integration
def test_produce_paths_sends_files_and_jsonl(stack: Settings, corpus: Corpus) -> None:
    settings = _with(stack, "produce", max_file_bytes=MAX_FILE_BYTES)
    topic = create_topic(settings, "produce-api", partitions=3)
    out = io.StringIO()
    stats = produce_paths(settings, [corpus.folder, corpus.jsonl], topic=topic,
                          console=Console(file=out, width=120))
    extra_id = event_id(f"{corpus.jsonl}:{len(REVIEWS) + 3}")
    jsonl_ids = ["r-1", event_id(f"{corpus.jsonl}:2"), "r-3"]
    expected = [event_id(str(p)) for p in corpus.kept] + [*jsonl_ids, extra_id]
    assert stats.events == len(expected) == len(STDLIB_FILES) + 4 + 4

    records = consume_all(settings, topic, len(expected))
    assert sorted(r.key for r in records) == sorted(k.encode() for k in expected)
    _in_order_per_partition(records, [k.encode() for k in expected])
    events = {r.key.decode(): decode_raw_event(r.value, 1 << 20) for r in records}
    assert all(e["id"] == key for key, e in events.items())

    def by_name(name: str) -> dict[str, Any]:
        return dict(events[event_id(str(corpus.folder / name))])

    assert by_name("bisect.py")["content"] == (STDLIB / "bisect.py").read_text()
    labels = {name: (by_name(name)["label"], by_name(name)["kind"])
              for name in ("bisect.py", "b64tool", "deploy", "README.md", "LICENSE.txt")}
    assert labels == {"bisect.py": ("python", "CODE"), "b64tool": ("python", "CODE"),
                      "deploy": ("shell", "CODE"), "README.md": ("markdown", "TEXT"),
                      "LICENSE.txt": ("text", "TEXT")}
    assert event_id(str(corpus.binary)) not in events
    assert event_id(str(corpus.oversized)) not in events
    assert [events[i]["label"] for i in jsonl_ids] == ["positive", "negative", "python"]
    assert [events[i]["kind"] for i in jsonl_ids] == ["TEXT", "TEXT", "CODE"]
    assert events[jsonl_ids[1]]["attributes"] == {"stars": "1"}
    assert events[extra_id]["attributes"] == {"stars": "4"}

    summary = " ".join(out.getvalue().split())
    for line in (f"events {len(expected)}", "skipped: binary 1", "skipped: too_large 1",
                 "bad JSONL lines: invalid_json 1", "bad JSONL lines: invalid_field 1",
                 f"sent to {topic}"):
        assert line in summary, summary


@pytest.mark.integration
def test_cli_produce_with_label_field_and_limit(stack: Settings, corpus: Corpus) -> None:
    topic = create_topic(stack, "produce-cli")
    result = CliRunner().invoke(
        cli, ["produce", str(corpus.tickets), "--topic", topic, "--label-field", "category"],
        obj=stack)
    assert result.exit_code == 0, result.output
    records = consume_all(stack, topic, 3)
    got = [(r.key.decode(), decode_raw_event(r.value, 1 << 20)["label"]) for r in records]
    assert got == [("t-1", "bug"), (event_id(f"{corpus.tickets}:2"), "feature"),
                   ("t-3", "question")]
    assert "events 3" in " ".join(result.stderr.split())

    limited = create_topic(stack, "produce-limit")
    result = CliRunner().invoke(cli, ["produce", str(corpus.folder), "--topic", limited,
                                      "--limit", "5", "--rate", "500"], obj=stack)
    assert result.exit_code == 0, result.output
    assert len(consume_all(stack, limited, 5, timeout_s=5)) == 5


# --- tail ----------------------------------------------------------------------------------

def _sample(i: int) -> dict[str, Any]:
    vector = np.linspace(-1.0, 1.0, 384) * (i + 1)
    vector = np.roll(vector, i) / np.linalg.norm(vector)
    content = f"def handler_{i}(event):\n    return event['body']\n"
    return {"id": f"sample-{i}", "source": f"svc/handler_{i}.py", "kind": "CODE",
            "language": "python", "label": "python", "content": content,
            "timestamp": 1767225600000 + i, "attributes": {}, "digest": f"{i:064x}",
            "quality_score": 0.9, "embedding": vector.astype("<f2").tobytes(),
            "embedding_dim": 384, "model": "all-MiniLM-L6-v2", "nearest_similarity": None,
            "admitted_at": 1767225600500 + i}


def _send(settings: Settings, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(**kafka_client_options(settings.kafka), acks="all")
    now = int(time.time() * 1000)
    try:
        for i, (key, value) in enumerate(messages):  # increasing times: tail sorts by them
            producer.send(topic, key=key, value=value, timestamp_ms=now + i)
        producer.flush(timeout=30)
    finally:
        producer.close()


def _tail(settings: Settings, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(cli, ["tail", *args], obj=settings)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.integration
def test_tail_prints_json_lines_with_embeddings_by_size(stack: Settings) -> None:
    topic = create_topic(stack, "samples", partitions=2)
    settings = _with(stack, "topics", samples=topic)
    _send(settings, topic, [(f"sample-{i}".encode(), encode("CuratedSample", _sample(i)))
                            for i in range(5)])
    last = _tail(settings, topic, "-n", "3")
    assert [e["id"] for e in last] == ["sample-2", "sample-3", "sample-4"]
    for entry in last:
        assert entry["embedding"] == "<384 x float16>"
        assert entry["label"] == "python" and entry["nearest_similarity"] is None
        assert {"_partition", "_offset", "_timestamp"} <= set(entry)
    first = _tail(settings, topic, "--from-beginning", "-n", "2")
    assert [e["id"] for e in first] == ["sample-0", "sample-1"]
    assert [e["id"] for e in _tail(settings, topic)] == [f"sample-{i}" for i in range(5)]


@pytest.mark.integration
def test_tail_of_raw_events_shows_bad_records_as_errors(stack: Settings) -> None:
    topic = create_topic(stack, "raw")
    settings = _with(stack, "topics", raw=topic)
    good: dict[str, Any] = {"id": "a", "source": "s", "kind": "TEXT", "language": None,
                            "label": None, "content": "Plain text.", "timestamp": 1,
                            "attributes": {}}
    _send(settings, topic, [(b"a", encode("RawEvent", good)),
                            (b"b", b'{"id": "b", "kind": "code", "content": "x = 1"}'),
                            (b"c", b"\x00\x01 not an event")])
    entries = _tail(settings, topic, "-n", "3")
    assert entries[0]["content"] == "Plain text."
    assert (entries[1]["id"], entries[1]["kind"]) == ("b", "CODE")
    assert entries[2]["_error"] == "undecodable" and entries[2]["_detail"]


@pytest.mark.integration
def test_tail_of_a_foreign_topic_is_one_clear_error(stack: Settings) -> None:
    result = CliRunner().invoke(cli, ["tail", "not-a-sluice-topic"], obj=stack)
    assert result.exit_code == 1
    assert "not a sluice topic" in result.stderr
    assert "Traceback" not in result.output


# --- status, down, settings errors ---------------------------------------------------------

@pytest.mark.integration
def test_status_of_the_running_stack(stack: Settings) -> None:
    result = CliRunner().invoke(cli, ["status"], obj=stack)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[:3] for line in lines[:2]] == [
        ["kafka", "up", stack.bootstrap_servers],
        ["redis", "up", f"127.0.0.1:{stack.stack.redis_port}"]]
    assert lines[2] == f"state  {stack.state_dir}"


def test_down_when_nothing_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["down"], obj=stack_settings(str(tmp_path)))
    assert result.exit_code == 0
    assert result.output.split("\n")[:2] == ["kafka  was not running", "redis  was not running"]


def test_an_invalid_setting_is_one_line_naming_it(tmp_path: Path) -> None:
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(cli, ["status"], env={"SLUICE_DEDUP__THRESHOLD": "2"})
        assert result.exit_code == 1
        assert "dedup.threshold" in result.stderr
        assert "Traceback" not in result.output
        Path("bad.toml").write_text('[balance]\npolicy = "random"\n')
        result = runner.invoke(cli, ["--config", "bad.toml", "status"])
        assert result.exit_code == 1 and "balance.policy" in result.stderr
        result = runner.invoke(cli, ["--config", "missing.toml", "status"])
        assert result.exit_code == 1 and "missing.toml" in result.stderr


def test_the_commands_of_the_design_exist() -> None:
    assert {"up", "down", "status", "produce", "tail", "worker", "dedup"} <= set(cli.commands)
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "produce" in result.output and "tail" in result.output
