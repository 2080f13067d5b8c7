"""The PostgreSQL backend: :class:`PostgresStore`, :class:`PostgresNotifier` and their opener.

Only this package imports psycopg, psycopg_pool or trio_asyncio. Its modules, in the
order every networked backend of chatbus follows:

* ``__init__`` (this file): the public names, and :func:`open_backend` for
  :func:`chatbus.open_bus`'s scheme table;
* ``_sql``: server-side text (statements, DDL, channel and statement names);
* ``_store``: :class:`PostgresStore`;
* ``_listen``: the LISTEN session and :class:`PostgresNotifier`;
* ``_open``: :func:`open_postgres` and its options;
* and what only Postgres needs: ``_pq`` (raw libpq from trio), ``_aio`` (the
  trio-asyncio bridge and the pool), ``_connections`` (pool connections lent to trio).

How it talks to the server:

* Connections come from psycopg's ``AsyncConnectionPool`` on a trio-asyncio loop:
  the pool makes, configures, checks, resets and replaces them. The store borrows
  one when it needs one and keeps it for the next operation, giving it back after
  10 s unused, or at once when it failed mid-statement.
* The hot operations, appends (keyed or not), reads and heads, are single autocommit
  statements. They run on the borrowed connection's ``pgconn`` through psycopg's
  public :mod:`psycopg.pq` layer, straight from trio (``trio.lowlevel.wait_readable``),
  as statements prepared once per session, with text parameters and results that
  come back as a few scalars or one JSON value. This costs about a third of the
  client CPU of the same statement through psycopg's asyncio API behind a
  trio-asyncio crossing (``python -m benchmarks --only statement``); a cancelled
  statement is cancelled on the server, as psycopg does.
* Rare operations (the last step of a stream's delete, the DDL) run through
  psycopg's asyncio API on a borrowed connection, one crossing from trio into
  asyncio each.
* The LISTEN connection is a dedicated session connection (not from the pool) read
  with :mod:`psycopg.pq` under :func:`trio.lowlevel.wait_readable`: no thread and no
  asyncio crossing per notification. Its ``application_name`` is ``chatbus-listen``.

What is stored, in schema ``schema`` (default ``chatbus``)::

    streams(stream text PRIMARY KEY, last_id bigint NOT NULL)
    messages(stream text, id bigint, key text NULL, body json,
             created_at timestamptz DEFAULT now(), PRIMARY KEY (stream, id))
    UNIQUE INDEX messages_stream_key ON messages (stream, key) WHERE key IS NOT NULL

``body`` is a ``json`` column (not ``jsonb``): it keeps the exact text that was
published, including ``\\u0000`` escapes, which ``jsonb`` rejects; bodies are decoded
with :func:`json.loads` when read. ``streams.last_id`` is the per-stream counter:
every append bumps it with ``INSERT … ON CONFLICT (stream) DO UPDATE`` in the same
transaction that inserts the messages, so the row lock serialises the appenders of
one stream and ids are dense and commit-ordered across any number of processes.

Each append transaction also runs ``pg_notify(channel, payload)`` once, so the
notification is delivered if and only if the batch commits, in commit order. The
channel is ``chatbus_`` plus the MD5 of the schema name; the payload is a small JSON
object ``{"stream": …, "last_id": …}`` (at most a couple of KB, whatever the bodies).
:meth:`PostgresNotifier.notify` is therefore a no-op.

Appends, keyed or not, are group-committed across streams (:mod:`chatbus._coalesce`):
while ``max_in_flight`` append statements are running, further appends (any streams)
queue, and the next statement carries all of them: one counter bump per stream (rows
locked in sorted stream order, so concurrent multi-stream statements in different
processes cannot deadlock), the inserts, one ``pg_notify`` per stream, one round
trip. Each caller still gets exactly its own batch, with consecutive ids, committed
atomically. See :meth:`PostgresStore.statistics`.

A statement with idempotency keys first probes the unique index once per key (each
key of a stream is sent once per statement), then bumps and inserts only what it did
not find; a stream whose drafts were all found is not bumped, locked or notified.
The probe sees the statement's snapshot, so a same-key append committed while this
one waited for the lock makes it fail on the unique index, storing nothing; the
store runs it again.
"""

from ._listen import PostgresNotifier as PostgresNotifier
from ._open import LISTEN_APPLICATION_NAME as LISTEN_APPLICATION_NAME
from ._open import POOL_APPLICATION_NAME as POOL_APPLICATION_NAME
from ._open import open_backend as open_backend
from ._open import open_postgres as open_postgres
from ._sql import channel_for_schema as channel_for_schema
from ._store import PostgresStore as PostgresStore
from ._store import PostgresStoreStatistics as PostgresStoreStatistics

__all__ = [
    "LISTEN_APPLICATION_NAME",
    "POOL_APPLICATION_NAME",
    "PostgresNotifier",
    "PostgresStore",
    "PostgresStoreStatistics",
    "channel_for_schema",
    "open_backend",
    "open_postgres",
]

from .._util import fixup_module_metadata as _fixup_module_metadata

_fixup_module_metadata(__name__, globals())
del _fixup_module_metadata
