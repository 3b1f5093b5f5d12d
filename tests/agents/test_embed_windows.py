"""Recurring windows (licence headers) and the kinds the semantic layer embeds: the memory's
bookkeeping on its own, then the real model on real files with a real licence header, and
the semantic step over the session stack's Redis."""

from __future__ import annotations

import json
import sysconfig
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from agents.config import DedupSettings, IngestSettings
from agents.embed import Embedder
from agents.index import VectorIndex
from agents.semantic import SemanticDedup
from agents.step import Coords, Item
from agents.validate import Validate
from agents.windows import WindowMemory, window_digest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
LICENCE = Path("/usr/share/common-licenses/Apache-2.0").read_text(encoding="utf-8")[:3000]


def _file(name: str, chars: int = 300) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")[:chars]


def test_a_window_is_counted_once_per_record_and_common_at_the_setting() -> None:
    memory = WindowMemory(common_after=3)
    header, body = window_digest("licence"), window_digest("body")
    memory.count([[header, header, body]])  # twice in one record: counted once
    memory.count([[header], [header]])
    assert memory.is_common(header) and not memory.is_common(body)
    assert not WindowMemory(common_after=0).is_common(header)


def test_recurring_windows_are_embedded_once_and_cache_hits_counted() -> None:
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    memory = WindowMemory(common_after=2)
    texts = ["header", "one", "header"]
    digests = [window_digest(t) for t in texts]
    memory.count([[digests[0], digests[1]], [digests[2]]])
    first = memory.vectors(digests, texts, embed)
    assert calls == [["header", "one"]]  # the repeat inside the call is embedded once
    assert first.tolist() == [[6.0, 1.0], [3.0, 1.0], [6.0, 1.0]]
    again = memory.vectors([digests[0]], ["header"], embed)
    assert len(calls) == 1 and again.tolist() == [[6.0, 1.0]]
    assert memory.stats["windows.cache_hits"] == 1
    assert memory.stats["windows.batch_repeats"] == 1
    assert memory.stats["windows.embedded"] == 2


@pytest.fixture(scope="module")
def settings() -> DedupSettings:
    # Short windows so that the header spans several and the test stays fast on a CPU; at
    # 0.9 the shared header alone makes two different functions duplicates (cosine 0.93).
    return DedupSettings(device="cpu", chunk_tokens=64, max_chunks=32, common_window_records=3,
                         threshold=0.9)


def test_a_shared_licence_header_no_longer_makes_two_files_alike(
        settings: DedupSettings) -> None:
    a = LICENCE + "\n" + _file("bisect.py")
    b = LICENCE + "\n" + _file("colorsys.py")
    plain = Embedder(settings.model_copy(update={"common_window_records": 0}))
    before = plain.encode([a, b])
    assert float(before[0] @ before[1]) >= settings.threshold  # the header decides

    embedder = Embedder(settings)
    # Other records carrying the same header: it becomes common.
    embedder.encode([LICENCE + "\n" + _file(name) for name in ("heapq.py", "shlex.py")])
    after = embedder.encode([a, b])
    assert float(after[0] @ after[1]) < settings.threshold
    assert embedder.windows.stats["windows.common_left_out"] > 0
    assert embedder.windows.stats["windows.cache_hits"] > 0  # the header, embedded once
    # A record that is only the header keeps its vector (the mean of all its windows).
    only = embedder.encode([LICENCE])
    assert float(np.linalg.norm(only[0])) == pytest.approx(1.0, abs=1e-5)
    # And the file now looks like its own body (the window that straddles the header's
    # end and the body's start keeps a little of the header).
    body = embedder.encode([_file("bisect.py")])
    assert float(after[0] @ body[0]) > 0.8 > float(before[0] @ body[0])


def _candidate(event_id: str, kind: str, content: str, coords: Coords,
               label: str = "python") -> Item:
    raw = json.dumps({"id": event_id, "source": "test", "kind": kind, "language": label,
                      "label": label if kind == "CODE" else "en", "content": content})
    outcome, = Validate(IngestSettings()).process([Item(raw.encode(), coords)])
    assert not outcome.rejected, outcome
    return Item(outcome.record, coords)


@pytest.mark.integration
def test_kinds_and_classes_left_out_pass_without_the_model(settings: DedupSettings,
                                                client: redis.Redis) -> None:
    code_only = settings.model_copy(update={"kinds": ["CODE"], "skip_labels": ["json"]})
    embedder = Embedder(code_only)
    step = SemanticDedup(code_only, embedder,
                         VectorIndex(client, f"test-{uuid.uuid4().hex}", code_only))
    text = LICENCE[:1500]
    items = [_candidate("code-1", "CODE", _file("bisect.py"), Coords("t", 0, 0)),
             _candidate("text-1", "TEXT", text, Coords("t", 0, 1)),
             _candidate("text-2", "TEXT", text + "\nAnd one more line.", Coords("t", 0, 2)),
             _candidate("code-2", "CODE", _file("bisect.py") + "\n", Coords("t", 0, 3)),
             _candidate("data-1", "CODE", json.dumps({"rows": list(range(200))}, indent=1),
                        Coords("t", 0, 4), label="json")]
    outcomes = step.process(items)
    assert [o.rejected for o in outcomes] == [False, False, False, True, False]
    assert [o.record["embedding_dim"] for o in outcomes[:3]] == [384, 0, 0]
    assert outcomes[4].record["embedding_dim"] == 0
    assert outcomes[3].record["reason"] == "semantic_duplicate"
    # Only the CODE records reached the model (each distinct window once).
    code = [items[0].record["content"], items[3].record["content"]]
    windows = {window_digest(w) for chunks in embedder.chunks(code) for w in chunks}
    assert embedder.windows.stats["windows.embedded"] == len(windows)



@pytest.mark.integration
def test_the_dedup_stage_publishes_the_window_counters(settings: DedupSettings,
                                                       client: redis.Redis) -> None:
    """What the window memory saved reaches the dedup stage's metrics (Prometheus
    ``sluice_windows_*_total``), read under its lock while the executor may write."""
    from agents.filter_agents import publish_windows
    from agents.pipeline import Pipeline
    from streams.metrics import StageMetrics

    embedder = Embedder(settings)
    pipeline = Pipeline([SemanticDedup(settings, embedder,
                                       VectorIndex(client, f"test-{uuid.uuid4().hex}",
                                                   settings))])
    items = [_candidate(f"w{i}", "CODE", LICENCE[:1500] + _file(name), Coords("t", 0, i))
             for i, name in enumerate(("json/decoder.py", "csv.py", "glob.py", "shlex.py"))]
    pipeline.run(items)
    metrics = StageMetrics("dedup")
    publish_windows(metrics, pipeline)
    assert metrics.counters["windows.embedded"] == embedder.windows.stats["windows.embedded"] > 0
    # The licence's windows: embedded once, then repeats or hits; left out once common.
    assert metrics.counters["windows.cache_hits"] + metrics.counters[
        "windows.batch_repeats"] > 0
    assert metrics.counters["windows.common_left_out"] > 0
    publish_windows(metrics, Pipeline([]))  # no semantic step: nothing to publish
