"""Per-class sample buffers of one samples partition, kept in Redis.

A sample acknowledged by the balance stage must survive a crash, so it is in Redis before
``add`` returns; every change is one server-side Lua script, so two calls never interleave
and a crash never leaves half an update.

Keys, under ``sluice:<namespace>:buf:{<partition>}`` (the braces are a Redis Cluster hash
tag: one partition's keys share a slot, which its scripts need):

| key                    | type   | holds                                                       |
|------------------------|--------|-------------------------------------------------------------|
| ``…:s:<id>``           | hash   | the sample: the BatchSample fields, ``digest``, ``uses``    |
| ``…:q:<label>``        | list   | ids of the class waiting to be drawn, oldest first          |
| ``…:classes``          | set    | every label ever buffered                                   |
| ``…:seen``             | hash   | ids ever added (field TTL ``seen_ttl_s``): replays are no-ops|
| ``…:evictions``        | hash   | label → samples evicted because the class was full          |
| ``…:replay``           | zset   | hard examples to replay, by arrival                         |
| ``…:replay:seq``       | string | the replay arrival counter                                  |

A drawn sample goes back to the tail of its class list until it has been drawn
``reuse_cap`` times, so a scarce class is oversampled up to that cap. A sample that
leaves the buffer after entering a batch (used up, or evicted after a use) keeps its
payload for ``retain_s`` seconds more, so feedback on it can still bring it back as a hard
example; one evicted before any use is deleted at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis

from agents.config import BalanceSettings
from agents.keys import buffer_prefix
from schemas.errors import SluiceError


class BufferStoreError(SluiceError):
    """A sample cannot be buffered or drawn (bad sample, Redis unreachable or refusing)."""


SAMPLE_FIELDS = ("id", "label", "kind", "source", "content", "digest", "embedding",
                 "embedding_dim")
_TEXT_FIELDS = ("id", "label", "kind", "source", "content", "digest")

# Shared Lua: a sample leaving the buffer expires after retain seconds (0: at once).
_RELEASE = """
local function release(skey, retain)
  if retain > 0 then redis.call('EXPIRE', skey, retain) else redis.call('DEL', skey) end
end
"""

# KEYS: seen, class list, classes, evictions
# ARGV: id, label, buffer_cap, seen_ttl, retain, sample-key prefix, field, value, ...
_ADD = _RELEASE + """
local id, label = ARGV[1], ARGV[2]
local cap, ttl, retain = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local prefix = ARGV[6]
local skey = prefix .. id
-- A replayed id is a no-op; the payload check also covers a seen-mark that expired.
if redis.call('HEXISTS', KEYS[1], id) == 1 or redis.call('EXISTS', skey) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], id, '1')
if ttl > 0 then redis.call('HEXPIRE', KEYS[1], ttl, 'FIELDS', 1, id) end
redis.call('HSET', skey, 'uses', '0', unpack(ARGV, 7))
redis.call('RPUSH', KEYS[2], id)
redis.call('SADD', KEYS[3], label)
local evicted = 0
while redis.call('LLEN', KEYS[2]) > cap do
  local old = prefix .. redis.call('LPOP', KEYS[2])
  -- Only a sample that went into a batch can come back as a hard example.
  if redis.call('HGET', old, 'uses') == '0' then
    redis.call('DEL', old)
  else
    release(old, retain)
  end
  evicted = evicted + 1
end
if evicted > 0 then redis.call('HINCRBY', KEYS[4], label, evicted) end
return 1
"""

# KEYS: one class list per class drawn
# ARGV: reuse_cap, retain, sample-key prefix, number of excluded ids, excluded ids...,
#       then one count per KEYS entry
_DRAW = _RELEASE + """
local cap, retain, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local nexcl = tonumber(ARGV[4])
local excluded = {}
for i = 1, nexcl do excluded[ARGV[4 + i]] = true end
local out = {}
for k, qkey in ipairs(KEYS) do
  local want = tonumber(ARGV[4 + nexcl + k])
  -- Visit each id present at the start at most once: re-queued ids go behind them.
  local budget = redis.call('LLEN', qkey)
  local got = 0
  while got < want and budget > 0 do
    local id = redis.call('LPOP', qkey)
    budget = budget - 1
    local skey = prefix .. id
    if excluded[id] then
      redis.call('RPUSH', qkey, id)
    elseif redis.call('EXISTS', skey) == 1 then
      local uses = redis.call('HINCRBY', skey, 'uses', 1)
      out[#out + 1] = redis.call('HGETALL', skey)
      got = got + 1
      if uses < cap then redis.call('RPUSH', qkey, id) else release(skey, retain) end
    end
  end
end
return out
"""

# KEYS: replay zset, replay counter.  ARGV: sample-key prefix, replay_cap, ids...
_PUSH_REPLAY = """
local prefix, cap = ARGV[1], tonumber(ARGV[2])
local queued = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('EXISTS', prefix .. id) == 1 and not redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), id)
    queued = queued + 1
  end
