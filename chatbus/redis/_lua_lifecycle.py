"""The Redis backend's server-side text for the stream lifecycle: its Lua scripts.

Owns: the scripts of :meth:`~chatbus.redis.RedisStore.stream_info`, ``trim``,
``over_retention``, ``delete_stream`` and ``redact`` (INFO, TRIM_*, SCAN_STREAMS,
EXAMINE, DELETE, REDACT), and the batch bound they walk by. Pure text, like
:mod:`._lua` (whose :class:`~._lua.Script` runs them); no I/O here.
"""

from __future__ import annotations

from typing import Final

from ._lua import Script

#: Most messages one call of the trim script moves or removes.
LIFECYCLE_BATCH: Final = 1000

# Where a stream stands. KEYS: meta. Returns {visible head, first id, epoch or '',
# reset by the store (1/0)}.
INFO: Final = Script(
    "info",
    """
local meta = redis.call('HMGET', KEYS[1], 'vis', 'first', 'epoch', 'reset')
return {tonumber(meta[1] or '0'), tonumber(meta[2] or '1'), meta[3] or '',
  tonumber(meta[4] or '0')}
""",
)

# Trim, first: move the first retained id (never past the visible head + 1, never
# back) and tell listeners. KEYS: meta. ARGV: before, channel, stream, epoch ('' for
# any). Returns {first id, 1}; {first id, 0} when the stream is at another epoch than
# ARGV[4] (nothing changed: a retention target of another history); {0, 0}: no such
# stream.
TRIM_FIRST: Final = Script(
    "trim_first",
    """
local m = KEYS[1]
local meta = redis.call('HMGET', m, 'vis', 'first', 'epoch')
if not meta[3] then return {0, 0} end
local vis, first = tonumber(meta[1] or '0'), tonumber(meta[2] or '1')
if ARGV[4] ~= '' and ARGV[4] ~= meta[3] then return {first, 0} end
local wanted = math.min(tonumber(ARGV[1]), vis + 1)
if wanted > first then
  first = wanted
  redis.call('HSET', m, 'first', first)
end
redis.call('SPUBLISH', ARGV[2], cjson.encode({stream = ARGV[3], reset = true, first_id = first}))
return {first, 1}
""",
)

# Trim, then: remove up to ARGV[2] entries below ARGV[1]; an entry with a key leaves
# its body in the key's record, so a retried publish still gets the original message,
# and its key in the trimmed keys (by the message's µs), for TRIM_KEYS to expire.
# KEYS: entries, keys, trimmed keys. Returns how many were removed.
TRIM_BATCH: Final = Script(
    "trim_batch",
    """
local x, k, o = KEYS[1], KEYS[2], KEYS[3]
local below = tonumber(ARGV[1])
if below <= 1 then return 0 end
local entries = redis.call('XRANGE', x, '-', '0-' .. (below - 1), 'COUNT', tonumber(ARGV[2]))
for _, e in ipairs(entries) do
  local f = e[2]
  local key, us, body = nil, 0, 'null'
  for i = 1, #f, 2 do
    if f[i] == 'b' then body = f[i + 1]
    elseif f[i] == 't' then us = f[i + 1]
    elseif f[i] == 'k' then key = f[i + 1] end
  end
  if key then
    redis.call('HSET', k, key, string.sub(e[1], 3) .. ' ' .. us .. ' ' .. body)
    redis.call('ZADD', o, us, key)
  end
  redis.call('XDEL', x, e[1])
end
return #entries
""",
)

# Trim, last (with a key window): forget up to ARGV[2] keys of trimmed messages older
# than ARGV[1] µs by the server's clock (a retry of them then appends anew). KEYS:
# keys, trimmed keys. ARGV: window µs, most keys, first retained id. Returns how many
# were examined.
TRIM_KEYS: Final = Script(
    "trim_keys",
    """
local k, o = KEYS[1], KEYS[2]
local clock = redis.call('TIME')
local cutoff = tonumber(clock[1]) * 1000000 + tonumber(clock[2]) - tonumber(ARGV[1])
local first = tonumber(ARGV[3])
local old = redis.call('ZRANGEBYSCORE', o, '-inf', '(' .. string.format('%.0f', cutoff),
  'LIMIT', 0, tonumber(ARGV[2]))
for _, key in ipairs(old) do
  local rec = redis.call('HGET', k, key)
  -- Only a record of a trimmed message (the key may name a retained one since).
  if rec and tonumber(string.match(rec, '^(%d+)')) < first then redis.call('HDEL', k, key) end
  redis.call('ZREM', o, key)
end
return #old
""",
)

