"""The Redis backend: :class:`RedisStore`, :class:`RedisNotifier` and their opener.

Only this package imports coredis. Its modules, in the order every networked backend
of chatbus follows:

* ``__init__`` (this file): the public names, and :func:`open_backend` for
  :func:`chatbus.open_bus`'s scheme table (``redis://``, ``redis+cluster://``);
* ``_lua``: server-side text (key and channel names, the Lua scripts; the
  lifecycle's in ``_lua_lifecycle``);
* ``_store``: :class:`RedisStore` (appends in ``_append``, the lifecycle in
  ``_lifecycle``);
* ``_listen``: the sharded pub/sub session and :class:`RedisNotifier`;
* ``_open``: :func:`open_redis`, its options, and :func:`drop_prefix`;
* and what only Redis needs: ``_resp`` (RESP3 by hand for the listener).

How it talks to the server:

* The store uses a coredis client (``Redis`` or ``RedisCluster``, anyio-based, so it
  runs under trio) with coredis's own retries **off**: a command whose reply was lost
  is re-run by the store itself, which its token makes harmless (below). Every
  operation is one server-side script, run with ``EVALSHA`` (loaded on a
  ``NOSCRIPT`` reply; the scripts are constants, and stream names reach Redis only as
  keys and ARGV values).
* The listener does not use coredis: it keeps one RESP3 connection of its own per
  server that holds a watched stream (``CLIENT SETNAME chatbus-listen``), subscribed
  with ``SSUBSCRIBE`` to those streams' shard channels, read only as fast as it is
  handled. A bus tells it which streams it follows (``watch``, awaited before a
  subscription reads its snapshot); any failure, a silent connection (a
  self-published ping with a deadline), or a subscription the server ends (its slot
  migrated) replaces the whole session and resyncs every subscription.

What is stored, under ``prefix`` (default ``chatbus``), for each stream, all in one
hash slot: ``{tag}`` is the hex of the stream name's UTF-8 (injective, and never a
brace, whatever the name holds)::

    prefix:{tag}:m  hash    head, vis (visible head), first (first retained id),
                            epoch, last_us (created_at of the last batch), run (the
                            server's run_id at the last append), evict_us, kh (:k has
                            its note), ttl_us (when :t and :q last got their expiry)
    prefix:{tag}:x  stream  one entry per message, id 0-<n>: b (body JSON), t (µs), k (key)
    prefix:{tag}:k  hash    idempotency key → "id µs" ("id µs body" once trimmed), and
                            '' → a note whose length keeps the hash a hashtable
    prefix:{tag}:t  hash    batch token → its outcome (the last 64 to 80 batches, :q
                            orders them; both expire after 9 to 10 idle minutes)
    prefix:{tag}:r  hash    redacted id → "µs key" (the entry itself is deleted)
    prefix:{tag}:e  hash    retained events (with :z, their order), expiring after a day
    prefix:{tag}:c          the shard channel: notices, events, resets

Appends: one ``EVALSHA`` carries a batch for each of several streams; per stream it
reads the meta, assigns ids from the counter, ``XADD``\\ s the entries with explicit
ids, records the keys and the batch's token, takes ``created_at`` from ``TIME``
(never earlier than the stream's last batch), and ``SPUBLISH``\\ es the notice on the
stream's channel — in the stream's slot, so it leaves from the same server, after
the data, in commit order. Appends waiting while ``max_in_flight`` round trips run
are merged into the next round trip: one script call for all of them on one
server, and on each Cluster primary in fast mode (a script that reads every key of
every stream before writing any, so a slot on the move refuses it with nothing
written; it then goes out again as one call per hash slot, with the same tokens);
in durable mode one per hash slot, all sent at once.

A lost reply: the batch runs again with the same token. The script finds the
token's record and returns the first run's outcome, or (no record, and none made
since the first send can have been dropped) appends it now: stored once either way.
Otherwise the publish raises :class:`~chatbus.OutcomeUnknown`.

Durability (``durability=``):

* ``"fast"`` (default): the ack means the script ran on the primary: in memory, and
  in the AOF as the server's ``appendfsync`` says. Works on any deployment. The
  script records the server's ``run_id``; when another process serves the stream
  (a restart, a failover) it starts a new epoch and publishes a reset, so
  subscribers past a possible loss get :class:`~chatbus.HistoryReset` (or
  :class:`~chatbus.CursorAhead`), never a silent gap or a reused id.
* ``"durable"``: phase 1 appends but leaves the batch invisible (reads and heads stop
  at ``vis``); ``WAIT wait_replicas`` on the same connection; phase 2 raises ``vis``
  (covering any earlier writer that crashed between its phases) and publishes. An
  acknowledged message is on a replica before anyone can see it. (Redis 7.0 has no
  ``WAITAOF``; the replicas are what makes it durable.)
"""

from ._listen import RedisNotifier as RedisNotifier
from ._lua import stream_tag as stream_tag
from ._open import drop_prefix as drop_prefix
from ._open import open_backend as open_backend
from ._open import open_redis as open_redis
from ._session import LISTEN_CLIENT_NAME as LISTEN_CLIENT_NAME
from ._store import RedisStore as RedisStore
from ._store import RedisStoreStatistics as RedisStoreStatistics

__all__ = [
    "LISTEN_CLIENT_NAME",
    "RedisNotifier",
    "RedisStore",
    "RedisStoreStatistics",
    "drop_prefix",
    "open_backend",
    "open_redis",
    "stream_tag",
]

from .._util import fixup_module_metadata as _fixup_module_metadata

_fixup_module_metadata(__name__, globals())
del _fixup_module_metadata
