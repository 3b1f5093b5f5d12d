"""The server-side Lua scripts of ``agents.buffers.ClassBuffers``.

Each change to one partition's buffers is one script, so two calls never interleave and a
crash never leaves half an update. Every script touches the keys of one partition only
(one Redis Cluster hash tag), except ``ADMIT_LABEL``, which touches the namespace's label
set alone. The key layout is in ``agents.buffers``.
"""

from __future__ import annotations

# Shared: a sample leaving the buffer expires after retain seconds (0: at once).
_RELEASE = """
local function release(skey, retain)
  if retain > 0 then redis.call('EXPIRE', skey, retain) else redis.call('DEL', skey) end
end
"""

# The supply hash keeps, per class, ``u:<label>``: the uses left in its queued samples
# (each counts ``max(cap - uses, 1)``: a queued sample is drawn at least once more) and
# ``f:<label>``: its queued samples never drawn. Every script that adds, evicts or draws
# keeps it exact; one that meets a queued id whose payload is gone (it cannot know that
# sample's uses) sets ``x:<label>``, and ``SUPPLY`` counts that class again.

# Shared: take up to ``want`` samples of one class list into ``out``, oldest first; a
# drawn sample's use count goes up, below the cap it goes back to the tail, at the cap it
# leaves. Each id present at the start is visited at most once (re-queued ids go behind).
_DRAW_CLASS = _RELEASE + """
local function draw_class(qkey, label, supply, want, excluded, cap, retain, prefix, out)
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
      redis.call('HINCRBY', supply, 'u:' .. label, -1)
      if uses == 1 then redis.call('HINCRBY', supply, 'f:' .. label, -1) end
      if uses < cap then redis.call('RPUSH', qkey, id) else release(skey, retain) end
    else
      redis.call('HSET', supply, 'x:' .. label, 1)
    end
  end
end
"""

# KEYS: seen, class list, classes, evictions, outbox index, supply, seen order (zset),
#       seen arrival counter, evictions of samples never used
# ARGV: id, label, buffer_cap, seen_ttl, retain, sample-key prefix, mark, reuse_cap,
#       seen_cap, field, value, ...
# Returns {1 if new else 0, the mark the id was first added with ('' if none), unsent}.
# The mark is '@<offset>' (the samples offset that added it) or '1' (offset unknown).
ADD = _RELEASE + """
local id, label = ARGV[1], ARGV[2]
local cap, ttl, retain = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local prefix, mark, reuse = ARGV[6], ARGV[7], tonumber(ARGV[8])
local skey = prefix .. id
local unsent = redis.call('ZCARD', KEYS[5])
-- A replayed id is a no-op; the payload check also covers a seen-mark that expired.
local first = redis.call('HGET', KEYS[1], id)
if first or redis.call('EXISTS', skey) == 1 then
  return {0, first or '', unsent}
end
redis.call('HSET', KEYS[1], id, mark)
if ttl > 0 then redis.call('HEXPIRE', KEYS[1], ttl, 'FIELDS', 1, id) end
-- The idempotency memory is bounded by count too: the oldest ids are forgotten first.
local seencap = tonumber(ARGV[9])
if seencap > 0 then
  redis.call('ZADD', KEYS[7], redis.call('INCR', KEYS[8]), id)
  local over = redis.call('ZCARD', KEYS[7]) - seencap
  if over > 0 then
    local old = redis.call('ZPOPMIN', KEYS[7], over)
    for i = 1, #old, 2 do redis.call('HDEL', KEYS[1], old[i]) end
  end
end
redis.call('HSET', skey, 'uses', '0', unpack(ARGV, 10))
redis.call('RPUSH', KEYS[2], id)
redis.call('SADD', KEYS[3], label)
redis.call('HINCRBY', KEYS[6], 'u:' .. label, reuse)
redis.call('HINCRBY', KEYS[6], 'f:' .. label, 1)
local evicted, unused = 0, 0
while redis.call('LLEN', KEYS[2]) > cap do
  local old = prefix .. redis.call('LPOP', KEYS[2])
  local used = redis.call('HGET', old, 'uses')
  if used then
    local n = tonumber(used)
    redis.call('HINCRBY', KEYS[6], 'u:' .. label, -math.max(reuse - n, 1))
    if n == 0 then redis.call('HINCRBY', KEYS[6], 'f:' .. label, -1) end
  else
    redis.call('HSET', KEYS[6], 'x:' .. label, 1)
  end
  -- Only a sample that went into a batch can come back as a hard example.
  if used == '0' then
    redis.call('DEL', old)
    unused = unused + 1
  else
    release(old, retain)
  end
  evicted = evicted + 1
end
if evicted > 0 then redis.call('HINCRBY', KEYS[4], label, evicted) end
if unused > 0 then redis.call('HINCRBY', KEYS[9], label, unused) end
return {1, mark, unsent}
"""

