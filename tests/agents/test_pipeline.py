"""The curation pipeline end to end: `sluice worker` processes (Faust), the session's real
Kafka and Redis, the real embedding model, real stdlib code with planted copies.

One worker (ingest + dedup) curates three phases of events, shared by the tests below:

1. originals and other distinct functions;
2. four planted copies of each original (exact, whitespace, comment, rename edits) and more
   distinct functions: every copy is rejected naming its original, nothing distinct is;
3. new originals each sent right beside a copy (so the pair usually shares a micro-batch):
   exactly one of each pair is admitted.

Then a second consumer group replays the raw topic from offset 0 on the same dedup
namespace, and the same events are produced again with the same ids: no outcome changes.
A separate test races two workers of one group on groups of near-copies.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agents.keys import vset_key
from schemas.records import RawEvent
from sluice.settings import Settings, load_settings, settings_env
from streams.connections import redis_client
from streams.topics import ensure_topics
from tests.agents.pipeline_util import (
    EDITS,
    EXPECTED_REASONS,
    OutcomeReader,
    Planted,
    Seen,
    corpus,
    isolated,
    missing,
    one_decision,
    plant,
    produce,
    raw_event,
    unique_id,
    wait_for_group,
    workers,
)

pytestmark = pytest.mark.integration

WAIT_S = 240.0  # a deadline for failures only: on two busy cores 60 events take ~30 s


def test_settings_env_makes_a_process_load_the_same_settings(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    base = load_settings(state_dir=str(tmp_path),
                         stack={"kafka_port": 19092, "controller_port": 19093,
                                "redis_port": 16399})
    chosen = isolated(base, partitions=3, create=False,
                      balance={"policy": "power", "batch_size": 16, "reuse_cap": 1},
                      fuzzy={"enabled": False}, dedup={"threshold": 0.95})
    for name in [k for k in os.environ if k.startswith("SLUICE_")]:
        monkeypatch.delenv(name)
    for name, value in settings_env(chosen).items():
        monkeypatch.setenv(name, value)
    assert load_settings().model_dump() == chosen.model_dump()


@dataclass
class Curated:
    """What the shared run produced and read back."""

    settings: Settings
    events: list[RawEvent] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # ids that must become samples
    planted: list[Planted] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (original, copy) ids
    outcomes: dict[str, list[Seen]] = field(default_factory=dict)
    log: str = ""


def _events(items: list[tuple[str, str]]) -> list[RawEvent]:
    return [raw_event(event_id, text) for event_id, text in items]


@pytest.fixture(scope="module")
def curated(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Curated]:
    settings = isolated(stack)
    run = Curated(settings)
    folder = tmp_path_factory.mktemp("pipeline")
    with workers(settings, "ingest,dedup", folder) as started, OutcomeReader(settings) as reader:
        wait_for_group(settings, 1, started)

        def send(items: list[tuple[str, str]]) -> None:
            events = _events(items)
            run.events += events
            ids = produce(settings, events)
            got = reader.wait_for(ids, WAIT_S, alive=lambda: started[0].alive)
            assert not missing(ids, got), (
                f"no outcome for {missing(ids, got)}\n{started[0].log_tail()}")

        originals = [(f"orig-{s.name}", s.text) for s in corpus(12, start=0)]
        distinct = [(f"dist-{s.name}", s.text) for s in corpus(6, start=12)]
        send(originals + distinct)
        copies = plant(originals, EDITS)
        later = [(f"dist-{s.name}", s.text) for s in corpus(6, start=18)]
        # Copies interleaved with new distinct functions, in one burst.
        mixed = [(p.id, text) for p, text in copies]
        for n, item in enumerate(later):
            mixed.insert(n * 8, item)
        send(mixed)
        pair_items: list[tuple[str, str]] = []
        for n, snippet in enumerate(corpus(8, start=24)):
            edit = list(EDITS)[n % len(EDITS)]
            oid, cid = f"pair-{snippet.name}", f"pair-{edit}-{snippet.name}"
            pair_items += [(oid, snippet.text), (cid, EDITS[edit](snippet.text))]
            run.pairs.append((oid, cid))
        send(pair_items)
        run.kept = [i for i, _ in originals + distinct + later]
        run.planted = [p for p, _ in copies]
        run.outcomes = reader.by_id()
        run.log = started[0].log_tail()
    yield run


def test_every_event_has_exactly_one_outcome(curated: Curated) -> None:
    ids = [e["id"] for e in curated.events]
    assert len(set(ids)) == len(ids)
    assert not missing(ids, curated.outcomes)
    assert set(curated.outcomes) == set(ids), "outcomes for events never produced"
    one_decision(curated.outcomes)
    # Nothing was sent twice: one outcome message per event.
    assert sum(len(v) for v in curated.outcomes.values()) == len(ids)


def test_distinct_functions_all_become_samples(curated: Curated) -> None:
    decided = one_decision(curated.outcomes)
    rejected = {i: decided[i] for i in curated.kept if decided[i][0] != "kept"}
    assert not rejected, f"distinct texts rejected: {rejected}"
    for event_id in curated.kept:
        sample = curated.outcomes[event_id][0].record
        assert sample["embedding_dim"] == 384
        assert len(sample["embedding"]) == 2 * 384
        assert sample["label"] == "python"


def test_every_planted_copy_is_rejected_naming_its_original(curated: Curated) -> None:
    layers: Counter[tuple[str, str]] = Counter()
    wrong = []
    for planted in curated.planted:
        [seen] = curated.outcomes[planted.id]
        reason, dup = seen.reason, seen.record.get("duplicate_of")
        layers[(planted.edit, str(reason))] += 1
        if reason not in EXPECTED_REASONS[planted.edit] or dup != planted.original:
            wrong.append((planted.id, reason, dup))
    print("\n[pipeline] planted copies by edit and the layer that caught them: "
          + ", ".join(f"{edit}→{reason}: {n}" for (edit, reason), n in sorted(layers.items())))
    assert not wrong, f"copies not rejected as expected: {wrong}"
    # The similarity says how close: 1.0 for exact copies, ≥ the thresholds otherwise.
    s = curated.settings
    for planted in curated.planted:
        record = curated.outcomes[planted.id][0].record
        minimum = {"exact_duplicate": 1.0, "near_duplicate": s.fuzzy.threshold,
                   "semantic_duplicate": s.dedup.threshold}[record["reason"]]
        assert record["similarity"] >= minimum, record


def test_a_copy_beside_its_original_loses_to_it_or_wins_alone(curated: Curated) -> None:
    """Pairs sent back to back (usually one micro-batch, possibly two partitions): exactly
    one member is admitted, the other is rejected naming it."""
    decided = one_decision(curated.outcomes)
    for original, copy in curated.pairs:
        kept = [i for i in (original, copy) if decided[i][0] == "kept"]
        assert len(kept) == 1, (original, copy, decided[original], decided[copy])
        [loser] = {original, copy} - set(kept)
        assert decided[loser][1] in {"exact_duplicate", "near_duplicate", "semantic_duplicate"}
        assert decided[loser][2] == kept[0]


def test_the_vector_set_holds_exactly_the_samples(curated: Curated) -> None:
    samples = [i for i, seen in curated.outcomes.items() if not seen[0].rejected]
    client = redis_client(curated.settings.redis)
    try:
        key = vset_key(curated.settings.redis.namespace)
        assert int(client.execute_command("VCARD", key)) == len(samples)
        pipe = client.pipeline(transaction=False)
        for event_id in samples:
            pipe.execute_command("VISMEMBER", key, event_id)
        assert all(pipe.execute())
    finally:
        client.close()


def test_replaying_the_topic_changes_no_outcome(curated: Curated, tmp_path: Path) -> None:
    """A second consumer group on the same dedup namespace reads raw-events from offset 0
    (its outputs go to its own topics); then every event is produced again with the same
    id. Every id keeps the decision of the first run: an admitted id is "already
    admitted", never a duplicate of itself; a duplicate still names the same original."""
    first = one_decision(curated.outcomes)
    uid = unique_id()
    s = curated.settings
    replay = s.model_copy(update={
        "app_id": f"replay{uid}",
        "topics": s.topics.model_copy(update={
            role: f"{role}-replay{uid}" for role in s.topics.all() if role != "raw"}),
    })
    ensure_topics(replay.kafka, replay.topics)
    ids = [e["id"] for e in curated.events]
    with workers(replay, "ingest,dedup", tmp_path) as started, OutcomeReader(replay) as reader:
        got = reader.wait_for(ids, WAIT_S, alive=lambda: started[0].alive)
        assert not missing(ids, got), f"{missing(ids, got)}\n{started[0].log_tail()}"
        assert one_decision(got) == first
        produce(replay, curated.events)
        twice = reader.wait_until(
            lambda r: all(len(r.by_id().get(i, [])) >= 2 for i in ids), WAIT_S)
        assert twice, f"replayed events without an outcome\n{started[0].log_tail()}"
        assert one_decision(reader.by_id()) == first
    client = redis_client(s.redis)
    try:
        kept = sum(1 for d in first.values() if d[0] == "kept")
        assert int(client.execute_command("VCARD", vset_key(s.redis.namespace))) == kept
    finally:
        client.close()