# Retention: which streams exist under a prefix, a bounded step of a SCAN of the
# server that runs it (KEYS: a key in a slot of that server, for routing only; it
# is not read). ARGV: cursor, pattern, count. Returns {next cursor, meta keys}.
SCAN_STREAMS: Final = Script(
    "scan_streams",
    """
return redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', tonumber(ARGV[3]))
""",
)

# Retention: where one stream stands against a policy, by the server's clock. KEYS:
# meta, entries, redactions, trimmed keys. ARGV: max messages, max age µs, key window
# µs (each -1 for none), most ids walked. Returns {epoch, before, more, stale keys,
# first id}: trim below ``before`` (more = 1: the age walk stopped at its bound, look
# again); stale keys = 1: trimmed keys past the window. {'', 0, 0, 0, 0}: no stream.
EXAMINE: Final = Script(
    "examine",
    """
local m, x, r, o = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local max_messages, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])
local keys_for, most = tonumber(ARGV[3]), tonumber(ARGV[4])
local meta = redis.call('HMGET', m, 'vis', 'first', 'epoch')
if not meta[3] then return {'', 0, 0, 0, 0} end
local vis, first = tonumber(meta[1] or '0'), tonumber(meta[2] or '1')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local before, more, stale = first, 0, 0
if max_messages >= 0 then before = math.max(before, vis - max_messages + 1) end
if max_age >= 0 and before <= vis then
  -- created_at never decreases in id order: walk up to the first young message.
  local cutoff = now - max_age
  local entries = redis.call('XRANGE', x, '0-' .. before, '0-' .. vis, 'COUNT', most)
  local young = nil
  local last = before - 1
  for _, e in ipairs(entries) do
    local id = tonumber(string.sub(e[1], 3))
    local f = e[2]
    local us = 0
    for i = 1, #f, 2 do if f[i] == 't' then us = tonumber(f[i + 1]) end end
    -- Redacted ids (no entry) between are older than this one: the trim takes them.
    if us >= cutoff then young = id break end
    last = id
  end
  if young then
    before = young
  elseif #entries >= most then
    before, more = last + 1, 1
  else
    -- Past the last entry only tombstones remain (up to vis): their own µs decide.
    local id = last + 1
    local walked = 0
    while id <= vis do
      local tomb = redis.call('HGET', r, id)
      if tomb and tonumber(string.match(tomb, '^(%d+)')) >= cutoff then break end
      walked = walked + 1
      if walked >= most then more = 1 break end
      id = id + 1
    end
    before = id
  end
end
if keys_for >= 0 then
  local oldest = redis.call('ZRANGE', o, 0, 0, 'WITHSCORES')
  if #oldest == 2 and tonumber(oldest[2]) < now - keys_for then stale = 1 end
end
return {meta[3], before, more, stale, first}
""",
)

# Delete: every key of the stream (UNLINK: freed off the main thread), then tell
# listeners. KEYS: every key of the stream. ARGV: channel, stream.
DELETE: Final = Script(
    "delete",
    """
redis.call('UNLINK', unpack(KEYS))
redis.call('SPUBLISH', ARGV[1], cjson.encode({stream = ARGV[2], reset = true}))
return 1
""",
)

# Redact: the entry's body is erased (the entry deleted) and a tombstone kept in the
# redactions (µs, key); the key keeps its id; every listener is told (the payload of
# chatbus._codec.parse_redacted), from here, so no bus's cache keeps the body.
# KEYS: meta, entries, keys, redactions. ARGV: id, channel, stream. Returns
# {key ('' none), µs}, or false when the id is not retained.
REDACT: Final = Script(
    "redact",
    """
local m, x, k, r = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id = tonumber(ARGV[1])
local meta = redis.call('HMGET', m, 'vis', 'first')
if id < tonumber(meta[2] or '1') or id > tonumber(meta[1] or '0') then return false end
local tomb = redis.call('HGET', r, id)
if tomb then
  local us, key = string.match(tomb, '^(%d+) ?(.*)$')
  return {key, tonumber(us)}
end
local got = redis.call('XRANGE', x, '0-' .. id, '0-' .. id)
if #got == 0 then return false end
local f = got[1][2]
local key, us = '', 0
for i = 1, #f, 2 do
  if f[i] == 't' then us = f[i + 1] elseif f[i] == 'k' then key = f[i + 1] end
end
redis.call('XDEL', x, '0-' .. id)
redis.call('HSET', r, id, us .. ' ' .. key)
if key ~= '' then redis.call('HSET', k, key, id .. ' ' .. us) end
redis.call('SPUBLISH', ARGV[2], cjson.encode({stream = ARGV[3], redacted = id}))
return {key, tonumber(us)}
""",
)
