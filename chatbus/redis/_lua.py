"""The Redis backend's server-side text: key names, channel names and Lua scripts.

Pure text and pure functions. Every stream name reaches Redis only as part of a key
or channel name (hex-encoded, see :func:`stream_tag`) and as a script ARGV value, never
inside script text: the scripts are constants, loaded once per server by their SHA1
(:class:`Script`). No I/O here.

Owns: key and channel names (:class:`StreamKeys`), :class:`Script`, and the scripts
of the hot paths and of events (append, publish, read, retain and replay events).
The lifecycle's scripts (info, trim, retention, delete, redact) are
:mod:`._lua_lifecycle`'s.
"""

from __future__ import annotations

import hashlib
from typing import Final, final

import attrs

from .._codec import NOTICE_DATA_BYTES

#: Fewest token records kept per stream (see APPEND): a re-run of a batch whose
#: record was dropped since cannot be told from a new one.
TOKENS_KEPT: Final = 64
#: Records past TOKENS_KEPT are looked at for dropping once there are this many more
#: (one LINDEX per append then; a LRANGE, LTRIM, HDEL and meta write when some go).
TOKENS_SLACK: Final = 16
#: ... and go only once older than this (by the server's clock): a re-run comes
#: within ``command_timeout`` + 2 s + 1 s of its first send (13 s by default), so on a
#: stream of hundreds of batches a second its record is still there, where a count
#: alone kept a fraction of a second of them.
TOKENS_MIN_AGE_SECONDS: Final = 15
#: ... unless a stream has more than this many: then the oldest go whatever their
#: age (a stream of over TOKENS_MAX / TOKENS_MIN_AGE_SECONDS batches a second keeps
#: less than TOKENS_MIN_AGE_SECONDS of them).
TOKENS_MAX: Final = 4096
#: Most records one append drops (the list shrinks back after a burst in a few).
TOKENS_DROP: Final = 64
#: Seconds an idle stream keeps its token records (an append renews it, see below).
TOKENS_TTL: Final = 600
#: An append renews the records' expiry when it was last renewed this long ago by the
#: server's clock (so they live TOKENS_TTL - 60 s at least after the last append).
TOKENS_RENEW_SECONDS: Final = 60
#: Most keys the append script passes to one HMGET or HSET (Lua's ``unpack`` is
#: bounded by its C stack, some thousands of values).
KEY_CHUNK: Final = 1000
#: The value of the field '' (never a key: keys are not empty) that every stream's
#: keys hash gets with its first key. Longer than Redis's hash-max-listpack-value
#: (64 bytes by default), it keeps the hash in hashtable encoding, also after a
#: restart or a migration: a listpack hash (up to hash-max-listpack-entries keys, 512
#: by default) is scanned from its start by every lookup and insert, a few µs per key
#: at some hundreds of keys, where a hashtable takes a fraction of one; the price is
#: about twice the memory for streams of fewer keys than that.
KEYS_HASH_NOTE: Final = (
    "chatbus: not an idempotency key. Longer than hash-max-listpack-value, this value"
    " keeps the hash in hashtable encoding (a listpack is scanned by every lookup)."
)
#: How long retained events live without a new one (seconds): a day, the longest ttl.
EVENTS_TTL_SECONDS: Final = 86_400


def stream_tag(stream: str) -> str:
    """The hash tag of ``stream``: the hex of its UTF-8, so ``{`` and ``}`` never appear.

    Hex is injective: distinct names give distinct tags, whatever they hold
    (braces, NULs, any Unicode); every key of a stream shares its tag, so a stream
    lives in one hash slot.
    """
    return stream.encode("utf-8").hex()


@final
@attrs.frozen
class StreamKeys:
    """The names of every key of one stream under one prefix, and its shard channel."""

    meta: str
    entries: str
    keys: str
    tokens: str
    token_order: str
    redactions: str
    events: str
    event_order: str
    trimmed: str
    channel: str

    @classmethod
    def of(cls, prefix: str, stream: str) -> StreamKeys:
        """The keys of ``stream`` under ``prefix`` (which holds no braces)."""
        base = f"{prefix}:{{{stream_tag(stream)}}}:"
        return cls(
            *(base + suffix for suffix in ("m", "x", "k", "t", "q", "r", "e", "z", "o", "c"))
        )

    @property
    def all(self) -> list[str]:
        """Every key (not the channel): what a delete removes."""
        return [
            self.meta,
            self.entries,
            self.keys,
            self.tokens,
            self.token_order,
            self.redactions,
            self.events,
            self.event_order,
            self.trimmed,
        ]


