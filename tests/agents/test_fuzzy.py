"""Fuzzy dedup: signatures against datasketch and exact Jaccard; the index on a real Redis."""

from __future__ import annotations

import re
import sysconfig
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from datasketch import MinHash

from agents.config import FuzzySettings
from agents.fuzzy_index import FuzzyError, FuzzyIndex
from agents.minhash import MinHasher, jaccard, word_bytes
from agents.near_match import FuzzyDecision, Stored
from sluice.settings import Settings
from streams.connections import redis_client

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MASK64 = (1 << 64) - 1
SETTINGS = FuzzySettings()


def stdlib(name: str) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")


def distinct_files(count: int) -> list[tuple[str, str]]:
    """Top-level stdlib modules of some size: real code, no two near-copies of each other."""
    out = []
    for path in sorted(STDLIB.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 4000:
            out.append((path.name, text))
        if len(out) == count:
            break
    return out


def near_copy(text: str) -> str:
    """Reformatted, commented and with one identifier renamed, as a copied file would be."""
    names = re.findall(r"^def (\w+)\(", text, flags=re.M)
    renamed = re.sub(rf"\b{names[0]}\b", names[0] + "_v2", text) if names else text
    reindented = renamed.replace("    ", "  ").replace(", ", ",")
    return "# Copied from the standard library.\n# Local changes: none.\n" + reindented


# -- signatures (no Redis) -----------------------------------------------------------------


def test_words_ignore_case_punctuation_and_whitespace() -> None:
    assert word_bytes("def Foo(x,  y):\n\treturn x+y").split() == b"def foo x y return x y".split()
    assert word_bytes("déjà-vu, Ünïcode!").split() == "déjà vu ünïcode".encode().split()


@pytest.mark.parametrize("name", ["textwrap.py", "_pydecimal.py", "locale.py"])
def test_ascii_fast_path_matches_regex_words(name: str) -> None:
    text = stdlib(name)
    expected = re.findall(r"\w+", text.lower())
    assert word_bytes(text).decode().split() == expected


def _reference_shingle_hashes(text: str, k: int) -> list[int]:
    """The same hash, computed the slow obvious way with Python integers."""
    words = word_bytes(text).split()
    word_hashes = []
    for word in words:
        h = 0
        for byte in word:
            h = (h * 0x100000001B3 + byte + 1) & MASK64
        word_hashes.append(h)
    k = min(k, len(words))
    out = []
    for i in range(len(words) - k + 1):
        acc = word_hashes[i]
        for j in range(1, k):
            acc = (acc * 0x9E3779B97F4A7C15 + word_hashes[i + j]) & MASK64
        for shift, mult in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53), (33, 0)):
            acc ^= acc >> shift
            acc = (acc * mult) & MASK64 if mult else acc
        out.append(acc >> 32)
    return out


@pytest.mark.parametrize("text", [
    "one two three four five six seven",
    "Ünïcode  words, with punctuation; and \t tabs — ok",
    "short text",
])
def test_shingle_hashes_match_reference(text: str) -> None:
    assert MinHasher().shingle_hashes(text).tolist() == _reference_shingle_hashes(text, 5)


def test_shingle_hashes_real_file_match_reference() -> None:
    text = stdlib("bisect.py")
    assert MinHasher().shingle_hashes(text).tolist() == _reference_shingle_hashes(text, 5)


def test_short_and_empty_texts() -> None:
    hasher = MinHasher()
    assert len(hasher.shingle_hashes("only three words")) == 1
    assert len(hasher.shingle_hashes("exactly five words in here")) == 1
    assert len(hasher.shingle_hashes("six words are in this text")) == 2
    assert hasher.signature("") is None
    assert hasher.signature("  ... --- !!! ") is None


@pytest.mark.parametrize("name", ["textwrap.py", "_pydecimal.py"])  # 1 and many scratch blocks
def test_signature_equals_datasketch(name: str) -> None:
    hasher = MinHasher()
    hashes = hasher.shingle_hashes(stdlib(name))
    reference = MinHash(num_perm=128, hashfunc=lambda v: v)
    reference.update_batch(hashes.tolist())
    sig = hasher.from_hashes(hashes)
    assert sig is not None
    assert np.array_equal(sig, reference.hashvalues)