end
-- Bounded: the oldest hard examples give way to the newest.
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(cap + 1))
return queued
"""

# KEYS: replay zset.  ARGV: sample-key prefix, n
_POP_REPLAY = """
local prefix, n = ARGV[1], tonumber(ARGV[2])
local out = {}
while #out < n do
  local head = redis.call('ZPOPMIN', KEYS[1])
  if #head == 0 then break end
  local skey = prefix .. head[1]
  if redis.call('EXISTS', skey) == 1 then out[#out + 1] = redis.call('HGETALL', skey) end
end
return out
"""


class ClassBuffers:
    """Bounded per-class buffers of one samples partition (see the module doc).

    ``buffer_cap`` bounds each class list, ``reuse_cap`` the draws of one sample;
    ``seen_ttl_s`` is how long an added id is remembered for idempotency (None: forever;
    keep it at least the samples topic's retention), ``retain_s`` how long a sample's
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
        retain_s: int = 600,
        replay_cap: int | None = None,
    ) -> None:
        if buffer_cap < 1 or reuse_cap < 1:
            raise BufferStoreError(
                f"buffer_cap and reuse_cap must be >= 1 (got {buffer_cap}, {reuse_cap})"
            )
        if redis_client.connection_pool.connection_kwargs.get("decode_responses"):
            raise BufferStoreError("ClassBuffers needs a bytes Redis client (decode_responses off)")
        self.redis = redis_client
        self.namespace = namespace
        self.partition = int(partition)
        self.buffer_cap = int(buffer_cap)
        self.reuse_cap = int(reuse_cap)
        self.seen_ttl_s = int(seen_ttl_s or 0)
        self.retain_s = int(retain_s)
        self.replay_cap = int(replay_cap if replay_cap is not None else buffer_cap)
        self.prefix = buffer_prefix(namespace, self.partition)
        self._sample_prefix = f"{self.prefix}:s:"
        self._add = redis_client.register_script(_ADD)
        self._draw = redis_client.register_script(_DRAW)
        self._push_replay = redis_client.register_script(_PUSH_REPLAY)
        self._pop_replay = redis_client.register_script(_POP_REPLAY)

    # -- keys ----------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def queue_key(self, label: str) -> str:
        """The Redis list of one class."""
        return self._key("q", label)

    def sample_key(self, sample_id: str) -> str:
        """The Redis hash of one sample."""
        return self._sample_prefix + sample_id

    # -- adding --------------------------------------------------------------------------
    def _add_call(self, sample: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
        try:
            label = str(sample["label"])
            fields: list[Any] = []
            for name in SAMPLE_FIELDS:
                value = sample[name]
                fields += [name, bytes(value) if name == "embedding" else str(value)]
            keys = [self._key("seen"), self.queue_key(label), self._key("classes"),
                    self._key("evictions")]
            args = [str(sample["id"]), label, self.buffer_cap, self.seen_ttl_s,
                    self.retain_s, self._sample_prefix, *fields]
        except (KeyError, TypeError) as exc:
            raise BufferStoreError(
                f"sample {sample.get('id')!r} cannot be buffered: {exc!r}"
            ) from exc
        return keys, args

    def add(self, sample: Mapping[str, Any]) -> bool:
        """Buffer a sample (a CuratedSample dict); False if its id was already added.

        Evicts the oldest samples of its class beyond ``buffer_cap`` (counted).
        """
        keys, args = self._add_call(sample)
        with _redis_errors("add"):
            return bool(self._add(keys=keys, args=args))

    def add_many(self, samples: Iterable[Mapping[str, Any]]) -> list[bool]:
        """``add`` for several samples in one round trip (each still atomic on its own)."""
        calls = [self._add_call(s) for s in samples]
        if not calls:
            return []
        with _redis_errors("add"):
            pipe = self.redis.pipeline(transaction=False)
            for keys, args in calls:
                self._add(keys=keys, args=args, client=pipe)
            return [bool(r) for r in pipe.execute()]

    # -- drawing -------------------------------------------------------------------------
    def draw(
        self, counts: Mapping[str, int], exclude: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """Take up to ``counts[label]`` samples of each class, atomically, oldest first.

        Classes come in the order of ``counts``. Each drawn sample's use count goes up;
        below ``reuse_cap`` it goes back to the tail of its class, at the cap it leaves
        the buffer. Ids in ``exclude`` (e.g. this batch's replays) are skipped without a
        use. A class with fewer samples than asked gives what it has, never one twice.
        """
        wanted = [(label, int(n)) for label, n in counts.items() if n > 0]
        if not wanted:
            return []
        excluded = list(dict.fromkeys(exclude))
        keys = [self.queue_key(label) for label, _ in wanted]
        args: list[str | int] = [self.reuse_cap, self.retain_s, self._sample_prefix,
                                 len(excluded), *excluded, *(n for _, n in wanted)]
        with _redis_errors("draw"):
            rows = self._draw(keys=keys, args=args)
        return [_decode_sample(row, replay=False) for row in rows]

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
            return dict(zip(labels, (int(n) for n in pipe.execute()), strict=True))

    def evictions(self) -> dict[str, int]:
        """Samples evicted per class since the buffers began."""
        with _redis_errors("evictions"):
            raw = self.redis.hgetall(self._key("evictions"))
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


def _decode_sample(row: Sequence[bytes], replay: bool) -> dict[str, Any]:
    raw = dict(zip(row[::2], row[1::2], strict=True))
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
                        seen_ttl_s=settings.seen_ttl_s or None, retain_s=settings.retain_s)
