"""``sluice shards``: the coarse centroids of a sharded semantic index (``dedup.shards`` > 1).

- ``fit CORPUS... --shards N``: a sample of the corpus (read as ``sluice produce`` reads
  it, the kinds and classes the semantic layer embeds) is embedded by the product's own
  embedder (``dedup.model``, ``dedup.backend``); with ``--from-index``, a sample of the
  FP32 vectors already admitted in the namespace instead. Spherical k-means
  (``agents.shards.kmeans``) makes N unit centroids, written as a new version
  (``agents.centroid_store.CentroidStore``). When the namespace holds nothing yet, the new
  version is used at once; otherwise it waits for ``migrate``.
- ``migrate``: moves every admitted item (its FP32 vector is stored) from the index in use
  (one set, or the shards of the current version) into the newest version's shards,
  through that version's own ``admit`` (so routing and decisions are the workers'), oldest
  first; an item that now finds a near copy in its probes (a pair that straddled a border
  before) is not moved (``merged``). Then the new version is switched on (running workers
  follow at their next call), what workers admitted to the old version meanwhile is moved
  too (a second pass after ``MIGRATE_GRACE_S``), and the old keys are dropped (unless
  ``keep_old``). The items keep their admission times (the horizon's age) except those of
  the second pass. A call still running on the old version after the second pass would
  leave its items out of the new index (they were still admitted as samples; only their
  blocking of later copies is lost): stop the dedup workers during a migration when that
  matters. Run one migration at a time.
- ``status``: the version in use, the newest fitted, and each shard's size and node.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.cluster import RedisCluster
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.centroid_store import CentroidStore
from agents.config import DedupSettings
from agents.index import VectorIndex, vector_of
from agents.pipeline import load_embedder
from agents.planting import gather
from agents.sharded_index import ShardedIndex
from agents.shards import Centroids, ShardsError, kmeans, route
from sluice.settings import Settings
from streams.connections import redis_client

#: Fewest sample vectors per shard a fit accepts (fewer make arbitrary borders).
MIN_PER_SHARD = 10
#: Seconds between switching a migration's version on and its second pass: every worker
#: reads the version at the start of each call, so a call begun before the switch ends
#: within about this.
MIGRATE_GRACE_S = 5.0


@dataclass
class Fit:
    """What ``fit`` did: the version written, whether it is in use, the sample's spread."""

    centroids: Centroids
    active: bool
    sample_per_shard: list[int]


@dataclass
class Migration:
    """What ``migrate`` did: the versions, and the items by outcome (``moved``,
    ``merged``: a near copy of an item moved before it; ``already``: moved by an earlier
    run; ``late``: moved by the second pass; ``gone``: removed while being moved)."""

    source: int | None
    target: int
    counts: Counter[str] = field(default_factory=Counter)
    dropped_old: bool = False


def embeds(dedup: DedupSettings, event: dict[str, Any]) -> bool:
    """Whether the semantic layer embeds this record (``agents.semantic.SemanticDedup``'s
    rule: its kind, and its class, as the settings choose)."""
    label = event.get("label")
    return (event.get("kind") in dedup.kinds and label not in dedup.skip_labels
            and (not dedup.labels or label in dedup.labels))


def corpus_sample(settings: Settings, paths: Sequence[Path], limit: int, seed: int,
                  console: Console) -> np.ndarray:
    """Up to ``limit`` records of ``paths`` embedded by the configured embedder."""
    with console.status("reading the corpus"):
        events = [e for e in gather(list(paths), limit, settings.produce.max_file_bytes,
                                    seed=seed) if embeds(settings.dedup, e)]
    if not events:
        raise ShardsError(f"no record under {', '.join(map(str, paths))} that the semantic "
                          "layer embeds (dedup.kinds, labels, skip_labels)")
    with console.status("loading the embedding model"):
        embedder = load_embedder(settings)
    step = settings.dedup.encode_batch_size
    chunks = []
    with _progress(console, "embedding") as progress:
        task = progress.add_task("embedding", total=len(events))
        for start in range(0, len(events), step):
            texts = [e["content"] for e in events[start:start + step]]
            chunks.append(embedder.encode(texts))
            progress.advance(task, len(texts))
    return np.vstack(chunks)


