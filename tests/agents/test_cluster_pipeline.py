"""The curation pipeline on a three-master Redis Cluster: real `sluice worker` processes
(Faust), the session's Kafka, the session's Redis Cluster (conftest's ``cluster_stack``),
the real embedding model, real stdlib code with planted copies.

The same guarantees as ``test_pipeline`` on a single Redis: two workers of one group race
over groups of near-copies and admit exactly one member of each; then every event is
produced again with the same id, and no decision changes. The exact claims and first-digest
keys spread over the three masters; the fuzzy index, the vector set and each partition's
buffers live in one slot each (their hash tags).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from redis.cluster import RedisCluster

from agents.keys import exact_key, vset_key
from agents.normalize import content_digest, normalize
from sluice.settings import Settings
from streams.connections import redis_client
from tests.agents.pipeline_util import (
    EDITS,
    OutcomeReader,
    Seen,
    corpus,
    isolated,
    missing,
    one_decision,
    produce,
    raw_event,
    wait_for_group,
    workers,
)

pytestmark = pytest.mark.integration

WAIT_S = 240.0  # a deadline for failures only


@dataclass
class Raced:
    """What the two workers decided, first time and on the replay."""

    settings: Settings
    groups: list[list[tuple[str, str]]] = field(default_factory=list)
    first: dict[str, list[Seen]] = field(default_factory=dict)
    replayed: dict[str, list[Seen]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def raced(cluster_stack: Settings, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Raced]:
    """Two workers, four partitions: groups of near-copies spread over the partitions, so
    both workers meet members of one group at once; then the same events again."""
    settings = isolated(cluster_stack, partitions=4)
    assert settings.redis.cluster
    run = Raced(settings)
    for snippet in corpus(6, start=40):  # cliques: every two members are copies
        run.groups.append([(f"g-{edit}-{snippet.name}", EDITS[edit](snippet.text))
                           for edit in ("exact", "whitespace", "comment")]
                          + [(f"g-orig-{snippet.name}", snippet.text)])
    for snippet in corpus(4, start=50):
        run.groups.append([(f"g-rename-{snippet.name}", EDITS["rename"](snippet.text)),
                           (f"g-orig-{snippet.name}", snippet.text)])
    events = [raw_event(i, text) for group in run.groups for i, text in group]
    folder = tmp_path_factory.mktemp("cluster-pipeline")
    with workers(settings, "ingest,dedup", folder, count=2) as started, \
            OutcomeReader(settings) as reader:
        wait_for_group(settings, 2, started)
        ids = produce(settings, events)

        def alive() -> bool:
            return all(w.alive for w in started)

        got = reader.wait_for(ids, WAIT_S, alive=alive)
        logs = "\n".join(w.log_tail() for w in started)
        assert not missing(ids, got), f"{missing(ids, got)}\n{logs}"
        run.first = {i: list(seen) for i, seen in got.items()}
        produce(settings, events)  # the same ids, the same content: a replay
        twice = reader.wait_until(
            lambda r: all(len(r.by_id().get(i, [])) >= 2 for i in ids), WAIT_S)
        assert twice, "replayed events without an outcome\n" + "\n".join(
            w.log_tail() for w in started)
        run.replayed = reader.by_id()
    yield run


def test_two_workers_on_a_cluster_admit_exactly_one_of_each_group(raced: Raced) -> None:
    decided = one_decision(raced.first)
    for group in raced.groups:
        members = {i for i, _ in group}
        admitted = [i for i in members if decided[i][0] == "kept"]
        assert len(admitted) == 1, f"group {sorted(members)} admitted {admitted}"
        for i in members - set(admitted):
            assert decided[i][2] in members, (i, decided[i])
    client = redis_client(raced.settings.redis)
    try:
        assert isinstance(client, RedisCluster)
        key = vset_key(raced.settings.redis.namespace)
        assert int(client.execute_command("VCARD", key)) == len(raced.groups)
        # The exact claims went to every master; the vector set is one key on one.
        claims = {exact_key(raced.settings.redis.namespace, content_digest(normalize(text)))
                  for group in raced.groups for _, text in group}
        assert all(client.exists(k) for k in claims)
        assert len({client.get_node_from_key(k).name for k in claims}) == 3
    finally:
        client.close()


def test_a_replay_on_a_cluster_changes_no_outcome(raced: Raced) -> None:
    """Every id keeps its first decision: an admitted id is "already admitted", never a
    duplicate of itself; a duplicate still names the same original."""
    assert all(len(seen) >= 2 for seen in raced.replayed.values())
    assert one_decision(raced.replayed) == one_decision(raced.first)