def ping_channel(prefix: str, tag: str) -> str:
    """A listener's private ping channel, in the slot of hash tag ``tag``."""
    return f"{prefix}:ping:{{{tag}}}"


@final
@attrs.frozen(eq=False)
class Script:
    """A Lua script, run with EVALSHA (loaded on a NOSCRIPT reply, then run again)."""

    name: str
    text: str
    sha: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode("utf-8")).hexdigest())


# Shared Lua: a message's body for a replay, found by id in the entries, the
# redactions, or (trimmed) the key record itself.
_FIND = """
local function find(x, r, id, rec_body)
  local got = redis.call('XRANGE', x, '0-' .. id, '0-' .. id)
  if #got == 1 then
    local f = got[1][2]
    for i = 1, #f, 2 do if f[i] == 'b' then return f[i + 1], 0 end end
  end
  if redis.call('HEXISTS', r, id) == 1 then return 'null', 1 end
  if rec_body ~= nil and rec_body ~= '' then return rec_body, 0 end
  return false, 0
end
-- µs since the epoch (and big ids) exceed what Lua and cjson print exactly (%.14g).
local function str(n) return string.format('%.0f', n) end
local function notice(stream, last_id)
  return '{"stream":' .. cjson.encode(stream) .. ',"last_id":' .. str(last_id) .. '}'
end
"""

# A committed notice (see chatbus._codec.CommittedNotice): the notice of a batch
# that carries its new messages (bodies as sent, JSON text; keys, null for none) and
# the epoch and created_at µs they were stored with.
_COMMITTED_NOTICE = """
local function committed_notice(stream, last_id, epoch, at, bodies, keys)
  return '{"stream":' .. cjson.encode(stream) .. ',"last_id":' .. str(last_id)
    .. ',"epoch":' .. epoch .. ',"at":' .. at .. ',"n":' .. #bodies
    .. ',"bodies":[' .. table.concat(bodies, ',') .. '],"keys":['
    .. table.concat(keys, ',') .. ']}'
end
"""

