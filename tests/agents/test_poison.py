"""Poison from a foreign client: ``kcat`` (librdkafka, Debian's ``kcat`` package, installed
by ``make install``) writes between good JSON events a tombstone, a JSON nested 3,000 deep,
a 5,000-digit timestamp, random bytes, a JSON array, a 1 MiB key and a 5 MiB key to
raw-events.

A real ``sluice worker --agents ingest`` gives every good event its candidate and every
poison record a rejection that names what was wrong, and is still consuming afterwards.
Before issue 10 the tombstone crashed the agent (``len(None)``), Faust acked the whole
micro-batch, and the big integer crashed it again: none of the events had an outcome.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from agents.step import MAX_RAW_IN_REJECTION, bounded_id
from sluice.settings import Settings
from tests.agents.pipeline_util import (
    OutcomeReader,
    corpus,
    isolated,
    missing,
    produce,
    raw_event,
    wait_for_group,
    workers,
)

pytestmark = pytest.mark.integration

KCAT = shutil.which("kcat") or shutil.which("kafkacat")
WAIT_S = 240.0
# kcat splits its input into messages at RS and each message into key and value at US:
# bytes that no poison below contains.
RS, US = b"\x1e", b"\x1f"
BIG_KEY = "k" * (1024 * 1024)
# A key whose rejection, had it carried the key whole as its id and its own key, would be
# 2 × 5 MiB: over the topic's 8 MiB limit.
HUGE_KEY = "m" * (5 * 1024 * 1024)


def random_bytes(n: int, seed: int = 10) -> bytes:
    """Bytes that are neither JSON nor Avro (no leading { [ or C3) nor kcat delimiters."""
    rng = random.Random(seed)
    data = bytes(b for b in rng.randbytes(2 * n) if b not in (0x1E, 0x1F))[:n]
    return b"\x00" + data[1:]


def poison(content: str) -> list[tuple[str, bytes, str, str]]:
    """(key, value, expected reason, a word the detail must contain); an empty value is
    sent as null (kcat -Z): a tombstone."""
    deep = ('{"content": ' + "[" * 3000 + "]" * 3000 + "}").encode()
    bigint = (json.dumps({"content": content})[:-1] + ', "timestamp": ' + "9" * 5000
              + "}").encode()
    event = json.dumps({"id": "p-under-a-big-key", "content": content}).encode()
    return [
        ("p-tombstone", b"", "invalid:tombstone", "null"),
        ("p-nested", deep, "invalid:invalid_json", "nested"),
        ("p-bigint", bigint, "invalid:invalid_field", "timestamp"),
        ("p-random", random_bytes(2048), "invalid:undecodable", "Avro"),
        ("p-array", json.dumps([{"content": content}]).encode(), "invalid:invalid_json",
         "array"),
        (BIG_KEY, event, "invalid:too_large", "key"),
        (HUGE_KEY, b"\x00not an event", "invalid:too_large", "key"),
    ]


def kcat_produce(settings: Settings, messages: list[tuple[str, bytes]]) -> None:
    """Send (key, value) messages in order with kcat, as a foreign producer would."""
    assert KCAT is not None
    data = RS.join(key.encode() + US + value for key, value in messages)
    assert data.count(US) == len(messages) and data.count(RS) == len(messages) - 1
    done = subprocess.run(
        [KCAT, "-P", "-b", settings.kafka.bootstrap_servers, "-t", settings.topics.raw,
         "-D", r"\x1e", "-K", r"\x1f", "-Z", "-X", "message.max.bytes=8000000"],
        input=data, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")


@pytest.mark.skipif(KCAT is None, reason="kcat is not installed (Debian: apt-get install -y "
                    "kcat; `make install` does it when run as root)")
def test_poison_from_a_foreign_client_is_rejected_and_the_worker_goes_on(
        stack: Settings, tmp_path: Path) -> None:
    settings = isolated(stack, partitions=1)
    snippets = corpus(14, start=0)
    goods = [(f"g-{s.name}", json.dumps({"id": f"g-{s.name}", "kind": "code",
                                         "label": "python", "content": s.text}).encode())
             for s in snippets[:12]]
    bad = poison(snippets[12].text)
    messages: list[tuple[str, bytes]] = []
    for n, good in enumerate(goods):  # good, poison, good, poison, …, good, good
        messages.append(good)
        if n < len(bad):
            messages.append(bad[n][:2])
    expected = {bounded_id(key): (value, reason, word) for key, value, reason, word in bad}
    good_ids = [key for key, _ in goods]
    with workers(settings, "ingest", tmp_path) as [worker], \
            OutcomeReader(settings, ("candidates", "rejected")) as reader:
        wait_for_group(settings, 1, [worker])
        kcat_produce(settings, messages)
        wanted = good_ids + list(expected)
        got = reader.wait_for(wanted, WAIT_S, ("candidates", "rejected"), lambda: worker.alive)
        assert not missing(wanted, got), f"{missing(wanted, got)}\n{worker.log_tail()}"
        # Still consuming: a good event sent afterwards (Avro, sluice's own producer).
        late = produce(settings, [raw_event(f"late-{snippets[13].name}", snippets[13].text)])
        after = reader.wait_for(late, WAIT_S, ("candidates", "rejected"), lambda: worker.alive)
        assert not missing(late, after), worker.log_tail()
        assert worker.alive
        log = worker.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    for event_id in good_ids + late:
        [seen] = (got | after)[event_id]
        assert seen.role == "candidates", (event_id, seen.record)
    for event_id, (value, reason, word) in expected.items():
        [seen] = got[event_id]
        record = seen.record
        assert (record["reason"], record["stage"]) == (reason, "ingest"), record["detail"]
        assert word in record["detail"], (reason, record["detail"])
        assert record["raw"] == (value[:MAX_RAW_IN_REJECTION] if value else None)
        assert len(record["id"].encode()) <= 1024
    print(f"\n[poison] kcat: {len(goods)} good JSON events and {len(bad)} poison records: "
          f"{len(goods)} candidates, {len(bad)} rejections "
          f"({', '.join(sorted({r for _, _, r, _ in bad}))}); still consuming after")
