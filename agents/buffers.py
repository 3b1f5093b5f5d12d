"""Per-class sample buffers of one samples partition, kept in Redis.

A sample acknowledged by the balance stage must survive a crash, so it is in Redis before
``add`` returns; every change is one server-side Lua script (``agents.buffer_scripts``), so
two calls never interleave and a crash never leaves half an update. A batch's draw and its
record are one script too (``compose``): the drawn rows and the batch's meta stay in the
outbox until the sender ``confirm``s the send, so a crash between the draw and the send
loses neither the batch nor the uses it consumed (``unsent`` gives it back to re-send).

Keys, under ``sluice:<namespace>:buf:{<partition>}`` (the braces are a Redis Cluster hash
tag: one partition's keys share a slot, which its scripts need):

| key                    | type   | holds                                                       |
|------------------------|--------|-------------------------------------------------------------|
| ``…:s:<id>``           | hash   | the sample: the BatchSample fields, ``digest``, ``uses``    |
| ``…:q:<label>``        | list   | ids of the class no batch has used yet, oldest first        |
| ``…:used:<label>``     | list   | ids of the class drawn below ``reuse_cap``, least recently  |
|                        |        | drawn first                                                 |
| ``…:classes``          | set    | every label ever buffered                                   |
| ``…:seen``             | hash   | id → ``@<offset>`` that first added it (field TTL         |
|                        |        | ``seen_ttl_s``): replays are no-ops                        |
| ``…:seen:order``       | zset   | the same ids by arrival, to forget the oldest beyond       |
|                        |        | ``seen_cap`` (``…:seen:seq`` counts the arrivals)          |
| ``…:evictions``        | hash   | label → samples evicted because the class was full          |
| ``…:evictions:unused`` | hash   | label → of those, evicted before any batch used them        |
| ``…:supply``           | hash   | ``u:<label>`` → uses left in the class's queued samples,    |
|                        |        | ``f:<label>`` → its queued samples never drawn (``supply``) |
| ``…:replay``           | zset   | hard examples to replay, by arrival                         |
| ``…:replay:seq``       | string | the replay arrival counter                                  |
| ``…:outbox``           | zset   | sequences of composed batches not yet confirmed sent       |
| ``…:outbox:<sequence>``| hash   | that batch: ``meta`` (JSON), ``n``, ``<i>:<field>`` per row |
| ``…:outbox:next``      | string | the next free batch sequence of the partition              |

A draw takes the most useful samples of a class first: those no batch has used, newest
first (the freshest data the model has not seen), then used ones, least recently drawn
first. A drawn sample joins the class's used list until it has been drawn ``reuse_cap``
times, so a scarce class is oversampled up to that cap. A class over ``buffer_cap`` evicts
the least useful: a used sample (least recently drawn) before one no batch has seen
(oldest first), so an overflowing pool keeps what training has not seen. A sample that
leaves the buffer after entering a batch (used up, or evicted after a use) keeps its
payload for ``retain_s`` seconds more, so feedback on it can still bring it back as a hard
example; one evicted before any use is deleted at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from redis.cluster import RedisCluster

from agents import buffer_scripts
from agents.config import BalanceSettings
from agents.identity import store_id
from agents.keys import buffer_prefix, labels_key
from agents.sustain import Supply
from schemas.errors import SluiceError


class BufferStoreError(SluiceError):
    """A sample cannot be buffered or drawn (bad sample, Redis unreachable or refusing)."""


class SequenceTaken(BufferStoreError):
    """A batch sequence below the partition's next free one was asked for (the caller's
    state is behind the buffers'); ``next`` is the next free one."""

    def __init__(self, sequence: int, next_free: int) -> None:
        super().__init__(f"batch sequence {sequence} is taken; the next free one is "
                         f"{next_free}")
        self.next = next_free


class Admitted(NamedTuple):
    """What ``admit`` found."""

    new: bool
    """The id was buffered now (False: it had been before)."""
    first_offset: int | None
    """The samples offset that first buffered the id (None: not known)."""
    unsent: int
    """Composed batches recorded in the outbox and not yet confirmed sent."""