# Append a batch to each of several streams (APPEND: on a Cluster, streams of one
# slot; on one server, any). KEYS: per stream, its meta, entries, keys, tokens, token
# order, redactions. ARGV: durable (1/0), window µs (0 on a first run), token records
# to keep, how many streams; then per stream: token, channel, stream, proposed epoch,
# n, then n idempotency keys ('' for none), then n bodies.
#
# APPEND_SLOTS is the same for streams of several slots of one Cluster primary: a
# declared key of another slot is refused (CROSSSLOT, whatever the script's flags),
# so KEYS is the first stream's meta only (it routes the call) and the key names
# follow the arguments above, 6 per stream. It reads every key of every stream
# before it writes anything: a key this server may not serve now (its slot moved,
# or is moving and the key is gone from here) aborts the script on that read, with
# nothing written (a script's writes are not rolled back); the client then sends
# the batch as one call per slot (APPEND). Nothing after the reads can be refused:
# the layout cannot change while a script runs, and no key read is emptied before
# it is used again.
#
# * The token: a re-run of a batch (after a lost reply) finds its record and gets
#   the first run's outcome instead of appending again. Records are bounded
#   (TOKENS_KEPT per stream, more while younger than TOKENS_MIN_AGE_SECONDS, never
#   more than TOKENS_MAX); a re-run passes the time since the first send, and if a
#   record created within that window was dropped, the outcome is 'unknown'.
# * created_at: the server's TIME, never earlier than the stream's last batch.
# * The run (fast mode): the server process's run_id. When it differs from the one
#   recorded (a restart, a failover), acknowledged messages may be gone and their ids
#   reused by what comes next: the stream starts a new epoch and tells every
#   listener. (Durable mode needs no such check: what was visible is on a replica,
#   and so is on a promoted replica or a migration's target; 'durable' is recorded,
#   and a fast append that finds it takes the stream over without a reset.)
# * durable: the batch is appended but not made visible (vis stays); the client
#   WAITs for replicas, then runs PUBLISH. Fast: vis moves with head, and the notice
#   goes out from here.
#
# Returns, per stream in order: status, epoch, vis, last id, created µs, how many
# drafts found a stored key, then [draft index, id, µs, body, redacted] for each.
# status: 'ok', 'reset' (ok, in a new epoch), 'again' (a re-run that found the
# first run's record), 'unknown'.
_APPEND_BODY: Final = (
    _FIND
    + _COMMITTED_NOTICE
    + """
local durable, window, keep = ARGV[1] == '1', tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local time_now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local run = 'durable'
if not durable then run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') end

local function append(kb, ab)
  local m, x, k, t, q, r = K[kb], K[kb + 1], K[kb + 2], K[kb + 3], K[kb + 4], K[kb + 5]
  local token, channel, stream = ARGV[ab], ARGV[ab + 1], ARGV[ab + 2]
  local proposed, n = ARGV[ab + 3], tonumber(ARGV[ab + 4])
  local now = time_now
  local meta = redis.call('HMGET', m, 'head', 'vis', 'epoch', 'last_us', 'run', 'evict_us', 'kh',
    'ttl_us')
  local record = redis.call('HGET', t, token)
  if record then
    local parts = {}
    for word in string.gmatch(record, '%S+') do parts[#parts + 1] = word end
    local result = {'again', meta[3] or '0', tonumber(meta[2] or '0'), tonumber(parts[1]),
      tonumber(parts[2]), (#parts - 2) / 2}
    for i = 3, #parts, 2 do
      local index, id = tonumber(parts[i]), tonumber(parts[i + 1])
      -- The replayed message as the first run found it: its key's record, if that
      -- still names it (a trim may have forgotten the key, a later append reused it).
      local rec = redis.call('HGET', k, ARGV[ab + 4 + index])
      local rid, rus, rbody = nil, nil, nil
      if rec then rid, rus, rbody = string.match(rec, '^(%d+) (%d+) ?(.*)$') end
      if rid == nil or tonumber(rid) ~= id then
        return {'unknown', meta[3] or '0', tonumber(meta[2] or '0'), 0, 0, 0}
      end
      local body, redacted = find(x, r, id, rbody)
      if body == false then  -- trimmed, its key's body forgotten: cannot be told again
        return {'unknown', meta[3] or '0', tonumber(meta[2] or '0'), 0, 0, 0}
      end
      for _, v in ipairs({index, id, tonumber(rus), body, redacted}) do
        result[#result + 1] = v
      end
    end
    return result
  end
  if window > 0 and tonumber(meta[6] or '0') >= now - window then
    return {'unknown', meta[3] or '0', tonumber(meta[2] or '0'), 0, 0, 0}
  end
  local head = tonumber(meta[1] or '0')
  local vis = tonumber(meta[2] or '0')
  local epoch = meta[3]
  local last_us = tonumber(meta[4] or '0')
  local status = 'ok'
  if not epoch then
    epoch = proposed
    redis.call('HSET', m, 'epoch', epoch, 'first', 1, 'run', run)
  elseif not durable and meta[5] == 'durable' then
    -- The first fast append after durable ones: nothing visible was lost (it was
    -- replicated first); from now on this server process answers for it.
    redis.call('HSET', m, 'run', run)
  elseif not durable and meta[5] ~= run then
    -- Another server process holds this stream now: what subscribers saw may be gone.
    -- 'reset' tells stream_info that the store, not a delete, started this epoch.
    epoch = proposed
    status = 'reset'
    redis.call('HSET', m, 'epoch', epoch, 'run', run, 'reset', 1)
    redis.call('SPUBLISH', channel, cjson.encode({stream = stream, reset = true}))
  end
  if now < last_us then now = last_us end
  local snow = str(now)
  -- The batch's keys: one HMGET for their first occurrences, and (after the entries)
  -- one HSET for the new ones, in chunks of @KEY_CHUNK@. A key seen earlier in the batch
  -- is left to the client (it resolves to that draft's message).
  local first_at = {}
  local distinct = {}
  for i = 1, n do
    local key = ARGV[ab + 4 + i]
    if key ~= '' and first_at[key] == nil then
      first_at[key] = i
      distinct[#distinct + 1] = key
    end
  end
  local stored = {}
  for c = 1, #distinct, @KEY_CHUNK@ do
    local last = math.min(c + @KEY_CHUNK@ - 1, #distinct)
    local got = redis.call('HMGET', k, unpack(distinct, c, last))
    for j = c, last do stored[distinct[j]] = got[j - c + 1] end
  end
  local records = {}
  local record_parts = {}
  local found = {}
  -- The new messages' bodies and keys, for a committed notice, while small enough.
  local nbodies, nkeys, carried = {}, {}, 0
  for i = 1, n do
    local key = ARGV[ab + 4 + i]
    local old = nil
    if key ~= '' then
      if first_at[key] ~= i then
        old = true  -- repeated in this batch: the client resolves it
      elseif stored[key] then
        old = stored[key]
      end
    end
    if old == nil then
      head = head + 1
      if carried <= @NOTICE_DATA_BYTES@ then
        local body = ARGV[ab + 4 + n + i]
        nbodies[#nbodies + 1] = body
        if key == '' then nkeys[#nkeys + 1] = 'null' else nkeys[#nkeys + 1] = cjson.encode(key) end
        carried = carried + #body + #key
      end
      if key == '' then
        redis.call('XADD', x, '0-' .. head, 'b', ARGV[ab + 4 + n + i], 't', snow)
      else
        redis.call('XADD', x, '0-' .. head, 'b', ARGV[ab + 4 + n + i], 't', snow, 'k', key)
        records[#records + 1] = key
        records[#records + 1] = head .. ' ' .. snow
      end
    elseif old ~= true then
      local oid, ous, obody = string.match(old, '^(%d+) (%d+) ?(.*)$')
      local fbody, redacted = find(x, r, tonumber(oid), obody)
      for _, v in ipairs({i, tonumber(oid), tonumber(ous), fbody, redacted}) do
        found[#found + 1] = v
      end
      record_parts[#record_parts + 1] = i .. ' ' .. oid
    end
  end
  if #records > 0 and not meta[7] then
    -- The stream's first keys: the hash becomes a hashtable (see KEYS_HASH_NOTE).
    redis.call('HSET', k, '', '@KEYS_HASH_NOTE@')
    redis.call('HSET', m, 'kh', 1)
  end
  for c = 1, #records, 2 * @KEY_CHUNK@ do
    redis.call('HSET', k, unpack(records, c, math.min(c + 2 * @KEY_CHUNK@ - 1, #records)))
  end
  local rec = head .. ' ' .. snow
  if #record_parts > 0 then rec = rec .. ' ' .. table.concat(record_parts, ' ') end
  redis.call('HSET', t, token, rec)
  local queued = redis.call('RPUSH', q, token .. ' ' .. snow)
  local mset = {'head', head, 'last_us', snow}
  if queued > keep + @TOKENS_SLACK@ then
    -- The oldest records go, some at a time, once older than a re-run can come
    -- (TOKENS_MIN_AGE_SECONDS) or when too many are kept; evict_us is the newest of
    -- them (records are queued in time order).
    local cutoff = time_now - @TOKENS_MIN_AGE_US@
    if queued > @TOKENS_MAX@ then cutoff = math.huge end
    if tonumber(string.match(redis.call('LINDEX', q, 0), ' (%d+)$')) <= cutoff then
      local older = redis.call('LRANGE', q, 0, math.min(queued - keep, @TOKENS_DROP@) - 1)
      local dtokens, dus = {}, nil
      for _, d in ipairs(older) do
        local dtoken, us = string.match(d, '^(%S+) (%d+)$')
        if tonumber(us) > cutoff then break end
        dtokens[#dtokens + 1] = dtoken
        dus = us
      end
      redis.call('LTRIM', q, #dtokens, -1)
      redis.call('HDEL', t, unpack(dtokens))
      mset[#mset + 1] = 'evict_us'
      mset[#mset + 1] = dus
    end
  end
  -- Records matter for seconds (a re-run follows its lost reply at once): an idle
  -- stream's go after some minutes, counted again by an append once a minute at most
  -- (so never under a re-run's feet). The server's clock: a jump either way renews.
  if math.abs(time_now - tonumber(meta[8] or '0')) >= @TOKENS_RENEW_US@ then
    redis.call('EXPIRE', t, @TOKENS_TTL@)
    redis.call('EXPIRE', q, @TOKENS_TTL@)
    mset[#mset + 1] = 'ttl_us'
    mset[#mset + 1] = str(time_now)
  end
  if not durable and head > vis then
    vis = head
    mset[#mset + 1] = 'vis'
    mset[#mset + 1] = vis
    redis.call('HSET', m, unpack(mset))
    if carried > 0 and carried <= @NOTICE_DATA_BYTES@ then
      redis.call('SPUBLISH', channel, committed_notice(stream, head, epoch, snow, nbodies, nkeys))
    else
      redis.call('SPUBLISH', channel, notice(stream, head))
    end
  else
    redis.call('HSET', m, unpack(mset))
  end
  local out = {status, epoch, vis, head, now, #found / 5}
  for _, v in ipairs(found) do out[#out + 1] = v end
  return out
end

local out = {}
local ab = 5
for s = 0, tonumber(ARGV[4]) - 1 do
  for _, v in ipairs(append(1 + 6 * s, ab)) do out[#out + 1] = v end
  ab = ab + 5 + 2 * tonumber(ARGV[ab + 4])
end
return out
""".replace("@TOKENS_TTL@", str(TOKENS_TTL))
    .replace("@TOKENS_SLACK@", str(TOKENS_SLACK))
    .replace("@TOKENS_MIN_AGE_US@", str(TOKENS_MIN_AGE_SECONDS * 1_000_000))
    .replace("@TOKENS_MAX@", str(TOKENS_MAX))
    .replace("@TOKENS_DROP@", str(TOKENS_DROP))
    .replace("@TOKENS_RENEW_US@", str(TOKENS_RENEW_SECONDS * 1_000_000))
    .replace("@KEY_CHUNK@", str(KEY_CHUNK))
    .replace("@KEYS_HASH_NOTE@", KEYS_HASH_NOTE)
    .replace("@NOTICE_DATA_BYTES@", str(NOTICE_DATA_BYTES))
)
APPEND: Final = Script("append", "local K = KEYS\n" + _APPEND_BODY)
APPEND_SLOTS: Final = Script(
    "append_slots",
    """#!lua flags=allow-cross-slot-keys
local K = {}
do
  local nk = 6 * tonumber(ARGV[4])
  local base = #ARGV - nk
  for i = 1, nk do
    K[i] = ARGV[base + i]
    redis.call('EXISTS', K[i])  -- refused here, or never (see above)
  end
end
"""
    + _APPEND_BODY,
)