def test_estimate_tracks_exact_jaccard() -> None:
    hasher = MinHasher()
    base = stdlib("argparse.py")
    lines = base.split("\n")
    variants = [
        "\n".join(line for i, line in enumerate(lines) if i % 7 != 0),
        "\n".join(lines[: len(lines) // 2]),
        near_copy(base),
    ]
    for variant in variants:
        a, b = hasher.shingle_hashes(base), hasher.shingle_hashes(variant)
        exact = len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
        sa, sb = hasher.signature(base), hasher.signature(variant)
        assert sa is not None and sb is not None
        assert abs(jaccard(sa, sb) - exact) < 0.12  # 128 permutations: σ ≤ 0.045


def test_distinct_files_are_far_apart() -> None:
    hasher = MinHasher()
    sigs = [hasher.signature(text) for _, text in distinct_files(12)]
    for i, a in enumerate(sigs):
        for b in sigs[i + 1 :]:
            assert a is not None and b is not None
            assert jaccard(a, b) < 0.3


# -- the index on a real Redis -------------------------------------------------------------


@pytest.fixture
def client(stack: Settings) -> redis.Redis:
    return redis_client(stack.redis)


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    name = uuid.uuid4().hex
    yield name
    for key in client.scan_iter(match=f"sluice:{{{name}}}:*"):
        client.unlink(key)


@pytest.fixture
def index(client: redis.Redis, namespace: str) -> FuzzyIndex:
    return FuzzyIndex(client, namespace, SETTINGS)



@pytest.mark.integration
def test_planted_near_copies_are_caught(index: FuzzyIndex) -> None:
    originals = distinct_files(8)
    assert all(d.outcome == "admitted" for d in index.check_and_insert(originals))
    copies = [(f"copy-of-{name}", near_copy(text)) for name, text in originals]
    decisions = index.check_and_insert(copies)
    for (name, _), decision in zip(originals, decisions, strict=True):
        assert not decision.keep
        assert decision.outcome == "duplicate"
        assert decision.duplicate_of == name
        assert decision.similarity is not None and decision.similarity >= SETTINGS.threshold
    assert len(index) == len(originals)


@pytest.mark.integration
def test_distinct_files_are_all_admitted(index: FuzzyIndex) -> None:
    files = distinct_files(40)
    decisions = index.check_and_insert(files)
    assert [d.outcome for d in decisions] == ["admitted"] * len(files)
    assert len(index) == len(files)
    assert all(name in index for name, _ in files)


@pytest.mark.integration
def test_duplicates_within_one_batch(index: FuzzyIndex) -> None:
    (name_a, a), (name_b, b) = distinct_files(2)
    batch = [(name_a, a), (name_b, b), ("copy-a", near_copy(a)), ("copy-a2", a + "\n# end\n")]
    decisions = index.check_and_insert(batch)
    assert [d.keep for d in decisions] == [True, True, False, False]
    assert decisions[2].duplicate_of == name_a
    assert decisions[3].duplicate_of == name_a
    assert len(index) == 2


@pytest.mark.integration
def test_replaying_the_same_ids_changes_nothing(index: FuzzyIndex) -> None:
    files = distinct_files(6)
    batch = [*files, ("copy", near_copy(files[0][1]))]
    first = index.check_and_insert(batch)
    size = len(index)
    again = index.check_and_insert(batch)
    assert [d.outcome for d in again] == ["replayed"] * len(files) + ["duplicate"]
    assert again[-1] == first[-1]
    assert len(index) == size


@pytest.mark.integration
def test_an_id_repeated_in_one_batch_gets_one_decision(index: FuzzyIndex) -> None:
    (name, text), (other, other_text) = distinct_files(2)
    decisions = index.check_and_insert([(name, text), (other, other_text), (name, text)])
    assert decisions[0] == decisions[2]
    assert decisions[0].outcome == "admitted"
    assert len(index) == 2


@pytest.mark.integration
def test_two_instances_share_one_index(client: redis.Redis, namespace: str,
                                       stack: Settings) -> None:
    first = FuzzyIndex(client, namespace, SETTINGS)
    second = FuzzyIndex(stack.redis_url, namespace, SETTINGS)
    files = distinct_files(5)
    first.check_and_insert(files[:3])
    decisions = second.check_and_insert([(f"copy-{n}", near_copy(t)) for n, t in files[:3]])
    assert [d.duplicate_of for d in decisions] == [n for n, _ in files[:3]]
    second.check_and_insert(files[3:])
    assert [d.outcome for d in first.check_and_insert(files)] == ["replayed"] * 5


@pytest.mark.integration
def test_texts_without_words_are_skipped(index: FuzzyIndex) -> None:
    decisions = index.check_and_insert([("a", "--- +++ ..."), ("b", "--- +++ ...")])
    assert [d.outcome for d in decisions] == ["skipped", "skipped"]
    assert len(index) == 0


@pytest.mark.integration
def test_disabled_skips_everything(client: redis.Redis, namespace: str) -> None:
    off = FuzzyIndex(client, namespace, FuzzySettings(enabled=False))
    (name, text), = distinct_files(1)
    assert off.check_and_insert([(name, text), ("copy", text)]) == [
        FuzzyDecision(True, outcome="skipped")] * 2


@pytest.mark.integration
def test_namespace_refuses_incompatible_signatures(client: redis.Redis, namespace: str) -> None:
    built = FuzzyIndex(client, namespace, SETTINGS)
    with pytest.raises(FuzzyError, match="num_perm=128"):
        FuzzyIndex(client, namespace, FuzzySettings(num_perm=64))
    with pytest.raises(FuzzyError, match="shingle_words=5"):
        FuzzyIndex(client, namespace, FuzzySettings(shingle_words=3))
    # Another threshold only changes verification: the bands already built are adopted.
    stricter = FuzzyIndex(client, namespace, FuzzySettings(threshold=0.9))
    assert (stricter.bands, stricter.rows) == (built.bands, built.rows)


@pytest.mark.integration
def test_decoding_client_is_refused(stack: Settings, namespace: str) -> None:
    with pytest.raises(FuzzyError, match="decode_responses"):
        FuzzyIndex(redis_client(stack.redis, decode_responses=True), namespace, SETTINGS)


class _Interleaved(FuzzyIndex):
    """Runs another worker's whole batch between this one's check and its insert."""

    other: tuple[FuzzyIndex, list[tuple[str, str]]] | None = None

    def _fetch(self, ids: set[str]) -> dict[str, Stored]:
        if self.other is not None:
            worker, batch = self.other
            self.other = None
            assert worker.check_and_insert(batch)[0].outcome == "admitted"
        return super()._fetch(ids)


@pytest.mark.integration
def test_race_earlier_insert_wins(client: redis.Redis, namespace: str) -> None:
    (_, text), = distinct_files(1)
    late = _Interleaved(client, namespace, SETTINGS)
    early = FuzzyIndex(client, namespace, SETTINGS)
    late.other = (early, [("early", text)])
    # `late` checks (finds nothing), then `early` inserts a near-copy, then `late` inserts
    # and sees it in the same atomic step: `late` must lose, and leave the index.
    decision, = late.check_and_insert([("late", near_copy(text))])
    assert not decision.keep
    assert decision.duplicate_of == "early"
    assert "late" not in late and "early" in late
    assert len(late) == 1
    assert early.check_and_insert([("late", near_copy(text))])[0].duplicate_of == "early"


@pytest.mark.integration
def test_a_batch_copy_of_a_race_loser_names_the_winner(client: redis.Redis,
                                                       namespace: str) -> None:
    """A copy decided a duplicate of an earlier item of its own batch that then loses the
    insert race names the winner instead when it reaches the threshold with it too: the
    loser left the index, and the copy's replay names the winner (the cluster pipeline's
    replay test once saw the copy name the loser first and the winner on the replay)."""
    (_, text), = distinct_files(1)
    late = _Interleaved(client, namespace, SETTINGS)
    early = FuzzyIndex(client, namespace, SETTINGS)
    late.other = (early, [("early", text)])
    loser, copy = late.check_and_insert([("late", near_copy(text)), ("copy", text)])
    assert (loser.outcome, loser.duplicate_of) == ("duplicate", "early")
    assert (copy.outcome, copy.duplicate_of, copy.similarity) == ("duplicate", "early", 1.0)
    assert early.check_and_insert([("copy", text)])[0].duplicate_of == "early"


@pytest.mark.integration
def test_concurrent_workers_never_admit_both_copies(stack: Settings, namespace: str) -> None:
    files = distinct_files(24)
    originals = [(f"orig-{n}", t) for n, t in files]
    copies = [(f"copy-{n}", near_copy(t)) for n, t in files]
    workers = [FuzzyIndex(redis_client(stack.redis), namespace, SETTINGS) for _ in range(2)]
    start = threading.Barrier(2)
    results: dict[int, list[FuzzyDecision]] = {0: [], 1: []}

    def run(w: int, items: list[tuple[str, str]]) -> None:
        start.wait()
        for i in range(0, len(items), 3):
            results[w].extend(workers[w].check_and_insert(items[i : i + 3]))

    threads = [threading.Thread(target=run, args=(0, originals)),
               threading.Thread(target=run, args=(1, copies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    kept = [(a.keep, b.keep) for a, b in zip(results[0], results[1], strict=True)]
    assert all(a != b for a, b in kept), kept  # exactly one of each pair admitted
    assert len(workers[0]) == len(files)