@dataclass(frozen=True)
class Recorded:
    """A composed batch as the outbox keeps it: what re-sending it needs."""

    sequence: int
    meta: dict[str, Any]
    """What the composer stored with the draw (JSON-able)."""
    rows: list[dict[str, Any]]
    """The drawn samples in draw order (``draw``'s form), replays last."""


SAMPLE_FIELDS = ("id", "label", "kind", "source", "content", "digest", "embedding",
                 "embedding_dim")
_TEXT_FIELDS = ("id", "label", "kind", "source", "content", "digest")

class ClassBuffers:
    """Bounded per-class buffers of one samples partition (see the module doc).

    ``buffer_cap`` bounds each class list, ``reuse_cap`` the draws of one sample;
    ``seen_ttl_s`` is how long an added id is remembered for idempotency (None: forever;
    keep it at least the samples topic's retention) and ``seen_cap`` how many at most
    (the oldest forgotten first; None: no bound, about 95 bytes of Redis per id without
    it, 190 with it), ``retain_s`` how long a sample's
    payload outlives its last buffered use, ``replay_cap`` bounds the replay queue
    (default ``buffer_cap``). The client must return bytes (no ``decode_responses``).
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        namespace: str,
        partition: int,
        buffer_cap: int,
        reuse_cap: int,
        *,
        seen_ttl_s: int | None = 7 * 24 * 3600,
        seen_cap: int | None = 100_000,
        retain_s: int = 600,
        replay_cap: int | None = None,
    ) -> None:
        if buffer_cap < 1 or reuse_cap < 1:
            raise BufferStoreError(
                f"buffer_cap and reuse_cap must be >= 1 (got {buffer_cap}, {reuse_cap})"
            )
        if redis_client.get_connection_kwargs().get("decode_responses"):
            raise BufferStoreError("ClassBuffers needs a bytes Redis client (decode_responses off)")
        self.redis = redis_client
        self.namespace = namespace
        self.partition = int(partition)
        self.buffer_cap = int(buffer_cap)
        self.reuse_cap = int(reuse_cap)
        self.seen_ttl_s = int(seen_ttl_s or 0)
        self.seen_cap = int(seen_cap or 0)
        self.retain_s = int(retain_s)
        self.replay_cap = int(replay_cap if replay_cap is not None else buffer_cap)
        self.prefix = buffer_prefix(namespace, self.partition)
        self._sample_prefix = f"{self.prefix}:s:"
        self._labels_key = labels_key(namespace)
        self._labels: set[str] = set()  # admitted labels seen here (never removed there)
        self._add = redis_client.register_script(buffer_scripts.ADD)
        self._draw = redis_client.register_script(buffer_scripts.DRAW)
        self._compose = redis_client.register_script(buffer_scripts.COMPOSE)
        self._push_replay = redis_client.register_script(buffer_scripts.PUSH_REPLAY)
        self._pop_replay = redis_client.register_script(buffer_scripts.POP_REPLAY)
        self._admit_label = redis_client.register_script(buffer_scripts.ADMIT_LABEL)
        self._supply = redis_client.register_script(buffer_scripts.SUPPLY)

    # -- keys ----------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def queue_key(self, label: str) -> str:
        """The Redis list of one class's samples no batch has used yet."""
        return self._key("q", label)

    def used_key(self, label: str) -> str:
        """The Redis list of one class's samples drawn and below ``reuse_cap``."""
        return self._key("used", label)

    def _class_keys(self, labels: Iterable[str]) -> list[str]:
        return [key for label in labels for key in (self.queue_key(label),
                                                     self.used_key(label))]

    def sample_key(self, sample_id: str) -> str:
        """The Redis hash of one sample."""
        return self._sample_prefix + sample_id

    # -- adding --------------------------------------------------------------------------
    def _add_call(self, sample: Mapping[str, Any], offset: int | None
                  ) -> tuple[list[str], list[Any]]:
        try:
            label = str(sample["label"])
            fields: list[Any] = []
            for name in SAMPLE_FIELDS:
                value = sample[name]
                fields += [name, bytes(value) if name == "embedding" else str(value)]
            keys = [self._key("seen"), self.queue_key(label), self._key("classes"),
                    self._key("evictions"), self._key("outbox"), self._key("supply"),
                    self._key("seen", "order"), self._key("seen", "seq"),
                    self._key("evictions", "unused"), self.used_key(label)]
            mark = "1" if offset is None else f"@{int(offset)}"
            # Keyed by its name in the stores: a later version of an id is a new sample.
            args = [store_id(sample), label, self.buffer_cap, self.seen_ttl_s,
                    self.retain_s, self._sample_prefix, mark, self.reuse_cap, self.seen_cap,
                    *fields]
        except (KeyError, TypeError, ValueError) as exc:
            raise BufferStoreError(
                f"sample {sample.get('id')!r} cannot be buffered: {exc!r}"
            ) from exc
        return keys, args

    def admit(self, sample: Mapping[str, Any], offset: int | None = None) -> Admitted:
        """Buffer a sample read at ``offset`` of its samples partition, unless its id was
        buffered before; say which, with the offset that first buffered it.

        Evicts the least useful samples of its class beyond ``buffer_cap`` (counted): used
        ones first, then the oldest never used.
        """
        keys, args = self._add_call(sample, offset)
        with _redis_errors("add"):
            return _admitted(self._add(keys=keys, args=args))

    def add(self, sample: Mapping[str, Any]) -> bool:
        """Buffer a sample (a CuratedSample dict); False if its id was already added."""
        return self.admit(sample).new

    def add_many(self, samples: Iterable[Mapping[str, Any]]) -> list[bool]:
        """``add`` for several samples, in one round trip on a single Redis (each still atomic
        on its own)."""
        calls = [self._add_call(s, None) for s in samples]
        if not calls:
            return []
        with _redis_errors("add"):
            if isinstance(self.redis, RedisCluster):
                # redis-py's cluster pipeline refuses scripts: one round trip each there.
                return [_admitted(self._add(keys=keys, args=args)).new for keys, args in calls]
            pipe = self.redis.pipeline(transaction=False)
            for keys, args in calls:
                self._add(keys=keys, args=args, client=pipe)
            return [_admitted(r).new for r in pipe.execute()]

    def admit_label(self, label: str, limit: int) -> bool:
        """Whether ``label`` is one of the namespace's classes, admitting it while there
        are fewer than ``limit`` (shared by every partition and worker; never shrinks)."""
        if label in self._labels:
            return True
        with _redis_errors("admit_label"):
            admitted = bool(self._admit_label(keys=[self._labels_key], args=[label, limit]))
        if admitted:
            self._labels.add(label)
        return admitted

    # -- drawing -------------------------------------------------------------------------
    def draw(
        self, counts: Mapping[str, int], exclude: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """Take up to ``counts[label]`` samples of each class, atomically: never-used ones
        newest first, then used ones least recently drawn first.

        Classes come in the order of ``counts``. Each drawn sample's use count goes up;
        below ``reuse_cap`` it joins the tail of its class's used list, at the cap it
        leaves the buffer. Ids in ``exclude`` (e.g. this batch's replays) are skipped without a
        use. A class with fewer samples than asked gives what it has, never one twice.
        """
        wanted = [(label, int(n)) for label, n in counts.items() if n > 0]
        if not wanted:
            return []
        excluded = list(dict.fromkeys(exclude))
        keys = [self._key("supply"), *self._class_keys(label for label, _ in wanted)]
        args: list[str | int] = [self.reuse_cap, self.retain_s, self._sample_prefix,
                                 len(excluded), *excluded, *(n for _, n in wanted),
                                 *(label for label, _ in wanted)]
        with _redis_errors("draw"):
            rows = self._draw(keys=keys, args=args)
        return [_decode_sample(row, replay=False) for row in rows]

    # -- composing, with a record until the send is confirmed ----------------------------
    def compose(self, sequence: int, counts: Mapping[str, int], replays: int,
                meta: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Draw one batch and record it as ``sequence`` in the outbox, atomically.

        Pops up to ``replays`` queued hard examples (marked ``replay``, last), draws
        ``counts`` as ``draw`` does (never one of those replays), and keeps the rows with
        ``meta`` until ``confirm(sequence)``. Returns the rows (empty: nothing to draw,
        nothing recorded). ``SequenceTaken`` when ``sequence`` is below the next free one.
        """
        wanted = [(label, int(n)) for label, n in counts.items() if n > 0]
        keys = [self._key("outbox"), self._key("outbox", str(sequence)),
                self._key("outbox", "next"), self._key("replay"), self._key("supply"),
                *self._class_keys(label for label, _ in wanted)]
        args: list[Any] = [self.reuse_cap, self.retain_s, self._sample_prefix, int(sequence),
                           json.dumps(meta, sort_keys=True), max(int(replays), 0),
                           *(n for _, n in wanted), *(label for label, _ in wanted)]
        with _redis_errors("compose"):
            reply = self._compose(keys=keys, args=args)
        if int(reply[0]) < 0:
            raise SequenceTaken(sequence, int(reply[1]))
        if int(reply[0]) == 0:
            return []
        return [_decode_sample(row, replay=flag == b"1") for flag, row in reply[1]]

    def unsent(self) -> list[Recorded]:
        """The composed batches not yet confirmed sent, oldest first."""
        with _redis_errors("unsent"):
            members: list[bytes] = self.redis.zrange(  # type: ignore[assignment]
                self._key("outbox"), 0, -1)
            sequences = [int(m) for m in members]
            pipe = self.redis.pipeline(transaction=False)
            for sequence in sequences:
                pipe.hgetall(self._key("outbox", str(sequence)))
            entries = pipe.execute()
        out = []
        for sequence, entry in zip(sequences, entries, strict=True):
            if entry:
                out.append(_recorded(sequence, entry))
        return out

    def confirm(self, sequence: int) -> None:
        """The batch ``sequence`` was delivered: forget its record."""
        with _redis_errors("confirm"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(self._key("outbox"), str(sequence))
            pipe.delete(self._key("outbox", str(sequence)))
            pipe.execute()

    # -- hard-example replay -------------------------------------------------------------
    def push_replay(self, ids: Iterable[str]) -> int:
        """Queue hard examples for replay; returns how many were queued.

        Ids whose payload is gone or that are already queued are skipped.
        """
        ids = list(ids)
        if not ids:
            return 0
        with _redis_errors("push_replay"):
            return int(
                self._push_replay(
                    keys=[self._key("replay"), self._key("replay", "seq")],
                    args=[self._sample_prefix, self.replay_cap, *ids],
                )
            )

    def pop_replay(self, n: int) -> list[dict[str, Any]]:
        """Take up to ``n`` queued hard examples, oldest first, marked ``replay``.

        Queued ids whose payload has expired meanwhile are dropped. A replay does not
        count as a use.
        """
        if n <= 0:
            return []
        with _redis_errors("pop_replay"):
            rows = self._pop_replay(keys=[self._key("replay")], args=[self._sample_prefix, n])
        return [_decode_sample(row, replay=True) for row in rows]

    # -- state ---------------------------------------------------------------------------
    def classes(self) -> list[str]:
        """Every label ever buffered in this partition, sorted."""
        with _redis_errors("classes"):
            members = self.redis.smembers(self._key("classes"))
        return sorted(_text(m) for m in members)

    def sizes(self) -> dict[str, int]:
        """Samples waiting per class (what ``allocate`` may use as availability)."""
        labels = self.classes()
        with _redis_errors("sizes"):
            pipe = self.redis.pipeline(transaction=False)
            for label in labels:
                pipe.llen(self.queue_key(label))
                pipe.llen(self.used_key(label))
            lengths = [int(n) for n in pipe.execute()]
            return {label: lengths[2 * i] + lengths[2 * i + 1]
                    for i, label in enumerate(labels)}

    def supply(self) -> dict[str, Supply]:
        """What each class can still give, in one round trip: samples waiting, the uses
        left in them and how many were never drawn (``agents.sustain.sustainable_caps``
        paces the draws by it). Kept exact by every script that adds, evicts or draws; a
        class whose counts are missing (buffers from before they were kept), marked stale (a
        draw or an eviction met a queued id whose payload was gone) or impossible is counted
        again from its queue, once."""
        with _redis_errors("supply"):
            flat = self._supply(keys=[self._key("classes"), self._key("supply")],
                                args=[self.queue_key(""), self.used_key(""),
                                      self._sample_prefix, self.reuse_cap])
        return {_text(flat[i]): Supply(int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
                for i in range(0, len(flat), 4)}

    def evictions(self, unused: bool = False) -> dict[str, int]:
        """Samples evicted per class since the buffers began; with ``unused``, only those
        evicted before any batch used them (data the stream offered and training never
        saw: the pool overflowed)."""
        key = self._key("evictions", "unused") if unused else self._key("evictions")
        with _redis_errors("evictions"):
            raw = self.redis.hgetall(key)
        return {_text(k): int(v) for k, v in sorted(raw.items())}

    def replay_size(self) -> int:
        """Hard examples waiting for replay."""
        with _redis_errors("replay_size"):
            return int(self.redis.zcard(self._key("replay")))

    def clear(self) -> int:
        """Delete every key of this partition's buffers; returns how many."""
        deleted = 0
        with _redis_errors("clear"):
            batch: list[bytes] = []
            for key in self.redis.scan_iter(match=_glob_escape(self.prefix) + ":*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(self.redis.delete(*batch))
                    batch = []
            if batch:
                deleted += int(self.redis.delete(*batch))
        return deleted


def _admitted(reply: Sequence[Any]) -> Admitted:
    mark = _text(reply[1])
    return Admitted(bool(int(reply[0])), int(mark[1:]) if mark.startswith("@") else None,
                    int(reply[2]))


def _recorded(sequence: int, entry: Mapping[bytes, bytes]) -> Recorded:
    """An outbox entry: ``meta``, ``n`` and ``<i>:<field>`` per row (1-based)."""
    rows: dict[int, dict[bytes, bytes]] = {}
    for key, value in entry.items():
        index, sep, name = key.partition(b":")
        if sep:
            rows.setdefault(int(index), {})[name] = value
    samples = [_decode_sample(rows[i], replay=rows[i].pop(b"replay", b"0") == b"1")
               for i in sorted(rows)]
    return Recorded(sequence, json.loads(entry[b"meta"]), samples)


def _decode_sample(row: Sequence[bytes] | Mapping[bytes, bytes], replay: bool
                   ) -> dict[str, Any]:
    raw = row if isinstance(row, Mapping) else dict(zip(row[::2], row[1::2], strict=True))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode()
        if name in _TEXT_FIELDS:
            out[name] = value.decode("utf-8")
        elif name == "embedding":
            out[name] = bytes(value)
        elif name in ("embedding_dim", "uses"):
            out[name] = int(value)
    out["replay"] = replay
    return out


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


@contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise BufferStoreError(f"Redis refused buffer {what}: {exc}") from exc


def buffers_for(client: redis.Redis, namespace: str, partition: int,
                settings: BalanceSettings) -> ClassBuffers:
    """The class buffers of one samples partition, sized by the balance settings."""
    return ClassBuffers(client, namespace, partition, settings.buffer_cap, settings.reuse_cap,
                        seen_ttl_s=settings.seen_ttl_s or None,
                        seen_cap=settings.seen_cap or None, retain_s=settings.retain_s)
