"""The semantic dedup step called directly (no Faust): the real model, the session Redis.

It also pins the test corpus (``pipeline_util.CORPUS_NAMES``): no two originals are
within the threshold of each other, and each planted comment or rename copy that MinHash
would let through is within it of its original.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis

from agents.config import DedupSettings
from agents.embed import Embedder
from agents.index import VectorIndex
from agents.keys import vset_key
from agents.minhash import MinHasher, jaccard
from agents.normalize import content_digest, normalize
from agents.semantic import SemanticDedup
from agents.step import Coords, Item, Outcome
from schemas.embedding import decode_embedding
from schemas.records import Candidate
from sluice.settings import Settings
from streams.connections import redis_client
from streams.serde import encode
from tests.agents.pipeline_util import corpus, plant, unique_id

pytestmark = pytest.mark.integration

BATCH = 8


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(DedupSettings(device="cpu"))


@pytest.fixture
def make_step(stack: Settings, embedder: Embedder) -> Iterator[Callable[..., SemanticDedup]]:
    """SemanticDedup factory on one fresh namespace (each step with its own connection)."""
    namespace = unique_id()
    clients: list[redis.Redis] = []

    def make() -> SemanticDedup:
        clients.append(redis_client(stack.redis))
        return SemanticDedup(stack.dedup, embedder,
                             VectorIndex(clients[-1], namespace, stack.dedup))

    yield make
    if clients:
        clients[0].delete(vset_key(namespace))
    for client in clients:
        client.close()


def candidate(event_id: str, text: str, label: str = "python") -> Item:
    """A Candidate as ingest makes it, with where it was read."""
    content = normalize(text)
    return Item(Candidate(
        id=event_id, source="stdlib", kind="CODE", language="python", label=label,
        content=content, timestamp=1_700_000_000_000, attributes={"path": event_id},
        digest=content_digest(content), quality_score=0.9, ingested_at=1_700_000_000_001,
        raw_partition=0, raw_offset=0,
    ), Coords("sluice.candidates", 0, 0))


def run(step: SemanticDedup, items: list[Item]) -> list[Outcome]:
    """The step over micro-batches of BATCH, as the agent calls it."""
    out: list[Outcome] = []
    for start in range(0, len(items), BATCH):
        out += step.run(items[start : start + BATCH])
    for outcome in out:
        encode("Rejection" if outcome.rejected else "CuratedSample", outcome.record)
    return out


def decisions(outcomes: list[Outcome]) -> list[tuple[str, str | None, str | None]]:
    return [(o.record["id"], o.reason, o.record["duplicate_of"] if o.rejected else None)
            for o in outcomes]


def minhash_misses(edits: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """(copy id, original id, original text, copy text) of every planted copy whose
    estimated Jaccard with its original is under the fuzzy threshold: only the model can
    catch those."""
    hasher = MinHasher()
    originals = [(f"orig-{s.name}", s.text) for s in corpus()]
    text_of = dict(originals)
    out = []
    for planted, text in plant(originals, edits):
        sim = jaccard(hasher.signature(normalize(text_of[planted.original])),  # type: ignore[arg-type]
                      hasher.signature(normalize(text)))  # type: ignore[arg-type]
        if sim < 0.8:
            out.append((planted.id, planted.original, text_of[planted.original], text))
    return out


def test_originals_are_kept_and_every_planted_copy_minhash_misses_is_a_semantic_duplicate(
        make_step: Callable[..., SemanticDedup], stack: Settings) -> None:
    step = make_step()
    originals = [candidate(f"orig-{s.name}", s.text) for s in corpus()]
    first = run(step, originals)
    assert [o.reason for o in first] == [None] * len(originals), (
        "distinct stdlib functions rejected: "
        f"{[(o.record['id'], o.record['duplicate_of']) for o in first if o.rejected]}")
    nearest = [o.record["nearest_similarity"] for o in first[1:]]
    copies = minhash_misses(("comment", "rename"))
    second = run(step, [candidate(cid, text) for cid, _, _, text in copies])
    assert decisions(second) == [(cid, "semantic_duplicate", oid) for cid, oid, _, _ in copies]
    sims = [o.record["similarity"] for o in second]
    assert min(sims) >= stack.dedup.threshold
    assert step.index.size() == len(originals)
    print(f"\n[dedup-step] {len(originals)} originals kept, nearest cosine between two of "
          f"them ≤ {max(nearest):.3f}; {len(copies)} planted copies MinHash misses all caught "
          f"as semantic_duplicate, cosine to their original {min(sims):.3f}-{max(sims):.3f} "
          f"(threshold {stack.dedup.threshold})")


def test_a_copy_in_the_same_micro_batch_as_its_original_is_caught(
        make_step: Callable[..., SemanticDedup]) -> None:
    step = make_step()
    copies = minhash_misses(("comment",))[:3]
    batch = []
    for cid, oid, original, text in copies:
        batch += [candidate(oid, original), candidate(cid, text)]
    outcomes = step.run(batch)
    assert decisions(outcomes) == [
        item for cid, oid, _, _ in copies
        for item in ((oid, None, None), (cid, "semantic_duplicate", oid))]
    # Only the originals were added to the vector set.
    assert step.index.size() == len(copies)


def test_a_replay_is_already_admitted_never_a_duplicate_of_itself(
        make_step: Callable[..., SemanticDedup]) -> None:
    step = make_step()
    copies = minhash_misses(("rename",))[:3]
    items = [candidate(oid, original) for _, oid, original, _ in copies]
    items += [candidate(cid, text) for cid, _, _, text in copies]
    first = run(step, items)
    again = run(step, items)  # the same ids, the same content: a consumer's replay
    reordered = run(step, items[::-1])
    assert decisions(first) == decisions(again) == decisions(reordered)[::-1]
    assert [o.reason for o in first] == [None] * 3 + ["semantic_duplicate"] * 3
    assert step.index.size() == 3
    assert step.index.counts["already"] == 6


def test_samples_carry_their_embedding_and_candidate_fields(
        make_step: Callable[..., SemanticDedup], embedder: Embedder) -> None:
    step = make_step()
    item = candidate("one", corpus(1)[0].text, label="docs")
    cand = item.record
    [outcome] = step.run([item])
    sample: dict[str, Any] = outcome.record
    assert not outcome.rejected
    for name in ("id", "source", "kind", "language", "label", "content", "timestamp",
                 "attributes", "digest", "quality_score"):
        assert sample[name] == cand[name], name
    assert sample["embedding_dim"] == embedder.dim == 384
    assert sample["model"] == step.settings.model
    vector = decode_embedding(sample["embedding"], sample["embedding_dim"])
    expected = embedder.encode([cand["content"]])[0]
    assert float(np.dot(vector, expected)) > 0.999  # float16 on the wire
    assert sample["nearest_similarity"] is None  # the set was empty


def test_two_steps_racing_on_near_copies_admit_exactly_one_of_each_group(
        make_step: Callable[..., SemanticDedup]) -> None:
    """Two workers (threads, each its own connection) get the members of the same groups
    in opposite order at the same moment: the admission script is atomic, so each group
    has exactly one admitted member, and every rejection names that member."""
    # Pairs, not triples: two copies of one original need not be within the threshold
    # of each other (similarity is not transitive), and then both may rightly be admitted.
    groups: dict[str, list[tuple[str, str]]] = {}
    for cid, oid, original, text in minhash_misses(("comment", "rename")):
        groups.setdefault(oid, [(oid, original), (cid, text)])
    chosen = list(groups.values())[:8]
    steps = [make_step(), make_step()]
    lanes = [
        [candidate(i, t) for members in chosen for i, t in members],
        [candidate(i, t) for members in chosen for i, t in members[::-1]],
    ]
    results: list[list[Outcome]] = [[], []]
    barrier = threading.Barrier(2)

    def work(n: int) -> None:
        barrier.wait()
        results[n] = run(steps[n], lanes[n])

    threads = [threading.Thread(target=work, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    admitted = {o.record["id"] for lane in results for o in lane if not o.rejected}
    for members in chosen:
        ids = {i for i, _ in members}
        winners = ids & admitted
        assert len(winners) == 1, f"group {sorted(ids)} admitted {sorted(winners)}"
        for lane in results:
            for o in lane:
                if o.rejected and o.record["id"] in ids:
                    assert o.record["duplicate_of"] in winners
    assert steps[0].index.size() == len(chosen)
