"""The server-side Lua scripts of ``agents.fuzzy_index.FuzzyIndex``.

``INSERT`` inserts a batch's admitted items: it gives every insert a sequence number and, in
the same atomic step, returns what now shares a band with it. ``DUE`` is the short
read-only script that finds the items past the horizon and their signatures. The key
layout is in ``agents.fuzzy_index``.
"""

from __future__ import annotations

from agents.horizon import DUE_SELECT

INSERT = """
-- KEYS[1] signature hash, KEYS[2] sequence counter, KEYS[3] order (zset), then `bands` band
-- sets per item. ARGV[1] bands, then id, signature for each item. Inserts each item not
-- already present with the next sequence number and its insertion time (server µs, forced
-- above the newest in the order), then returns, per item, {seq (0: was present), the ids
-- now sharing a band with it}.
local bands = tonumber(ARGV[1])
local n = (#ARGV - 1) / 2
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
local newest = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
if #newest > 0 then clock = math.max(clock, tonumber(newest[2]) + 1) end
local seqs = {}
for i = 1, n do
  local id = ARGV[2 * i]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    seqs[i] = 0
  else
    local seq = redis.call('INCR', KEYS[2])
    seqs[i] = seq
    redis.call('HSET', KEYS[1], id, ARGV[2 * i + 1] .. string.format('%d', seq))
    redis.call('ZADD', KEYS[3], string.format('%.0f', clock), id)
    clock = clock + 1
    local first = 3 + (i - 1) * bands
    for j = 1, bands do
      redis.call('SADD', KEYS[first + j], id)
    end
  end
end
local out = {}
for i = 1, n do
  if seqs[i] == 0 then
    out[i] = {0, {}}
  else
    local first = 3 + (i - 1) * bands
    out[i] = {seqs[i], redis.call('SUNION', unpack(KEYS, first + 1, first + bands))}
  end
end
return out
"""

# KEYS[1] order, KEYS[2] signature hash (ARGV as ``DUE_SELECT``). Read only: the ids past
# the horizon, oldest first, each followed by its signature (false when it is gone); the
# caller removes them.
DUE = DUE_SELECT + """
local out = {}
for _, id in ipairs(due) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id)
end
return out
"""
