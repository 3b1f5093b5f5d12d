"""The code fuzzy layer on a real Redis: the same index class as the word layer, shingling
identifier-normalized token streams of CODE records under its own keys."""

from __future__ import annotations

import builtins
import io
import json
import keyword
import sysconfig
import threading
import tokenize
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agents.code_tokens import CodeDoc
from agents.config import CodeFuzzySettings
from agents.fuzzy_index import FuzzyError, FuzzyIndex
from agents.near_match import FuzzyDecision, Stored
from agents.pipeline import build_pipeline
from agents.shingling import CODE_TOKENS, WORDS
from agents.step import Coords, Item, Outcome
from sluice.settings import Settings, load_settings
from streams.connections import redis_client

pytestmark = pytest.mark.integration

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE = CodeFuzzySettings()
KEEP = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls"}


def distinct_modules(count: int, skip: int = 0) -> list[tuple[str, str]]:
    """Top-level stdlib modules of 4-20 kB: real code, no two copies of each other."""
    out = []
    for path in sorted(STDLIB.glob("*.py"))[skip:]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if 4000 < len(text) < 20_000:
            out.append((path.stem, text))
        if len(out) == count:
            break
    return out


def renamed_and_stripped(text: str) -> str:
    """Every name the module defines or uses renamed (keywords and builtins kept), comments
    and docstrings dropped, layout rewritten: Python's own tokenizer, not pygments."""
    names: dict[str, str] = {}
    out: list[tuple[int, str]] = []
    statement_start = True
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        kind, value = tok.type, tok.string
        if kind == tokenize.COMMENT:
            continue
        if kind == tokenize.STRING and statement_start:
            continue  # a string statement: a docstring
        if kind == tokenize.NAME and value not in KEEP:
            value = names.setdefault(value, f"n{len(names)}")
        out.append((kind, value))
        if kind not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            statement_start = kind == tokenize.NEWLINE
    return tokenize.untokenize(out)


def event(item_id: str, text: str, kind: str = "CODE", language: str | None = "python"
          ) -> dict[str, Any]:
    return {"id": item_id, "source": f"test/{item_id}.py", "kind": kind, "language": language,
            "label": "python", "content": text}


def run(pipeline: Any, events: list[dict[str, Any]]) -> list[Outcome]:
    items = [Item(json.dumps(e).encode(), Coords("raw-events", 0, k))
             for k, e in enumerate(events)]
    return list(pipeline.run(items))


@pytest.fixture
def client(stack: Settings) -> Iterator[redis.Redis]:
    conn = redis_client(stack.redis)
    yield conn
    conn.close()


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    name = uuid.uuid4().hex
    yield name
    for pattern in (f"sluice:{name}:*", f"sluice:{{{name}:*"):
        for key in client.scan_iter(match=pattern):
            client.unlink(key)


@pytest.fixture
def pipeline(client: redis.Redis, namespace: str) -> Any:
    settings = load_settings(dedup={"enabled": False})
    return build_pipeline(settings, client, stages=["ingest"], namespace=namespace)


def test_the_edit_defeats_the_word_layer_but_not_the_code_layer() -> None:
    from agents.minhash import MinHasher, jaccard

    (_, text), = distinct_modules(1)
    copy = renamed_and_stripped(text)
    compile(copy, "copy", "exec")  # still Python
    words = MinHasher(128, 5)
    a, b = words.signature(text), words.signature(copy)
    assert a is not None and b is not None and jaccard(a, b) < 0.5


def test_renamed_stripped_copy_is_rejected_by_code_tokens(pipeline: Any) -> None:
    originals = distinct_modules(6)
    events = [event(name, text) for name, text in originals]
    events += [event(f"copy-{name}", renamed_and_stripped(text)) for name, text in originals]
    outcomes = run(pipeline, events)
    assert [o.rejected for o in outcomes] == [False] * 6 + [True] * 6
    for (name, _), outcome in zip(originals, outcomes[6:], strict=True):
        record = outcome.record
        assert (record["reason"], record["stage"]) == ("near_duplicate", "fuzzy")
        assert record["detail"].startswith("code-tokens: estimated Jaccard ")
        assert record["duplicate_of"] == name
        assert record["similarity"] >= CODE.threshold
    assert [s.name for s in pipeline.steps][-2:] == ["fuzzy", "fuzzy_code"]
    assert pipeline.steps[-1].counters["rejected.near_duplicate"] == 6


def test_distinct_files_all_pass(pipeline: Any) -> None:
    outcomes = run(pipeline, [event(name, text) for name, text in distinct_modules(40)])
    assert [o.reason for o in outcomes] == [None] * 40


