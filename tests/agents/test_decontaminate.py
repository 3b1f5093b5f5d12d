"""Decontamination: protected documents indexed read-only; exact, near and semantic copies
of one are rejected as ``contaminated`` (and nothing else is), by the real pipeline over
the session Redis with the real model."""

from __future__ import annotations

import io
import json
import keyword
import tokenize
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from agents.config import DecontaminateSettings, DedupSettings
from agents.decontaminate import (
    CONTAMINATED,
    DecontaminateError,
    ProtectedDoc,
    ProtectedStore,
    SharedEncoder,
    load_protected,
)
from agents.embed import Embedder
from agents.exact import ExactClaims
from agents.fuzzy_index import FuzzyIndex
from agents.keys import exact_key, protected_prefix, vset_key
from agents.normalize import content_digest, normalize
from agents.pipeline import build_pipeline
from agents.step import Coords, Item, Outcome
from sluice.cli import cli
from sluice.settings import Settings, load_settings
from streams.metrics import StageMetrics, contaminated
from streams.serde import encode
from tests.agents.pipeline_util import corpus, exact_edit, raw_event, unique_id

# A GSM8K-style item (made up here) and a near paraphrase of it: the same problem in other
# words, cosine 0.950 with all-MiniLM-L6-v2, estimated Jaccard of word 5-shingles 0.02.
PROBLEM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
           "clips in May. How many clips did Natalia sell altogether in April and May? Work "
           "out the answer step by step and give the final number of clips at the end.")
PARAPHRASE = ("During April, Natalia sold clips to 48 friends; in May she sold half of that "
              "amount. Find how many clips Natalia sold in April and May combined, working "
              "through the problem step by step and finishing with the number of clips.")
