"""The retention horizon's shared script: which items of an index are past it.

Every index with a horizon (``dedup.horizon``: the vector set's admission log, each fuzzy
index's insertion order) keeps a sorted set of its items scored by the server's time in µs,
always increasing. ``DUE_SELECT`` picks, read only, the oldest ids past the count limit or
the age limit, at most a given number per call, so one call stays short; the caller
removes them (and counts what it removed).
"""

from __future__ import annotations

# KEYS[1]: the order (a sorted set by server time in µs). ARGV: most items (0: no limit),
# oldest age in µs (0: no limit), most returned. Leaves the ids in ``due``, oldest first.
DUE_SELECT = """
local limit = tonumber(ARGV[3])
local due = {}
local most = tonumber(ARGV[1])
if most > 0 then
  local excess = redis.call('ZCARD', KEYS[1]) - most
  if excess > 0 then due = redis.call('ZRANGE', KEYS[1], 0, math.min(excess, limit) - 1) end
end
local age = tonumber(ARGV[2])
if age > 0 and #due < limit then
  local t = redis.call('TIME')
  local cutoff = tonumber(t[1]) * 1000000 + tonumber(t[2]) - age
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', cutoff),
                         'LIMIT', 0, limit)
  -- both are prefixes of the order: their union is the longer one
  if #old > #due then due = old end
end
"""

DUE_LUA = DUE_SELECT + "return due\n"
"""The ids past the horizon, oldest first."""