def test_replay_is_idempotent(pipeline: Any, client: redis.Redis, namespace: str) -> None:
    originals = distinct_modules(4)
    events = [event(name, text) for name, text in originals]
    events.append(event("copy", renamed_and_stripped(originals[0][1])))
    first = run(pipeline, events)
    index = FuzzyIndex(client, namespace, CODE, shingling=CODE_TOKENS)
    size = len(index)
    again = run(pipeline, events)
    assert [o.reason for o in again] == [o.reason for o in first] == [None] * 4 + [
        "near_duplicate"]
    assert again[-1].record["duplicate_of"] == first[-1].record["duplicate_of"]
    assert len(index) == size == 4
    docs = [(name, CodeDoc(text, "python")) for name, text in originals]
    assert [d.outcome for d in index.check_and_insert(docs)] == ["replayed"] * 4


def test_text_records_skip_the_code_layer(client: redis.Redis, namespace: str) -> None:
    # Text quality rules loosened so that code sent as TEXT passes them: only the kind
    # differs between the two copies below.
    loose = {"max_symbol_word_ratio": 100.0, "min_mean_word_length": 0.0,
             "max_mean_word_length": 100.0, "max_duplicate_line_fraction": 1.0}
    settings = load_settings(dedup={"enabled": False}, ingest={"text": loose})
    pipeline = build_pipeline(settings, client, stages=["ingest"], namespace=namespace)
    (name, text), = distinct_modules(1)
    copy = renamed_and_stripped(text)
    # The same copy as CODE is a code-tokens duplicate (the test above); as TEXT it is not.
    outcomes = run(pipeline, [event(name, text), event("as-text", copy, "TEXT", None)])
    assert [o.reason for o in outcomes] == [None, None]
    code_step = pipeline.steps[-1]
    assert code_step.counters["in"] == 2 and code_step.counters["out"] == 2
    index = FuzzyIndex(client, namespace, CODE, shingling=CODE_TOKENS)
    assert len(index) == 1 and "as-text" not in index


def test_layers_keep_separate_indexes(client: redis.Redis, namespace: str) -> None:
    words = FuzzyIndex(client, namespace, CODE, shingling=WORDS)
    code = FuzzyIndex(client, namespace, CODE, shingling=CODE_TOKENS)
    assert words.prefix != code.prefix
    (name, text), = distinct_modules(1)
    code.check_and_insert([(name, CodeDoc(text, "python"))])
    assert name in code and name not in words
    with pytest.raises(FuzzyError, match="shingle_tokens=10"):
        FuzzyIndex(client, namespace, CodeFuzzySettings(shingle_tokens=8),
                   shingling=CODE_TOKENS)


def test_files_with_less_than_a_shingle_of_code_are_skipped(client: redis.Redis,
                                                            namespace: str) -> None:
    index = FuzzyIndex(client, namespace, CODE, shingling=CODE_TOKENS)
    docs = ["// Package a documents one thing.\npackage a\n",
            "/* Package b: another text entirely, also only docs. */\npackage b\n"]
    decisions = index.check_and_insert([(f"doc{k}", CodeDoc(d, "go"))
                                        for k, d in enumerate(docs)])
    assert [d.outcome for d in decisions] == ["skipped", "skipped"]
    assert len(index) == 0


class _Interleaved(FuzzyIndex):
    """Runs another worker's whole batch between this one's check and its insert."""

    other: tuple[FuzzyIndex, list[tuple[str, CodeDoc]]] | None = None

    def _fetch(self, ids: set[str]) -> dict[str, Stored]:
        if self.other is not None:
            worker, batch = self.other
            self.other = None
            assert worker.check_and_insert(batch)[0].outcome == "admitted"
        return super()._fetch(ids)


def test_race_of_two_near_copies_admits_one(client: redis.Redis, namespace: str) -> None:
    (_, text), = distinct_modules(1)
    late = _Interleaved(client, namespace, CODE, shingling=CODE_TOKENS)
    early = FuzzyIndex(client, namespace, CODE, shingling=CODE_TOKENS)
    late.other = (early, [("early", CodeDoc(text, "python"))])
    decision, = late.check_and_insert([("late", CodeDoc(renamed_and_stripped(text),
                                                        "python"))])
    assert not decision.keep and decision.duplicate_of == "early"
    assert "late" not in late and len(late) == 1


def test_concurrent_workers_never_admit_both_copies(stack: Settings, namespace: str) -> None:
    files = distinct_modules(12)
    sides = [[(f"orig-{n}", CodeDoc(t, "python")) for n, t in files],
             [(f"copy-{n}", CodeDoc(renamed_and_stripped(t), "python")) for n, t in files]]
    workers = [FuzzyIndex(redis_client(stack.redis), namespace, CODE, shingling=CODE_TOKENS)
               for _ in range(2)]
    start = threading.Barrier(2)
    results: dict[int, list[FuzzyDecision]] = {0: [], 1: []}

    def work(w: int) -> None:
        start.wait()
        for i in range(0, len(files), 3):
            results[w].extend(workers[w].check_and_insert(sides[w][i : i + 3]))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    kept = [(a.keep, b.keep) for a, b in zip(results[0], results[1], strict=True)]
    assert all(a != b for a, b in kept), kept  # exactly one of each pair admitted
    assert len(workers[0]) == len(files)
