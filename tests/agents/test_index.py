"""The vector-set admission index against a real Redis 8, on real embeddings of stdlib files.

Never random vectors: HNSW recall and quantization error on random vectors say nothing
about real embeddings.
"""

from __future__ import annotations

import multiprocessing
import sysconfig
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from agents.config import DedupSettings
from agents.embed import Embedder
from agents.index import (
    Admission,
    VectorIndex,
    VectorIndexError,
    cosine_to_score,
    score_to_cosine,
)
from agents.keys import vset_key
from sluice.settings import Settings
from streams.connections import redis_client

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small, unrelated stdlib modules (1-3 KB: 2-4 windows each, so the suite stays fast).
FILES = ["bisect.py", "keyword.py", "secrets.py", "signal.py", "nturl2path.py", "_sitebuiltins.py"]
SETTINGS = DedupSettings()


def whitespace_edit(text: str) -> str:
    """Trailing spaces on every third line and every blank line doubled."""
    lines = [line + ("  " if i % 3 == 0 else "") for i, line in enumerate(text.splitlines())]
    return "\n".join(lines).replace("\n\n", "\n\n\n")


def comment_edit(text: str) -> str:
    """Two comment lines added, as a reviewer would."""
    lines = text.splitlines()
    lines.insert(len(lines) // 2, "# NOTE: kept as is for backwards compatibility.")
    lines.insert(1, "# Reviewed for the 2024 release.")
    return "\n".join(lines)


class Corpus:
    """Each file and its two planted near-copies, embedded once: ``vectors[file, variant]``."""

    def __init__(self, embedder: Embedder) -> None:
        originals = [(STDLIB / name).read_text(encoding="utf-8") for name in FILES]
        texts = [
            variant
            for text in originals
            for variant in (text, whitespace_edit(text), comment_edit(text))
        ]
        self.vectors = embedder.encode(texts).reshape(len(FILES), 3, -1)
        self.lines = embedder.encode(
            [line.strip() for line in originals[0].splitlines() if len(line.strip()) > 25][:40]
        )

    def check_margins(self, threshold: float) -> None:
        """The planted groups are what the tests assume, with room for int8 error (≤ 2e-3)."""
        flat = self.vectors.reshape(-1, self.vectors.shape[-1])
        cos = flat @ flat.T
        group = np.repeat(np.arange(len(FILES)), 3)
        same = group[:, None] == group[None, :]
        assert cos[same].min() >= threshold + 0.005, "a planted edit is not a near-copy"
        assert cos[~same].max() <= threshold - 0.2, "two distinct files look alike"


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    found = Corpus(Embedder(DedupSettings(device="cpu")))
    found.check_margins(SETTINGS.threshold)
    return found


@pytest.fixture()
def client(stack: Settings) -> Any:
    conn = redis_client(stack.redis)
    yield conn
    conn.close()


@pytest.fixture()
def index(client: redis.Redis) -> Any:
    vindex = VectorIndex(client, f"test-{uuid.uuid4().hex}", SETTINGS)
    yield vindex
    vindex.clear()


def test_score_cosine_conversion_is_affine_and_inverse() -> None:
    assert score_to_cosine(1.0) == 1.0 and score_to_cosine(0.5) == 0.0
    assert score_to_cosine(0.0) == -1.0
    for cos in (-1.0, -0.3, 0.0, 0.5, 0.97, 1.0):
        assert score_to_cosine(cosine_to_score(cos)) == pytest.approx(cos, abs=1e-15)
    assert vset_key("ns") == "sluice:{ns:vset}:set"  # tagged: one slot with what is beside it


@pytest.mark.integration
@pytest.mark.parametrize(("quantization", "tolerance"), [("noquant", 1e-6), ("int8", 1.5e-3)])
def test_vsim_score_is_half_of_one_plus_cosine(
    client: redis.Redis, corpus: Corpus, quantization: str, tolerance: float
) -> None:
    """Pins VSIM WITHSCORES = (1 + cos) / 2 against numpy on real line embeddings.

    Measured: error ≤ 2.4e-7 without quantization, ≤ 1.0e-3 (score units) with int8.
    """
    key = f"test-score-{uuid.uuid4().hex}"
    flag = {"noquant": "NOQUANT", "int8": "Q8"}[quantization]
    stored, queries = corpus.lines[:20], corpus.lines[20:]
    try:
        for i, vec in enumerate(stored):
            client.execute_command("VADD", key, "FP32", vec.astype("<f4").tobytes(), f"e{i}", flag)
        errors = []
        for query in queries:
            reply = client.execute_command(
                "VSIM", key, "FP32", query.astype("<f4").tobytes(), "COUNT", 20, "WITHSCORES"
            )
            scores = dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(
                reply, list
            ) else reply
            assert len(scores) == len(stored)
            for element, score in scores.items():
                cos = float(stored[int(element[1:])] @ query)
                errors.append(abs(float(score) - cosine_to_score(cos)))
        assert max(errors) < tolerance
    finally:
        client.delete(key)


@pytest.mark.integration
def test_fp32_rescoring_decides_where_int8_is_on_the_wrong_side(
        client: redis.Redis, corpus: Corpus) -> None:
    """A pair whose int8 VSIM cosine and FP32 cosine straddle the threshold: the FP32
    cosine decides, whichever way int8 errs."""
    namespace = f"test-{uuid.uuid4().hex}"
    probe = VectorIndex(client, namespace, DedupSettings(threshold=1.0))
    try:
        stored = corpus.lines[0]
        probe.admit(["stored"], stored[None])
        gaps = []
        for j, query in enumerate(corpus.lines[1:], start=1):
            reply = client.execute_command("VSIM", probe.key, "FP32",
                                           query.astype("<f4").tobytes(), "WITHSCORES")
            scores = dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(
                reply, list) else reply
            int8 = score_to_cosine(float(next(iter(scores.values()))))
            gaps.append((abs(int8 - float(stored @ query)), j, int8))
        gap, j, int8 = max(gaps)
        fp32 = float(stored @ corpus.lines[j])
        assert gap > 2e-4, "int8 was never far enough off to test the rescoring"
        threshold = (int8 + fp32) / 2  # int8 and FP32 on opposite sides of it
        index = VectorIndex(client, namespace, DedupSettings(threshold=threshold))
        [got] = index.admit(["query"], corpus.lines[j][None])
        assert got.keep == (fp32 < threshold) != (int8 < threshold)
        assert got.similarity == pytest.approx(fp32, abs=1e-6)
        print(f"\n[rescore] int8 cosine {int8:.5f}, FP32 {fp32:.5f}, threshold "
              f"{threshold:.5f}: {'kept' if got.keep else 'duplicate'} by FP32")
    finally:
        probe.clear()


@pytest.mark.integration
def test_planted_near_copies_are_rejected_and_distinct_files_kept(
    index: VectorIndex, corpus: Corpus
) -> None:
    ids = [f"orig/{name}" for name in FILES]
    first = index.admit(ids, corpus.vectors[:, 0])
    assert all(a.keep and not a.already for a in first)
    assert all(a.similarity is not None and a.similarity < 0.9 for a in first[1:])
    for variant in (1, 2):
        copies = index.admit([f"edit{variant}/{n}" for n in FILES], corpus.vectors[:, variant])
        for original, admission in zip(ids, copies, strict=True):
            assert not admission.keep and admission.duplicate_of == original
            assert admission.similarity is not None
            assert admission.similarity >= SETTINGS.threshold
    assert index.size() == len(FILES)
    assert index.counts == {"kept": len(FILES), "duplicate": 2 * len(FILES)}
    assert index.memory_bytes() > len(FILES) * 384  # int8: ≥ one byte per dimension


@pytest.mark.integration
def test_fp16_vectors_halve_the_stored_vectors_and_decide_on_the_rounded_ones(
        client: redis.Redis, corpus: Corpus) -> None:
    """``vector_precision = fp16``: the planted copies go as under fp32, the vectors hash
    holds 2 bytes per dimension (half the memory), the reported cosine is the one of the
    half-precision vectors, and an index written under fp32 is read on under fp16."""
    namespace = f"test-{uuid.uuid4().hex}"
    half = VectorIndex(client, namespace, DedupSettings(vector_precision="fp16"))
    full = VectorIndex(client, f"{namespace}-full", SETTINGS)
    try:
        ids = [f"orig/{name}" for name in FILES]
        for index in (half, full):
            assert all(a.keep for a in index.admit(ids, corpus.vectors[:, 0]))
        dim = corpus.vectors.shape[-1]
        assert {len(b) for b in client.hvals(half.vectors_key)} == {2 * dim}
        assert client.memory_usage(half.vectors_key) < 0.6 * client.memory_usage(
            full.vectors_key)
        copies = half.admit([f"edit/{n}" for n in FILES], corpus.vectors[:, 1])
        rounded = corpus.vectors.astype("<f2").astype(np.float32)
        for f, (original, got) in enumerate(zip(ids, copies, strict=True)):
            assert not got.keep and got.duplicate_of == original
            assert got.similarity == pytest.approx(float(rounded[f, 1] @ rounded[f, 0]),
                                                   abs=1e-6)
        # The fp32 index read with fp16 settings: its stored vectors are still decoded.
        mixed = VectorIndex(client, f"{namespace}-full", DedupSettings(vector_precision="fp16"))
        again = mixed.admit([f"edit/{n}" for n in FILES], corpus.vectors[:, 2])
        assert [a.duplicate_of for a in again] == ids
    finally:
        half.clear()
        full.clear()


@pytest.mark.integration
def test_duplicates_inside_one_micro_batch_are_caught(index: VectorIndex, corpus: Corpus) -> None:
    vectors = np.stack(
        [corpus.vectors[0, 0], corpus.vectors[1, 0], corpus.vectors[0, 2], corpus.vectors[1, 1]]
    )
    got = index.admit(["a", "b", "a-edited", "b-spaced"], vectors)
    assert [a.keep for a in got] == [True, True, False, False]
    assert [a.duplicate_of for a in got] == [None, None, "a", "b"]
    assert index.size() == 2


@pytest.mark.integration
def test_replay_is_idempotent(index: VectorIndex, corpus: Corpus) -> None:
    ids = ["x", "y", "x-copy"]
    vectors = np.stack([corpus.vectors[2, 0], corpus.vectors[3, 0], corpus.vectors[2, 1]])
    first = index.admit(ids, vectors)
    size, memory = index.size(), index.memory_bytes()
    again = index.admit(ids, vectors)
    assert [a.keep for a in first] == [True, True, False]
    assert again[:2] == [Admission(keep=True, already=True)] * 2
    assert again[2].duplicate_of == "x"  # still a duplicate, and still not added
    # An admitted id is "already" whatever vector comes with it: never a copy of itself.
    assert index.admit(["y"], corpus.vectors[4, :1]) == [Admission(keep=True, already=True)]
    assert (index.size(), index.memory_bytes()) == (size, memory) == (2, memory)


@pytest.mark.integration
def test_bad_input_fails_before_any_write(index: VectorIndex, corpus: Corpus) -> None:
    index.admit(["a"], corpus.vectors[0, :1])
    with pytest.raises(VectorIndexError, match="ids for"):
        index.admit(["b", "c"], corpus.vectors[1, :1])
    with pytest.raises(VectorIndexError):  # wrong dimension: refused by the server
        index.admit(["b", "c"], np.stack([corpus.vectors[1, 0], corpus.vectors[2, 0]])[:, :100])
    with pytest.raises(VectorIndexError, match="NaN"):
        index.admit(["b"], np.full((1, 384), np.nan, dtype=np.float32))
    assert index.size() == 1
    assert index.admit([], np.zeros((0, 384), dtype=np.float32)) == []


def _admit_in_child(
    url: str,
    namespace: str,
    batches: list[tuple[list[str], np.ndarray]],
    barrier: Any,
    results: Any,
) -> None:
    """One worker: admits its micro-batches as soon as the other is ready too."""
    index = VectorIndex(redis.Redis.from_url(url), namespace, SETTINGS)
    decided: list[tuple[str, Admission]] = []
    barrier.wait(timeout=60)
    for ids, vectors in batches:
        decided += zip(ids, index.admit(ids, vectors), strict=True)
    results.put(decided)


@pytest.mark.integration
def test_two_processes_admit_exactly_one_of_each_group(
    stack: Settings, client: redis.Redis, corpus: Corpus
) -> None:
    """Two spawned workers race over the same near-copy groups, in opposite orders: each
    searches outside any script, so their writes race; the settle keeps one of each."""
    namespace = f"test-{uuid.uuid4().hex}"
    plans = []
    for worker, order in (("w1", [0, 1, 2]), ("w2", [2, 1, 0])):
        # Micro-batches of 4 that straddle groups, so both workers hit each group together.
        items = [(f"{worker}/{g}/{v}", corpus.vectors[g, v]) for g in range(len(FILES))
                 for v in order]
        plans.append([
            ([item_id for item_id, _ in items[i : i + 4]],
             np.stack([vec for _, vec in items[i : i + 4]]))
            for i in range(0, len(items), 4)
        ])
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=_admit_in_child, args=(stack.redis_url, namespace, plan, barrier,
                                                  results))
        for plan in plans
    ]
    for proc in workers:
        proc.start()
    try:
        decided = dict(results.get(timeout=120) + results.get(timeout=120))
    finally:
        for proc in workers:
            proc.join(timeout=30)
    assert [proc.exitcode for proc in workers] == [0, 0]
    try:
        assert len(decided) == 2 * 3 * len(FILES)
        kept = [item_id for item_id, a in decided.items() if a.keep]
        groups = sorted(item_id.split("/")[1] for item_id in kept)
        assert groups == sorted(str(g) for g in range(len(FILES)))  # one per group, exactly
        for item_id, admission in decided.items():
            if not admission.keep:
                assert admission.duplicate_of in kept
                assert admission.duplicate_of.split("/")[1] == item_id.split("/")[1]
        assert client.execute_command("VCARD", vset_key(namespace)) == len(FILES)
    finally:
        VectorIndex(client, namespace, SETTINGS).clear()