def index_in_use(client: redis.Redis, namespace: str, dedup: DedupSettings
                 ) -> tuple[int | None, list[VectorIndex], ShardedIndex | None]:
    """The namespace's index in use: its centroid version (None: one set), its sets, and
    the sharded index over them (None: one set)."""
    store = CentroidStore(client, namespace)
    current = store.current()
    if current is None:
        return None, [VectorIndex(client, namespace, dedup)], None
    sharded = ShardedIndex(client, namespace, dedup.model_copy(
        update={"shards": current.shards}), current, follow=False)
    return current.version, sharded.shards, sharded


def index_sample(client: redis.Redis, namespace: str, dedup: DedupSettings, limit: int
                 ) -> np.ndarray:
    """Up to ``limit`` FP32 vectors admitted in the namespace (``HRANDFIELD``, from each
    set in proportion to its size)."""
    _, sets, _ = index_in_use(client, namespace, dedup)
    sizes = [int(client.hlen(s.vectors_key)) for s in sets]
    total = sum(sizes)
    if not total:
        raise ShardsError(f"namespace {namespace!r} holds no admitted vectors to sample: "
                          "fit on a corpus instead")
    rows = []
    for shard, size in zip(sets, sizes, strict=True):
        want = min(size, math.ceil(limit * size / total))
        if want:
            reply: Any = client.hrandfield(shard.vectors_key, want, withvalues=True)
            dim = shard.dim() or 0
            rows += [vector_of(v, dim) for v in reply[1::2]]
    return np.stack(rows[:limit]).astype(np.float32)


def fit(settings: Settings, paths: Sequence[Path], *, shards: int, from_index: bool = False,
        limit: int = 5000, seed: int = 0, namespace: str | None = None,
        console: Console | None = None) -> Fit:
    """Fit ``shards`` centroids on a sample and write them as a new version (see the
    module doc); used at once when the namespace holds nothing to move."""
    console = console or Console(stderr=True)
    if shards < 2:
        raise ShardsError(f"--shards {shards}: a sharded index needs at least 2 shards")
    if not from_index and not paths:
        raise ShardsError("name a corpus to sample (files, folders, JSONL), or pass "
                          "--from-index to sample the vectors already admitted")
    ns = namespace or settings.redis.namespace
    client = redis_client(settings.redis)
    try:
        vectors = (index_sample(client, ns, settings.dedup, limit) if from_index
                   else corpus_sample(settings, paths, limit, seed, console))
        if len(vectors) < shards * MIN_PER_SHARD:
            raise ShardsError(f"{len(vectors)} sample vectors for {shards} shards: at least "
                              f"{MIN_PER_SHARD} per shard are needed (more files, or a "
                              "higher --limit)")
        with console.status(f"k-means: {shards} centroids of {len(vectors):,} vectors"):
            matrix = kmeans(vectors, shards, seed=seed)
        store = CentroidStore(client, ns)
        centroids = store.save(matrix, samples=len(vectors), model=settings.dedup.model,
                               source="index" if from_index else "corpus")
        version, sets, _ = index_in_use(client, ns, settings.dedup)
        empty = version is None and not any(s.size() for s in sets)
        if empty:
            store.activate(centroids.version)
        sample = np.bincount(route(vectors, matrix, 1)[:, 0], minlength=shards).tolist()
        return Fit(centroids, empty, sample)
    finally:
        client.close()


def migrate(settings: Settings, *, namespace: str | None = None, keep_old: bool = False,
            console: Console | None = None, grace_s: float = MIGRATE_GRACE_S) -> Migration:
    """Move the admitted items into the newest centroid version and switch to it (see the
    module doc)."""
    console = console or Console(stderr=True)
    ns = namespace or settings.redis.namespace
    client = redis_client(settings.redis)
    try:
        store = CentroidStore(client, ns)
        latest = store.latest_version()
        source_version, sources, old = index_in_use(client, ns, settings.dedup)
        if not latest or (source_version is not None and latest <= source_version):
            raise ShardsError(f"namespace {ns!r} has no centroid version newer than the one "
                              "in use: fit one first (`sluice shards fit`)")
        newest = store.load(latest)
        target = ShardedIndex(client, ns, settings.dedup.model_copy(
            update={"shards": newest.shards}), newest, follow=False)
        report = Migration(source_version, latest)
        moved: set[str] = set()
        # Pass 1, while workers still admit to the old version: nobody else writes the new
        # one, so the items may take their old admission times back.
        _move(client, sources, target, moved, report.counts, console, restore_times=True)
        store.activate(latest)
        time.sleep(grace_s)
        _move(client, sources, target, moved, report.counts, console, restore_times=False,
              late=True)
        if not keep_old:
            if old is not None:
                old.clear()
            else:
                for source in sources:
                    source.clear()
            report.dropped_old = True
        return report
    finally:
        client.close()


