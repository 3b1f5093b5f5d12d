"""The filter steps' decisions without services: ``Validate`` (pure), ``ExactDedup``,
``FuzzyDedup``, ``SemanticDedup`` and ``PassSemantic`` over in-memory stores that implement
the steps' own store protocols (``Claims``, ``NearIndex``, ``Encoder``, ``Admitter``).

The in-memory stores make the decision the Redis ones approximate (every earlier item is
compared, no LSH or HNSW), so what is checked here is the step: which outcome each item
gets, in which order, with which reason, ``duplicate_of``, ``similarity`` and lineage, and
that every record fits its topic's schema. The Redis stores are tested on the real Redis
by the integration tests (``test_ingest_step``, ``test_fuzzy``, ``test_dedup_step``).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from agents.config import DedupSettings, FuzzySettings, IngestSettings
from agents.exact import ExactDedup
from agents.fuzzy import FuzzyDedup
from agents.index import Admission
from agents.minhash import MinHasher, jaccard
from agents.near_match import FuzzyDecision
from agents.normalize import content_digest, normalize
from agents.pipeline import Pipeline
from agents.semantic import PassSemantic, SemanticDedup
from agents.step import MAX_RAW_IN_REJECTION, Coords, Item, Outcome
from agents.validate import Validate
from schemas.embedding import decode_embedding, encode_embedding
from schemas.records import Candidate
from streams.serde import decode, encode
from tests.agents.pipeline_util import corpus, exact_edit, raw_event, rename_edit, whitespace_edit

TOPIC = "sluice.raw-events"
SNIPPETS = corpus(8)


# -- in-memory stores ------------------------------------------------------------------------


class MemoryClaims:
    """``Claims``: the first id to claim a digest owns it (``SET NX GET`` in a dict)."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}
        self.firsts: dict[str, str] = {}
        self.calls: list[list[tuple[str, str]]] = []

    def claim(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        self.calls.append(list(pairs))
        return [self.owners.setdefault(digest, ident) for digest, ident in pairs]

    def first_digests(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        return [self.firsts.setdefault(ident, digest) for ident, digest in pairs]


class MemoryNearIndex:
    """``NearIndex``: MinHash signatures compared with every admitted one (no LSH)."""

    def __init__(self, settings: FuzzySettings) -> None:
        self.threshold = settings.threshold
        self.hasher = MinHasher(settings.num_perm, settings.shingle_words)
        self.admitted: dict[str, np.ndarray] = {}  # in insertion order
        self.calls: list[list[tuple[str, str]]] = []

    def check_and_insert(self, items: Sequence[tuple[str, str]]) -> list[FuzzyDecision]:
        self.calls.append(list(items))
        decided: dict[str, FuzzyDecision] = {}
        for ident, text in items:
            if ident not in decided:
                decided[ident] = self._decide(ident, text)
        return [decided[ident] for ident, _ in items]

    def _decide(self, ident: str, text: str) -> FuzzyDecision:
        if ident in self.admitted:
            return FuzzyDecision(True, outcome="replayed")
        sig = self.hasher.signature(text)
        if sig is None:
            return FuzzyDecision(True, outcome="skipped")
        # The most similar earlier item; ties go to the earliest.
        best = max(((jaccard(sig, other), -k, other_id)
                    for k, (other_id, other) in enumerate(self.admitted.items())),
                   default=None)
        if best is not None and best[0] >= self.threshold:
            return FuzzyDecision(False, best[2], best[0], "duplicate")
        self.admitted[ident] = sig
        return FuzzyDecision(True)


class HashedWords:
    """``Encoder``: a unit bag-of-words vector, words hashed (CRC-32) into ``dim`` slots."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
            out[row] /= max(float(np.linalg.norm(out[row])), 1e-9)
        return out


class MemoryVectorSet:
    """``Admitter``: cosine against every admitted vector; an id already in is ``already``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.vectors: dict[str, np.ndarray] = {}
        self.calls: list[list[str]] = []

    def admit(self, ids: list[str], vectors: np.ndarray) -> list[Admission]:
        self.calls.append(list(ids))
        out = []
        for ident, vector in zip(ids, vectors, strict=True):
            if ident in self.vectors:
                out.append(Admission(True, already=True))
                continue
            sims = [(float(np.dot(v, vector)), other) for other, v in self.vectors.items()]
            best = max(sims, key=lambda s: s[0], default=None)
            if best is not None and best[0] >= self.threshold:
                out.append(Admission(False, best[1], best[0]))
            else:
                self.vectors[ident] = vector
                out.append(Admission(True, similarity=best[0] if best else None))
        return out


class ScriptedIndex:
    """Returns the decisions it was given, and remembers what it was asked."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[Any] = []

    def check_and_insert(self, items: Sequence[tuple[str, str]]) -> list[FuzzyDecision]:
        self.calls.append(list(items))
        return list(self.answers)

    def admit(self, ids: list[str], vectors: np.ndarray) -> list[Admission]:
        self.calls.append((list(ids), vectors))
        return list(self.answers)


# -- helpers ---------------------------------------------------------------------------------


def message(value: bytes, offset: int, key: bytes | None = None, partition: int = 2) -> Item:
    return Item(value, Coords(TOPIC, partition, offset), key)


def avro(event_id: str, text: str, **kw: Any) -> bytes:
    return encode("RawEvent", raw_event(event_id, text, **kw))


def candidate(event_id: str, text: str, offset: int = 0, label: str = "python") -> Item:
    """A Candidate as ``Validate`` makes it, on its way to the next step."""
    content = normalize(text)
    return Item(Candidate(
        id=event_id, source="stdlib", kind="CODE", language="python", label=label,
        content=content, timestamp=1_700_000_000_000, attributes={"repo": "cpython"},
        digest=content_digest(content), quality_score=0.9, ingested_at=1_700_000_000_001,
        raw_partition=2, raw_offset=offset, earlier_digest=None),
        Coords("sluice.candidates", 1, offset))


def candidates(*pairs: tuple[str, str]) -> list[Item]:
    return [candidate(ident, text, offset) for offset, (ident, text) in enumerate(pairs)]


def decisions(outcomes: list[Outcome]) -> list[tuple[str, str | None, str | None]]:
    """(id, reason, duplicate_of) per outcome."""
    return [(o.record["id"], o.reason, o.record["duplicate_of"] if o.rejected else None)
            for o in outcomes]


def check_schemas(outcomes: list[Outcome], passed: str) -> None:
    """Every outcome round-trips through its topic's schema (the agent could send it)."""
    for o in outcomes:
        name = "Rejection" if o.rejected else passed
        assert decode(encode(name, o.record), name) == o.record


# -- Validate ----------------------------------------------------------------------------------


def test_a_valid_event_becomes_a_normalized_candidate_with_its_lineage() -> None:
    text = SNIPPETS[0].text
    step = Validate(IngestSettings())
    [out] = step.run([message(avro("ev-1", exact_edit(text)), offset=41, key=b"ev-1")])
    check_schemas([out], "Candidate")
    cand = out.record
    assert not out.rejected
    assert cand["content"] == normalize(text) != exact_edit(text)
    assert cand["digest"] == content_digest(normalize(text))
    assert (cand["id"], cand["label"], cand["kind"], cand["source"]) == (
        "ev-1", "python", "CODE", "stdlib")
    assert (cand["raw_partition"], cand["raw_offset"]) == (2, 41)
    assert 0.5 <= cand["quality_score"] <= 1.0
    assert step.counters == {"in": 1, "out": 1}


def test_an_event_without_id_or_label_gets_a_derived_id_and_unlabeled() -> None:
    text = SNIPPETS[1].text
    value = json.dumps({"content": text, "kind": "code", "source": "s"}).encode()
    [out] = Validate(IngestSettings()).run([message(value, offset=3)])
    cand = out.record
    assert not out.rejected
    assert cand["kind"] == "CODE"
    assert cand["id"] == "sha256:" + content_digest(normalize(text))[:32]
    assert cand["label"] == "unlabeled"
    encode("Candidate", cand)


BIG = 100 * 1024


@pytest.mark.parametrize(("reason", "key", "value"), [
    ("invalid:undecodable", b"k-garbage", b"\x00\x17 not an event \xff"),
    ("invalid:undecodable", None, b""),
    ("invalid:unknown_schema", b"k-fp", b"\xc3\x01" + bytes.fromhex("deadbeefdeadbeef") + b"\x02"),
    ("invalid:invalid_json", b"k-json", b'{"content": "never closed'),
    ("invalid:invalid_field", b"k-field", b'{"content": "x = 1", "colour": "red"}'),
    ("invalid:invalid_utf8", b"k-utf8", b'{"content": "caf\xe9"}'),
    ("invalid:empty_content", b"k-empty", b'{"content": " \\n\\t "}'),
    ("invalid:too_large", b"k-big", b'{"content": "' + b"x" * BIG + b'"}'),
])
def test_each_undecodable_message_is_an_invalid_rejection_with_its_bytes(
        reason: str, key: bytes | None, value: bytes) -> None:
    step = Validate(IngestSettings(max_event_bytes=BIG))
    [out] = step.run([message(value, offset=9, key=key)])
    check_schemas([out], "Candidate")
    rec = out.record
    assert out.rejected and out.reason == reason, rec["detail"]
    assert rec["stage"] == "ingest" and rec["detail"]
    # The key names it; without one, its coordinates do.
    assert rec["id"] == (key.decode() if key else f"{TOPIC}-2-9")
    assert (rec["topic"], rec["partition"], rec["offset"]) == (TOPIC, 2, 9)
    # Its bytes travel with it, cut at 64 KiB.
    assert rec["raw"] == value[:MAX_RAW_IN_REJECTION]
    assert step.counters == {"in": 1, "rejected": 1, f"rejected.{reason}": 1}


@pytest.mark.parametrize(("kind", "content", "rule", "threshold"), [
    ("CODE", "x=1", "min_chars", "20"),
    ("CODE", "def f():\n    return '" + "x" * 1500 + "'", "max_line_length", "1000"),
    ("TEXT", "Too short to be a document.", "min_words", "20"),
])
def test_a_decoded_event_failing_a_rule_is_a_quality_rejection_that_keeps_its_identity(
        kind: str, content: str, rule: str, threshold: str) -> None:
    value = avro("q-1", content, kind=kind, label="docs")
    [out] = Validate(IngestSettings()).run([message(value, offset=5)])
    check_schemas([out], "Candidate")
    rec = out.record
    assert out.rejected and out.reason == f"quality:{rule}"
    assert threshold in rec["detail"], rec["detail"]
    assert (rec["id"], rec["kind"], rec["label"], rec["source"]) == ("q-1", kind, "docs",
                                                                     "stdlib")
    assert rec["raw"] is None  # decoded: the bytes are not needed


def test_quality_thresholds_come_from_the_settings_given() -> None:
    text = SNIPPETS[2].text
    assert not Validate(IngestSettings()).run([message(avro("a", text), 0)])[0].rejected
    strict = Validate(IngestSettings(code={"min_chars": 5000}))
    [out] = strict.run([message(avro("a", text), 0)])
    assert out.reason == "quality:min_chars" and "5000" in out.record["detail"]


def test_validate_gives_one_outcome_per_message_in_order() -> None:
    values = [avro("g0", SNIPPETS[0].text), b"\xff\xfe", avro("q", "x=1"),
              avro("g1", SNIPPETS[1].text), b'{"content": ""}']
    step = Validate(IngestSettings())
    outcomes = step.run([message(v, offset=10 + i) for i, v in enumerate(values)])
    assert [o.reason for o in outcomes] == [None, "invalid:undecodable", "quality:min_chars",
                                            None, "invalid:empty_content"]
    for offset, o in enumerate(outcomes, start=10):
        assert o.record["offset" if o.rejected else "raw_offset"] == offset
    assert step.counters["rejected"] == 3 and step.counters["out"] == 2


# -- ExactDedup ------------------------------------------------------------------------------


def test_the_first_id_to_claim_a_digest_keeps_it_and_copies_name_it() -> None:
    a, b = SNIPPETS[0].text, SNIPPETS[1].text
    claims = MemoryClaims()
    step = ExactDedup(claims)
    first = step.run(candidates(("a", a), ("b", b), ("a-copy", exact_edit(a))))
    check_schemas(first, "Candidate")
    assert decisions(first) == [("a", None, None), ("b", None, None),
                                ("a-copy", "exact_duplicate", "a")]
    assert first[2].record["similarity"] == 1.0
    assert (first[2].record["stage"], first[2].record["offset"]) == ("ingest", 2)
    # One claim call per batch, with (digest, id) in input order.
    assert claims.calls == [[(content_digest(normalize(t)), i) for i, t in
                             [("a", a), ("b", b), ("a-copy", a)]]]
    # A later batch: a copy of b is caught against what the store remembers.
    later = step.run(candidates(("b-copy", b)))
    assert decisions(later) == [("b-copy", "exact_duplicate", "b")]
    assert step.counters["rejected.exact_duplicate"] == 2 and step.counters["out"] == 2


def test_a_replayed_id_is_kept_not_a_duplicate_of_itself() -> None:
    a = SNIPPETS[0].text
    step = ExactDedup(MemoryClaims())
    batch = candidates(("a", a), ("a-copy", a))
    first = step.run(batch)
    again = step.run(batch)
    assert decisions(first) == decisions(again) == [("a", None, None),
                                                    ("a-copy", "exact_duplicate", "a")]
    # A passed candidate goes on unchanged.
    assert again[0].record is batch[0].record


# -- FuzzyDedup ------------------------------------------------------------------------------


def test_fuzzy_maps_each_decision_to_an_outcome_in_order() -> None:
    index = ScriptedIndex([FuzzyDecision(True), FuzzyDecision(False, "x", 0.8125, "duplicate"),
                           FuzzyDecision(True, outcome="replayed"),
                           FuzzyDecision(True, outcome="skipped")])
    step = FuzzyDedup(FuzzySettings(threshold=0.8), index)
    batch = candidates(("a", "a b c"), ("b", "d e f"), ("c", "g h i"), ("d", "{}"))
    outcomes = step.run(batch)
    check_schemas(outcomes, "Candidate")
    assert index.calls == [[(i.record["id"], i.record["content"]) for i in batch]]
    assert decisions(outcomes) == [("a", None, None), ("b", "near_duplicate", "x"),
                                   ("c", None, None), ("d", None, None)]
    rec = outcomes[1].record
    assert (rec["stage"], rec["similarity"], rec["label"]) == ("fuzzy", 0.8125, "python")
    assert rec["detail"] == "words: estimated Jaccard 0.812 ≥ 0.8"
    assert step.counters == {"in": 4, "out": 3, "rejected": 1, "rejected.near_duplicate": 1}


def test_near_copies_of_real_code_are_rejected_naming_the_original() -> None:
    settings = FuzzySettings()
    index = MemoryNearIndex(settings)
    step = FuzzyDedup(settings, index)
    a, b, c = (s.text for s in SNIPPETS[:3])
    outcomes = step.run(candidates(("a", a), ("b", b), ("a-ws", whitespace_edit(a)),
                                   ("b-rename", rename_edit(b)), ("c", c)))
    assert decisions(outcomes) == [("a", None, None), ("b", None, None),
                                   ("a-ws", "near_duplicate", "a"),
                                   ("b-rename", "near_duplicate", "b"), ("c", None, None)]
    # Same words: similarity 1; a renamed function: a few shingles differ.
    assert outcomes[2].record["similarity"] == 1.0
    assert 0.8 <= outcomes[3].record["similarity"] < 1.0
    # A later batch is checked against what the index holds.
    later = step.run(candidates(("c-ws", whitespace_edit(c))))
    assert decisions(later) == [("c-ws", "near_duplicate", "c")]


def test_fuzzy_replays_are_kept_and_copies_stay_copies() -> None:
    settings = FuzzySettings()
    step = FuzzyDedup(settings, MemoryNearIndex(settings))
    a = SNIPPETS[3].text
    batch = candidates(("a", a), ("a-ws", whitespace_edit(a)), ("a", a))
    first = step.run(batch)
    # An id repeated in the batch gets the decision of its first occurrence.
    assert decisions(first) == [("a", None, None), ("a-ws", "near_duplicate", "a"),
                                ("a", None, None)]
    assert decisions(step.run(batch)) == decisions(first)


# -- SemanticDedup and PassSemantic ----------------------------------------------------------


def test_semantic_maps_admissions_to_samples_and_rejections() -> None:
    settings = DedupSettings(model="test-model", threshold=0.97)
    embedder = HashedWords(dim=16)
    index = ScriptedIndex([Admission(True, similarity=0.41), Admission(False, "a", 0.98125),
                           Admission(True, already=True)])
    step = SemanticDedup(settings, embedder, index)
    batch = candidates(*((f"s{i}", s.text) for i, s in enumerate(SNIPPETS[:3])))
    outcomes = step.run(batch)
    check_schemas(outcomes, "CuratedSample")
    # The encoder gets the contents, the index the ids and those very vectors, in order.
    assert embedder.calls == [[i.record["content"] for i in batch]]
    ids, vectors = index.calls[0]
    assert ids == ["s0", "s1", "s2"]
    np.testing.assert_array_equal(vectors, embedder.encode([i.record["content"] for i in batch]))
    assert decisions(outcomes) == [("s0", None, None), ("s1", "semantic_duplicate", "a"),
                                   ("s2", None, None)]
    rej = outcomes[1].record
    assert (rej["stage"], rej["similarity"], rej["detail"]) == (
        "dedup", 0.98125, "cosine 0.9812 ≥ 0.97")
    for out, item, vector, nearest in [(outcomes[0], batch[0], vectors[0], 0.41),
                                       (outcomes[2], batch[2], vectors[2], None)]:
        sample = out.record
        cand = item.record
        for name in ("id", "source", "kind", "language", "label", "content", "timestamp",
                     "attributes", "digest", "quality_score"):
            assert sample[name] == cand[name], name
        assert (sample["model"], sample["embedding_dim"], sample["nearest_similarity"]) == (
            "test-model", 16, nearest)
        assert sample["embedding"] == encode_embedding(vector)
        np.testing.assert_allclose(decode_embedding(sample["embedding"], 16), vector,
                                   atol=1e-3)
    assert {"semantic", "embed", "admit"} <= set(step.seconds)
    assert step.counters == {"in": 3, "out": 2, "rejected": 1,
                             "rejected.semantic_duplicate": 1}


def test_semantic_copies_are_rejected_and_replays_are_kept() -> None:
    settings = DedupSettings(threshold=0.97)
    index = MemoryVectorSet(settings.threshold)
    step = SemanticDedup(settings, HashedWords(), index)
    a, b = SNIPPETS[4].text, SNIPPETS[5].text
    # A copy under another id (same words: cosine 1), in the same batch and the next.
    batch = candidates(("a", a), ("b", b), ("a-copy", whitespace_edit(a)))
    first = step.run(batch)
    assert decisions(first) == [("a", None, None), ("b", None, None),
                                ("a-copy", "semantic_duplicate", "a")]
    assert first[2].record["similarity"] == pytest.approx(1.0)
    assert first[0].record["nearest_similarity"] is None  # the set was empty
    assert first[1].record["nearest_similarity"] < 0.97
    # A replay: the admitted ids are kept (not duplicates of themselves), the copy stays one.
    again = step.run(batch)
    assert decisions(again) == decisions(first)
    assert again[0].record["nearest_similarity"] is None  # already admitted
    assert set(index.vectors) == {"a", "b"}


def test_pass_semantic_makes_samples_without_an_embedding() -> None:
    step = PassSemantic()
    batch = candidates(("a", SNIPPETS[0].text), ("b", SNIPPETS[1].text))
    outcomes = step.run(batch)
    check_schemas(outcomes, "CuratedSample")
    assert [o.record["id"] for o in outcomes] == ["a", "b"]
    for o, item in zip(outcomes, batch, strict=True):
        assert not o.rejected
        assert (o.record["embedding"], o.record["embedding_dim"], o.record["model"],
                o.record["nearest_similarity"]) == (b"", 0, "", None)
        assert o.record["content"] == item.record["content"]
    assert step.counters == {"in": 2, "out": 2}


# -- the chain -------------------------------------------------------------------------------


def test_the_whole_chain_on_real_code_with_planted_copies() -> None:
    fuzzy = FuzzySettings()
    near, vectors, embedder = MemoryNearIndex(fuzzy), MemoryVectorSet(0.97), HashedWords()
    pipeline = Pipeline([Validate(IngestSettings()), ExactDedup(MemoryClaims()),
                         FuzzyDedup(fuzzy, near),
                         SemanticDedup(DedupSettings(threshold=0.97), embedder, vectors)])
    a, b, c = (s.text for s in SNIPPETS[5:8])
    values = [avro("a", a), avro("a-exact", exact_edit(a)), b"\x00junk", avro("b", b),
              avro("b-ws", whitespace_edit(b)), avro("short", "x=1"), avro("c", c)]
    outcomes = pipeline.run([message(v, offset=i) for i, v in enumerate(values)])
    check_schemas(outcomes, "CuratedSample")
    assert [(o.record["id"], o.reason) for o in outcomes] == [
        ("a", None), ("a-exact", "exact_duplicate"), (f"{TOPIC}-2-2", "invalid:undecodable"),
        ("b", None), ("b-ws", "near_duplicate"), ("short", "quality:min_chars"), ("c", None)]
    assert [o.record["stage"] for o in outcomes if o.rejected] == [
        "ingest", "ingest", "fuzzy", "ingest"]
    # What a step rejected never reached the next one.
    assert [i for i, _ in near.calls[0]] == ["a", "b", "b-ws", "c"]
    assert vectors.calls == [["a", "b", "c"]]
    assert [len(texts) for texts in embedder.calls] == [3]
    # Every sample carries an embedding of the encoder's dimension.
    assert all(o.record["embedding_dim"] == embedder.dim for o in outcomes if not o.rejected)
    seconds = pipeline.seconds()
    assert {"validate", "exact", "fuzzy", "semantic", "embed", "admit"} <= set(seconds)