# Edited: a number changed and a few words added (Jaccard ≈ 0.59, cosine ≈ 0.99).
EDITED = PROBLEM.replace("48", "52").replace("step by step", "carefully, step by step,")
UNRELATED = [
    # Another problem of the same kind (cosine 0.48): not a copy.
    "Tomas bought seven apples at the market on Monday and gave three of them to his sister. "
    "On Tuesday he bought twice as many apples as he had left. How many apples does Tomas "
    "have now after both days?",
    "The river Thames flows through southern England, passing Oxford, Reading and Windsor "
    "before it reaches London and widens into an estuary that opens onto the North Sea.",
    "The mitochondrion is the organelle in which most of the cell's chemical energy is "
    "produced; it converts nutrients into adenosine triphosphate through cellular respiration.",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(DedupSettings(device="cpu"))


@pytest.fixture
def config(stack: Settings) -> Iterator[Settings]:
    """The session settings in a fresh namespace, decontamination on."""
    yield stack.model_copy(update={
        "redis": stack.redis.model_copy(update={"namespace": unique_id()}),
        "decontaminate": DecontaminateSettings(enabled=True)})


def renamed_everywhere(code: str) -> str:
    """Every identifier renamed (``v0``, ``v1``… in order of appearance) and comments
    dropped: few word shingles survive, the normalized code tokens are unchanged."""
    names: dict[str, str] = {}
    out = []
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    for tok in tokens:
        if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
            tok = tok._replace(string=names.setdefault(tok.string, f"v{len(names)}"))
        elif tok.type == tokenize.COMMENT:
            tok = tok._replace(string="")
        out.append(tok)
    return tokenize.untokenize(out)


def protected_docs() -> list[ProtectedDoc]:
    code = corpus(1, start=10)[0]
    return [ProtectedDoc("gsm-1", PROBLEM, "TEXT", "en"),
            ProtectedDoc(f"humaneval-{code.name}", code.text, "CODE", "python")]


def store_of(config: Settings, client: redis.Redis) -> ProtectedStore:
    return ProtectedStore(client, config.redis.namespace, config.decontaminate, config.fuzzy)


def load(config: Settings, client: redis.Redis, embedder: Embedder) -> None:
    done = load_protected(store_of(config, client), protected_docs(), 8, embedder,
                          config.dedup.model)
    assert (done.added, done.already) == (2, 0)


def protected_dump(client: redis.Redis, namespace: str) -> dict[bytes, bytes]:
    """Every protected key and its serialized value."""
    keys = sorted(client.scan_iter(match=f"{protected_prefix(namespace)}*", count=1000))
    return {k: client.dump(k) for k in keys}


def run(config: Settings, client: redis.Redis, embedder: Embedder,
        events: list[tuple[str, str, str]]) -> dict[str, Outcome]:
    """(id, content, kind) events through ingest then dedup; outcome by id."""
    pipeline = build_pipeline(config, client, embedder=embedder)
    values = [encode("RawEvent", raw_event(i, text, kind=kind, label="x"))
              for i, text, kind in events]
    outcomes = pipeline.run([Item(v, Coords("raw", 0, n)) for n, v in enumerate(values)])
    return {i: o for (i, _, _), o in zip(events, outcomes, strict=True)}


def planted() -> list[tuple[str, str, str]]:
    code = protected_docs()[1].content
    others = [(f"other-{s.name}", s.text, "CODE") for s in corpus(6, start=20)]
    return [("exact", exact_edit(PROBLEM), "TEXT"), ("near", EDITED, "TEXT"),
            ("renamed", renamed_everywhere(code), "CODE"), ("paraphrase", PARAPHRASE, "TEXT"),
            *[(f"text-{n}", t, "TEXT") for n, t in enumerate(UNRELATED)], *others]


@pytest.mark.integration
def test_exact_near_and_semantic_copies_are_contaminated_and_nothing_else(
        config: Settings, client: redis.Redis, embedder: Embedder) -> None:
    load(config, client, embedder)
    outcomes = run(config, client, embedder, planted())
    code_id = protected_docs()[1].id
    found = {i: (o.record["duplicate_of"], o.record["detail"].split(":")[0], o.record["stage"])
             for i, o in outcomes.items() if o.reason == CONTAMINATED}
    assert found == {"exact": ("gsm-1", "exact", "ingest"),
                     "near": ("gsm-1", "words", "ingest"),
                     "renamed": (code_id, "code-tokens", "ingest"),
                     "paraphrase": ("gsm-1", "semantic", "dedup")}
    # Nothing else: every unrelated event became a sample.
    assert all(not o.rejected for i, o in outcomes.items() if i not in found), {
        i: o.reason for i, o in outcomes.items() if o.rejected}
    assert outcomes["paraphrase"].record["similarity"] >= 0.9


@pytest.mark.integration
def test_the_pipeline_never_writes_the_protected_indexes_nor_admits_a_copy(
        config: Settings, client: redis.Redis, embedder: Embedder) -> None:
    load(config, client, embedder)
    ns = config.redis.namespace
    before = protected_dump(client, ns)
    assert len(before) > 10  # docs, exact, meta, the vector set and two LSH layouts
    events = planted()
    outcomes = run(config, client, embedder, events)
    assert protected_dump(client, ns) == before
    # A copy caught in ingest took no exact claim and no fuzzy slot; none took a vector.
    words = FuzzyIndex(client, ns, config.fuzzy)
    for event_id, text, _ in events[:3]:
        assert client.get(exact_key(ns, content_digest(normalize(text)))) is None
        assert event_id not in words
    samples = {i for i, o in outcomes.items() if not o.rejected}
    vset = vset_key(ns)
    assert {i for i in samples if client.execute_command("VISMEMBER", vset, i)} == samples
    assert not client.execute_command("VISMEMBER", vset, "paraphrase")
    assert ExactClaims(client, ns).claim([(content_digest(normalize(PROBLEM)), "later")]) == [
        "later"]  # the protected text itself was never claimed by the stream


@pytest.mark.integration
def test_loading_again_is_idempotent(config: Settings, client: redis.Redis,
                                     embedder: Embedder) -> None:
    load(config, client, embedder)
    before = protected_dump(client, config.redis.namespace)
    store = store_of(config, client)
    again = load_protected(store, protected_docs(), 1, embedder, config.dedup.model)
    assert (again.added, again.already) == (0, 2)
    assert protected_dump(client, config.redis.namespace) == before
    assert len(store) == 2
    with pytest.raises(DecontaminateError, match="made by all-MiniLM-L6-v2, not other"):
        store.add([ProtectedDoc("new", UNRELATED[1])], embedder, "other")


@pytest.mark.integration
def test_contaminated_hits_are_counted_by_method(config: Settings, client: redis.Redis,
                                                 embedder: Embedder) -> None:
    load(config, client, embedder)
    metrics = StageMetrics("ingest")
    metrics.count_outcomes(run(config, client, embedder, planted()).values())
    assert {m: metrics.counters[contaminated(m)]
            for m in ("exact", "words", "code-tokens", "semantic")} == {
        "exact": 1, "words": 1, "code-tokens": 1, "semantic": 1}


def test_a_bad_protected_line_is_refused_with_a_reason() -> None:
    assert ProtectedDoc.of({"id": "a", "content": "x y", "kind": "code"}).kind == "CODE"
    for bad, why in [([], "not a JSON object"), ({"content": "x"}, "no id"),
                     ({"id": "a", "content": " "}, "no content"),
                     ({"id": "a", "content": "x", "kind": "IMAGE"}, "not CODE or TEXT"),
                     ({"id": "a", "content": "x", "language": 3}, "language")]:
        with pytest.raises(DecontaminateError, match=why):
            ProtectedDoc.of(bad)


class CountingEncoder:
    """Deterministic unit vectors from the text's length; counts what it was asked."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = np.array([[len(t), 1.0] for t in texts], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_the_shared_encoder_embeds_each_text_of_a_micro_batch_once() -> None:
    inner = CountingEncoder()
    shared = SharedEncoder(inner)
    first = shared.encode(["a", "bb", "ccc"])
    survivors = shared.encode(["a", "ccc"])  # the next step's call: no model time
    assert inner.calls == [["a", "bb", "ccc"]]
    np.testing.assert_array_equal(survivors, first[[0, 2]])
    shared.encode(["dddd", "a"])  # the next micro-batch: only what is new is embedded
    assert inner.calls[-1] == ["dddd"]
    shared.encode(["bb"])  # forgotten: it held one micro-batch only
    assert inner.calls[-1] == ["bb"]


@pytest.mark.integration
def test_the_command_loads_a_file_idempotently_and_dedup_then_rejects_copies(
        config: Settings, client: redis.Redis, tmp_path: Path) -> None:
    docs = tmp_path / "eval.jsonl"
    lines = [json.dumps({"id": d.id, "content": d.content, "kind": d.kind.lower(),
                         "language": d.language}) for d in protected_docs()]
    docs.write_text("\n".join([lines[0], "{not json", json.dumps({"id": "x"}), "", lines[1]])
                    + "\n", encoding="utf-8")
    outputs = []
    for _ in range(2):
        result = CliRunner().invoke(cli, ["decontaminate", str(docs), "--no-semantic"],
                                    obj=config, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append(" ".join(result.output.split()))  # rich wraps at its width
    assert "2 protected documents added, 0 already there, 2 lines skipped" in outputs[0]
    assert "0 protected documents added, 2 already there, 2 lines skipped" in outputs[1]
    assert f"{docs}:2: " in outputs[0] and f"{docs}:3: x: no content" in outputs[0]
    assert len(store_of(config, client)) == 2

    stream = tmp_path / "stream.jsonl"
    stream.write_text("\n".join(json.dumps(raw_event(i, t, kind=k)) for i, t, k in [
        ("leak", exact_edit(PROBLEM), "TEXT"), ("fine", UNRELATED[1], "TEXT")]) + "\n")
    result = CliRunner().invoke(cli, ["dedup", str(stream), "--out", str(tmp_path / "d.jsonl"),
                                      "--no-semantic"], obj=config, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    decided = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [(d["id"], d["reason"], d["duplicate_of"]) for d in decided] == [
        ("leak", CONTAMINATED, "gsm-1"), ("fine", None, None)]


def test_the_command_needs_a_file() -> None:
    settings = load_settings()
    result = CliRunner().invoke(cli, ["decontaminate"], obj=settings)
    assert result.exit_code == 2
    assert "name a JSONL file, or set decontaminate.files" in result.output