# Durable mode, phase 2, after WAIT: make the stream visible up to ARGV[1] (which
# also covers an earlier writer's entries that never got their phase 2) and notify.
# KEYS: meta. ARGV: last id, epoch of phase 1, channel, stream. Returns the visible
# head, or an error when the stream is not the one phase 1 wrote to (deleted, or a
# failover lost the batch).
PUBLISH: Final = Script(
    "publish",
    _FIND
    + """
local m = KEYS[1]
local target, epoch, channel, stream = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local meta = redis.call('HMGET', m, 'head', 'vis', 'epoch')
if meta[3] ~= epoch or tonumber(meta[1] or '0') < target then
  return redis.error_reply('CHATBUS the batch is not in the stream any more')
end
local vis = tonumber(meta[2] or '0')
if target > vis then
  vis = target
  redis.call('HSET', m, 'vis', vis)
  redis.call('SPUBLISH', channel, notice(stream, vis))
end
return vis
""",
)

# A page: messages with ids after ARGV[1], at most ARGV[2], up to the visible head,
# from the first retained id; redacted ones (deleted from the entries) come from the
# redactions. KEYS: meta, entries, redactions. Returns the stream's epoch (0: it does
# not exist), then {id, key ('' none), µs, body, redacted (0/1)} flattened: a
# subscription never takes a page of another history for the rest of its own.
READ: Final = Script(
    "read",
    """
local m, x, r = KEYS[1], KEYS[2], KEYS[3]
local after, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local meta = redis.call('HMGET', m, 'vis', 'first', 'epoch')
local vis, first = tonumber(meta[1] or '0'), tonumber(meta[2] or '1')
local lo = math.max(after + 1, first)
local hi = math.min(vis, lo + limit - 1)
local out = {meta[3] or '0'}
if lo > hi then return out end
local entries = redis.call('XRANGE', x, '0-' .. lo, '0-' .. hi)
local redacted = redis.call('HLEN', r) > 0
local function emit(id, f)
  local key, us, body = '', 0, 'null'
  for i = 1, #f, 2 do
    if f[i] == 'b' then body = f[i + 1]
    elseif f[i] == 't' then us = tonumber(f[i + 1])
    elseif f[i] == 'k' then key = f[i + 1] end
  end
  for _, v in ipairs({id, key, us, body, 0}) do out[#out + 1] = v end
end
if not redacted then
  for _, e in ipairs(entries) do emit(tonumber(string.sub(e[1], 3)), e[2]) end
  return out
end
local j = 1
for id = lo, hi do
  local e = entries[j]
  if e and tonumber(string.sub(e[1], 3)) == id then
    emit(id, e[2])
    j = j + 1
  else
    local tomb = redis.call('HGET', r, id)
    if tomb then
      local us, key = string.match(tomb, '^(%d+) ?(.*)$')
      for _, v in ipairs({id, key, tonumber(us), 'null', 1}) do out[#out + 1] = v end
    end
  end
end
return out
""",
)

