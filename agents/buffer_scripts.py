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

# Shared: take up to ``want`` samples of one class into ``out``, the most useful first:
# samples no batch has used, newest first (the freshest data the model has not seen), then
# used ones below the cap, least recently drawn first (reuse spreads round the class). A
# drawn sample's use count goes up; below the cap it joins the tail of the used list, at
# the cap it leaves. Each id present at the start is visited at most once.
_DRAW_CLASS = _RELEASE + """
-- 1: drawn into out; 0: excluded (the caller puts it back); -1: its payload is gone.
local function take(id, qused, label, supply, excluded, cap, retain, prefix, out)
  if excluded[id] then return 0 end
  local skey = prefix .. id
  if redis.call('EXISTS', skey) == 0 then
    redis.call('HSET', supply, 'x:' .. label, 1)
    return -1
  end
  local uses = redis.call('HINCRBY', skey, 'uses', 1)
  out[#out + 1] = redis.call('HGETALL', skey)
  redis.call('HINCRBY', supply, 'u:' .. label, -1)
  if uses == 1 then redis.call('HINCRBY', supply, 'f:' .. label, -1) end
  if uses < cap then redis.call('RPUSH', qused, id) else release(skey, retain) end
  return 1
end
local function draw_class(qkey, qused, label, supply, want, excluded, cap, retain, prefix,
                          out)
  -- Only the used ids there now: those this call draws from qkey go behind them.
  local budget = redis.call('LLEN', qused)
  local got, skipped = 0, {}
  while got < want do
    local id = redis.call('RPOP', qkey)
    if not id then break end
    local r = take(id, qused, label, supply, excluded, cap, retain, prefix, out)
    if r == 0 then skipped[#skipped + 1] = id elseif r == 1 then got = got + 1 end
  end
  for i = #skipped, 1, -1 do redis.call('RPUSH', qkey, skipped[i]) end
  while got < want and budget > 0 do
    local id = redis.call('LPOP', qused)
    budget = budget - 1
    local r = take(id, qused, label, supply, excluded, cap, retain, prefix, out)
    if r == 0 then redis.call('RPUSH', qused, id) elseif r == 1 then got = got + 1 end
  end
end
"""

# KEYS: seen, class list, classes, evictions, outbox index, supply, seen order (zset),
#       seen arrival counter, evictions of samples never used, the class's used list
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
-- Over the cap, the least useful goes: a sample training has seen (least recently drawn
-- first) before one it has not (oldest first).
while redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[10]) > cap do
  local old = prefix .. (redis.call('LPOP', KEYS[10]) or redis.call('LPOP', KEYS[2]))
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

# KEYS: supply, then per class drawn its class list and its used list
# ARGV: reuse_cap, retain, sample-key prefix, number of excluded ids, excluded ids...,
#       then one count per class, then one label per class
DRAW = _DRAW_CLASS + """
local cap, retain, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local nexcl = tonumber(ARGV[4])
local excluded = {}
for i = 1, nexcl do excluded[ARGV[4 + i]] = true end
local nclass = (#KEYS - 1) / 2
local out = {}
for k = 1, nclass do
  draw_class(KEYS[2 * k], KEYS[2 * k + 1], ARGV[4 + nexcl + nclass + k], KEYS[1],
             tonumber(ARGV[4 + nexcl + k]), excluded, cap, retain, prefix, out)
end
return out
"""

# The draw of one batch and its record, in one step: pop up to ``replays`` hard examples,
# draw the class counts (never a popped replay), and record every drawn row with the
# batch's meta under the outbox entry of ``sequence``, until the sender confirms it.
# KEYS: outbox index (zset), the entry (hash), next sequence (string), replay zset,
#       supply (hash), then per class drawn its class list and its used list
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
local nclass = (#KEYS - 5) / 2
for k = 1, nclass do
  draw_class(KEYS[4 + 2 * k], KEYS[5 + 2 * k], ARGV[6 + nclass + k], KEYS[5],
             tonumber(ARGV[6 + k]), excluded, cap, retain, prefix, drawn)
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
# buffers written before the supply hash existed) is counted again from its two lists,
# once: ids without a payload leave them (a draw would skip them anyway).
# KEYS: classes set, supply.
# ARGV: class-list key prefix, used-list key prefix, sample-key prefix, reuse_cap
SUPPLY = """
local qprefix, uprefix, prefix = ARGV[1], ARGV[2], ARGV[3]
local cap = tonumber(ARGV[4])
local labels = redis.call('SMEMBERS', KEYS[1])
table.sort(labels)
local out = {}
for _, label in ipairs(labels) do
  local lists = {qprefix .. label, uprefix .. label}
  local n = redis.call('LLEN', lists[1]) + redis.call('LLEN', lists[2])
  local u = tonumber(redis.call('HGET', KEYS[2], 'u:' .. label) or '-1')
  local f = tonumber(redis.call('HGET', KEYS[2], 'f:' .. label) or '-1')
  local stale = redis.call('HGET', KEYS[2], 'x:' .. label)
  if stale or u < n or u > cap * n or f < 0 or f > n then
    u, f, n = 0, 0, 0
    for _, qkey in ipairs(lists) do
      local ids = redis.call('LRANGE', qkey, 0, -1)
      local kept = {}
      for _, id in ipairs(ids) do
        local used = redis.call('HGET', prefix .. id, 'uses')
        if used then
          local x = tonumber(used)
          kept[#kept + 1] = id
          u = u + math.max(cap - x, 1)
          if x == 0 then f = f + 1 end
        end
      end
      if #kept < #ids then
        redis.call('DEL', qkey)
        for i = 1, #kept, 1000 do
          redis.call('RPUSH', qkey, unpack(kept, i, math.min(i + 999, #kept)))
        end
      end
      n = n + #kept
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