def _move(client: redis.Redis, sources: list[VectorIndex], target: ShardedIndex,
          moved: set[str], counts: Counter[str], console: Console, *,
          restore_times: bool, late: bool = False) -> None:
    """Admit every item of ``sources`` not yet in ``moved`` into ``target``, oldest first
    (by admission time; items a dead worker left out of the log last)."""
    order: list[tuple[float, int, str]] = []
    for n, source in enumerate(sources):
        logged = {}
        for member, score in client.zscan_iter(source.log_key):
            logged[_text(member)] = float(score)
        order += [(score, n, item_id) for item_id, score in logged.items()
                  if item_id not in moved]
        for member in client.hscan_iter(source.vectors_key, no_values=True):
            item_id = _text(member)
            if item_id not in logged and item_id not in moved:
                order.append((math.inf, n, item_id))
    order.sort()
    dims = [source.dim() or 0 for source in sources]
    batch = target.settings.batch_size
    with _progress(console, "moving (second pass)" if late else "moving") as progress:
        task = progress.add_task("moving", total=len(order))
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            pipe = client.pipeline(transaction=False)
            for _, n, item_id in chunk:
                pipe.hget(sources[n].vectors_key, item_id)
            blobs = pipe.execute()
            present = [(entry, blob) for entry, blob in zip(chunk, blobs, strict=True)
                       if blob is not None]
            counts["gone"] += len(chunk) - len(present)
            moved.update(item_id for _, _, item_id in chunk)
            if present:
                ids = [item_id for (_, _, item_id), _ in present]
                vectors = np.stack([vector_of(blob, dims[n]) for (_, n, _), blob in present])
                decided = target.admit(ids, vectors)
                for admission in decided:
                    counts["already" if admission.already else "late" if late and
                           admission.keep else "moved" if admission.keep else "merged"] += 1
                if restore_times:
                    _restore_times(client, target, present, decided, vectors)
            progress.advance(task, len(chunk))


def _restore_times(client: redis.Redis, target: ShardedIndex, present: list[Any],
                   decided: list[Any], vectors: np.ndarray) -> None:
    """Give the moved items their old admission times in the new logs (``ZADD XX``)."""
    homes = route(vectors, target.centroids.matrix, 1)[:, 0]
    pipe = client.pipeline(transaction=False)
    for ((score, _, item_id), _), admission, home in zip(present, decided, homes,
                                                          strict=True):
        if admission.keep and not admission.already and math.isfinite(score):
            pipe.zadd(target.shards[int(home)].log_key, {item_id: score}, xx=True)
    pipe.execute()


def status(settings: Settings, *, namespace: str | None = None,
           console: Console | None = None) -> None:
    """Print the version in use, the newest fitted, and each shard's size and node."""
    console = console or Console()
    ns = namespace or settings.redis.namespace
    client = redis_client(settings.redis)
    try:
        store = CentroidStore(client, ns)
        latest = store.latest_version()
        version, sets, _ = index_in_use(client, ns, settings.dedup)
        if version is None:
            console.print(f"namespace {ns!r}: one vector set, {sets[0].size():,} items "
                          f"(dedup.shards = {settings.dedup.shards})")
        else:
            c = store.load(version)
            console.print(f"namespace {ns!r}: centroid version {version}, {c.shards} shards "
                          f"of dimension {c.dim}, fitted {_when(c.fitted_at)} on "
                          f"{c.samples:,} vectors ({c.source}, {c.model}); dedup.shards = "
                          f"{settings.dedup.shards}, probe = {settings.dedup.probes}")
            table = Table("shard", "items", "node", box=None)
            for n, shard in enumerate(sets):
                node = (client.get_node_from_key(shard.key).name
                        if isinstance(client, RedisCluster) else "-")
                table.add_row(str(n), f"{shard.size():,}", node)
            console.print(table)
        if latest and (version is None or latest > version):
            c = store.load(latest)
            console.print(f"centroid version {latest} ({c.shards} shards, fitted "
                          f"{_when(c.fitted_at)}) is not in use yet: `sluice shards migrate`")
    finally:
        client.close()


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def _progress(console: Console, title: str) -> Progress:
    return Progress(TextColumn(f"[bold]{title}"), BarColumn(bar_width=None),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