def test_two_workers_racing_on_near_copies_admit_exactly_one_of_each_group(
        stack: Settings, tmp_path: Path) -> None:
    """Two workers of one group, four partitions: the members of each group of near-copies
    are spread over partitions, so both workers see members of the same group at once.
    Groups are cliques (every two members are copies of each other): the original, its
    exact, whitespace and comment copies; and pairs of an original with its rename."""
    settings = isolated(stack, partitions=4)
    groups: list[list[tuple[str, str]]] = []
    for snippet in corpus(8, start=40):
        groups.append([(f"g-{edit}-{snippet.name}", EDITS[edit](snippet.text))
                       for edit in ("exact", "whitespace", "comment")]
                      + [(f"g-orig-{snippet.name}", snippet.text)])
    for snippet in corpus(6, start=50):
        groups.append([(f"g-rename-{snippet.name}", EDITS["rename"](snippet.text)),
                       (f"g-orig-{snippet.name}", snippet.text)])
    items = [item for group in groups for item in group]
    with workers(settings, "ingest,dedup", tmp_path, count=2) as started, \
            OutcomeReader(settings) as reader:
        wait_for_group(settings, 2, started)
        ids = produce(settings, _events(items))
        got = reader.wait_for(ids, WAIT_S, alive=lambda: all(w.alive for w in started))
        logs = "\n".join(w.log_tail() for w in started)
        assert not missing(ids, got), f"{missing(ids, got)}\n{logs}"
    decided = one_decision(got)
    by_partition = Counter(seen[0].partition for seen in got.values())
    for group in groups:
        members = {i for i, _ in group}
        admitted = [i for i in members if decided[i][0] == "kept"]
        assert len(admitted) == 1, f"group {sorted(members)} admitted {admitted}"
        for i in members - set(admitted):
            assert decided[i][2] in members, (i, decided[i])
    client = redis_client(settings.redis)
    try:
        assert int(client.execute_command("VCARD", vset_key(settings.redis.namespace))) == len(
            groups)
    finally:
        client.close()
    print(f"\n[pipeline] race: {len(items)} events in {len(groups)} groups over 4 partitions "
          f"(outcomes per output partition {dict(sorted(by_partition.items()))}); one "
          "admitted per group")