# Events of one stream in one flush: retain them for joiners and publish them live.
# KEYS: events (hash: slot → "expires after encoded"), event order (zset: slot → the
# event's created µs). ARGV: channel, count, the most events and bytes to retain (the
# flushing bus's EventRetention), then per event: slot ('k:' key, or 'u:' emitter and
# zero-padded seq), after, created µs, expires µs (0: never), encoded; then the
# payloads to publish. Unkeyed events are kept only while their after is the newest;
# keyed ones replace their key's unless it is newer; at most those bounds per stream,
# oldest out.
RETAIN_EVENTS: Final = Script(
    "retain_events",
    f"""
local e, z = KEYS[1], KEYS[2]
local channel, count = ARGV[1], tonumber(ARGV[2])
local max_events, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
-- The bookkeeping lives in the events hash itself (fields that are not slots), so it
-- expires with the events.
local newest = tonumber(redis.call('HGET', e, '#after') or '-1')
local bytes = tonumber(redis.call('HGET', e, '#bytes') or '0')
local function drop(slot)
  local old = redis.call('HGET', e, slot)
  if old then
    bytes = bytes - #old
    redis.call('HDEL', e, slot)
    redis.call('ZREM', z, slot)
  end
end
for i = 0, count - 1 do
  local slot, after = ARGV[5 + 5 * i], tonumber(ARGV[6 + 5 * i])
  local created, expires, encoded = ARGV[7 + 5 * i], ARGV[8 + 5 * i], ARGV[9 + 5 * i]
  local keep = true
  if string.sub(slot, 1, 2) == 'u:' then
    if after < newest then
      keep = false
    elseif after > newest then
      for _, old in ipairs(redis.call('ZRANGE', z, 0, -1)) do
        if string.sub(old, 1, 2) == 'u:' then drop(old) end
      end
      newest = after
    end
  else
    -- A newer value of the key (another bus's, flushed first) stays.
    local held = redis.call('ZSCORE', z, slot)
    if held and tonumber(held) > tonumber(created) then keep = false end
  end
  if keep then
    drop(slot)
    local value = expires .. ' ' .. after .. ' ' .. encoded
    redis.call('HSET', e, slot, value)
    redis.call('ZADD', z, created, slot)
    bytes = bytes + #value
  end
end
while redis.call('ZCARD', z) > max_events or bytes > max_bytes do
  local oldest = redis.call('ZRANGE', z, 0, 0)
  if #oldest == 0 then bytes = 0 break end
  drop(oldest[1])
end
redis.call('HSET', e, '#after', newest, '#bytes', bytes)
redis.call('EXPIRE', e, {EVENTS_TTL_SECONDS})
redis.call('EXPIRE', z, {EVENTS_TTL_SECONDS})
for i = 5 + 5 * count, #ARGV do redis.call('SPUBLISH', channel, ARGV[i]) end
return 1
""",
)

# What a joiner at message ARGV[1] gets: unkeyed events positioned there and keyed
# ones, each unless its ttl ran out by ARGV[2] µs, oldest first. KEYS: events, event order.
JOINER_EVENTS: Final = Script(
    "joiner_events",
    """
local e, z = KEYS[1], KEYS[2]
local head, now = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for _, slot in ipairs(redis.call('ZRANGE', z, 0, -1)) do
  local value = redis.call('HGET', e, slot)
  if value then
    local expires, after, encoded = string.match(value, '^(%d+) (%-?%d+) (.*)$')
    expires, after = tonumber(expires), tonumber(after)
    if expires == 0 or expires > now then
      if string.sub(slot, 1, 2) ~= 'u:' or after == head then out[#out + 1] = encoded end
    end
  end
end
return out
""",
)