# KEYS: supply, then one class list per class drawn
# ARGV: reuse_cap, retain, sample-key prefix, number of excluded ids, excluded ids...,
#       then one count per class list, then one label per class list
DRAW = _DRAW_CLASS + """
local cap, retain, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local nexcl = tonumber(ARGV[4])
local excluded = {}
for i = 1, nexcl do excluded[ARGV[4 + i]] = true end
local nclass = #KEYS - 1
local out = {}
for k = 1, nclass do
  draw_class(KEYS[1 + k], ARGV[4 + nexcl + nclass + k], KEYS[1],
             tonumber(ARGV[4 + nexcl + k]), excluded, cap, retain, prefix, out)
end
return out
"""

# The draw of one batch and its record, in one step: pop up to ``replays`` hard examples,
# draw the class counts (never a popped replay), and record every drawn row with the
# batch's meta under the outbox entry of ``sequence``, until the sender confirms it.
# KEYS: outbox index (zset), the entry (hash), next sequence (string), replay zset,
#       supply (hash), then one class list per class drawn
# ARGV: reuse_cap, retain, sample-key prefix, sequence, meta, replays, then one count per
#       class list, then one label per class list
# Returns {-1, next} when ``sequence`` is below the next free one (nothing done),
# {0} when nothing could be drawn (nothing recorded), or {1, {{replay flag, row}, ...}}.
COMPOSE = _DRAW_CLASS + """
local cap, retain, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local seq, meta, nrep = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local nextseq = tonumber(redis.call('GET', KEYS[3]) or '0')
if seq < nextseq then return {-1, nextseq} end
local replays, excluded = {}, {}
while #replays < nrep do
  local head = redis.call('ZPOPMIN', KEYS[4])
  if #head == 0 then break end
  local skey = prefix .. head[1]
  if redis.call('EXISTS', skey) == 1 then
    excluded[head[1]] = true
    replays[#replays + 1] = redis.call('HGETALL', skey)
  end
end
local drawn = {}
local nclass = #KEYS - 5
for k = 1, nclass do
  draw_class(KEYS[5 + k], ARGV[6 + nclass + k], KEYS[5], tonumber(ARGV[6 + k]), excluded,
             cap, retain, prefix, drawn)
end
local rows = {}
for _, row in ipairs(drawn) do rows[#rows + 1] = {'0', row} end
for _, row in ipairs(replays) do rows[#rows + 1] = {'1', row} end
if #rows == 0 then return {0} end
for i, r in ipairs(rows) do
  local fields = {i .. ':replay', r[1]}
  local row = r[2]
  for j = 1, #row, 2 do
    fields[#fields + 1] = i .. ':' .. row[j]
    fields[#fields + 1] = row[j + 1]
  end
  redis.call('HSET', KEYS[2], unpack(fields))
end
redis.call('HSET', KEYS[2], 'meta', meta, 'n', #rows)
redis.call('ZADD', KEYS[1], seq, seq)
redis.call('SET', KEYS[3], seq + 1)
return {1, rows}
"""

# What each class can still give: {label, waiting, uses left, fresh, ...}, sorted by label.
# A class whose counts are marked stale (``x:<label>``) or cannot be right (none yet:
# buffers written before the supply hash existed) is counted again from its queue, once:
# ids without a payload leave the queue (a draw would skip them anyway).
# KEYS: classes set, supply.  ARGV: class-list key prefix, sample-key prefix, reuse_cap
SUPPLY = """
local qprefix, prefix, cap = ARGV[1], ARGV[2], tonumber(ARGV[3])
local labels = redis.call('SMEMBERS', KEYS[1])
table.sort(labels)
local out = {}
for _, label in ipairs(labels) do
  local qkey = qprefix .. label
  local n = redis.call('LLEN', qkey)
  local u = tonumber(redis.call('HGET', KEYS[2], 'u:' .. label) or '-1')
  local f = tonumber(redis.call('HGET', KEYS[2], 'f:' .. label) or '-1')
  local stale = redis.call('HGET', KEYS[2], 'x:' .. label)
  if stale or u < n or u > cap * n or f < 0 or f > n then
    u, f = 0, 0
    local kept = {}
    for _, id in ipairs(redis.call('LRANGE', qkey, 0, -1)) do
      local used = redis.call('HGET', prefix .. id, 'uses')
      if used then
        local x = tonumber(used)
        kept[#kept + 1] = id
        u = u + math.max(cap - x, 1)
        if x == 0 then f = f + 1 end
      end
    end
    if #kept < n then
      redis.call('DEL', qkey)
      for i = 1, #kept, 1000 do
        redis.call('RPUSH', qkey, unpack(kept, i, math.min(i + 999, #kept)))
      end
      n = #kept
    end
    redis.call('HSET', KEYS[2], 'u:' .. label, u, 'f:' .. label, f)
    redis.call('HDEL', KEYS[2], 'x:' .. label)
  end
  out[#out + 1] = label
  out[#out + 1] = n
  out[#out + 1] = u
  out[#out + 1] = f
end
return out
"""

# KEYS: replay zset, replay counter.  ARGV: sample-key prefix, replay_cap, ids...
PUSH_REPLAY = """
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
POP_REPLAY = """
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

# KEYS: the namespace's label set.  ARGV: label, limit.  1: admitted (now or before).
ADMIT_LABEL = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
