"""The PostgreSQL backend: :class:`PostgresStore`, :class:`PostgresNotifier` and their opener.

Only this module and :mod:`chatbus._pq` import psycopg; only this one psycopg_pool and
trio_asyncio.

How it talks to the server:

* Connections come from psycopg's ``AsyncConnectionPool`` on a trio-asyncio loop:
  the pool makes, configures, checks, resets and replaces them. The store borrows
  one when it needs one and keeps it for the next operation (see ``_Lanes``),
  giving it back after 10 s unused, or at once when it failed mid-statement.
* The hot operations, unkeyed appends, reads and heads, are single autocommit
  statements. They run on the borrowed connection's ``pgconn`` through psycopg's
  public :mod:`psycopg.pq` layer, straight from trio (``trio.lowlevel.wait_readable``),
  as statements prepared once per session, with text parameters and results that
  come back as a few scalars or one JSON value. This costs about a third of the
  client CPU of the same statement through psycopg's asyncio API behind a
  trio-asyncio crossing (``python -m benchmarks --only statement``); a cancelled
  statement is cancelled on the server, as psycopg does.
* Keyed appends (a transaction of several statements) run through psycopg's
  asyncio API on a borrowed connection, with **one** crossing from trio into
  asyncio for the whole transaction.
* The LISTEN connection is a dedicated session connection (not from the pool) read
  with psycopg's public :mod:`psycopg.pq` layer under
  :func:`trio.lowlevel.wait_readable`: no thread and no asyncio crossing per
  notification. Its ``application_name`` is ``chatbus-listen``.

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

Unkeyed appends are group-committed across streams: while ``max_in_flight`` append
statements are running, further appends (any streams) queue, and the next statement
carries all of them: one counter bump per stream (rows locked in sorted stream order,
so concurrent multi-stream statements in different processes cannot deadlock), the
inserts, one ``pg_notify`` per stream, one round trip. Each caller still gets exactly
its own batch, with consecutive ids, committed atomically. With nothing running an
append goes out at once, alone. See :meth:`PostgresStore.statistics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import hashlib
import ipaddress
import json
import logging
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar, final

import attrs
import psycopg
import psycopg.errors
import psycopg.waiting
import psycopg_pool
import trio
import trio_asyncio
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import _pq
from ._exceptions import StoreError
from ._message import Draft, Message, check_after, check_range, check_stream
from ._protocols import NoticeHandler

__all__ = [
    "PostgresNotifier",
    "PostgresStore",
    "PostgresStoreStatistics",
    "channel_for_schema",
    "open_postgres",
]

# trio-asyncio makes asyncio.get_running_loop() find its loop by patching the asyncio
# module, but psycopg.waiting binds the function at import time. If psycopg was
# imported before trio_asyncio (anywhere in the process), its async waits would not
# find the loop ("no running event loop"): hand it the patched function.
_psycopg_waiting: Any = psycopg.waiting
if _psycopg_waiting.get_running_loop is not asyncio.get_running_loop:
    _psycopg_waiting.get_running_loop = asyncio.get_running_loop

logger = logging.getLogger("chatbus.postgres")

_T = TypeVar("_T")

#: ``application_name`` of the LISTEN connection (find it in ``pg_stat_activity``).
LISTEN_APPLICATION_NAME: Final = "chatbus-listen"
#: ``application_name`` of pooled connections, unless the DSN sets one.
POOL_APPLICATION_NAME: Final = "chatbus"

# libpq TCP keepalives: a peer that vanished without a FIN is noticed in about
# idle + interval * count seconds even when no traffic flows.
_KEEPALIVES: Final[dict[str, int]] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}

# Exceptions that mean "the store failed" rather than "chatbus has a bug".
_DB_ERRORS: Final = (psycopg.Error, OSError)


def channel_for_schema(schema: str) -> str:
    """Return the NOTIFY channel used by the store and notifier of ``schema``.

    Derived deterministically (``chatbus_`` + MD5 of the schema name), so it is a
    valid identifier of fixed length whatever the schema is called.
    """
    return "chatbus_" + hashlib.md5(schema.encode("utf-8")).hexdigest()


class _AioRunner:
    """Typed wrapper around trio-asyncio (which is untyped).

    :meth:`run` is the one trio → asyncio crossing of a logical operation.
    """

    __slots__ = ("_loop",)

    def __init__(self, loop: Any) -> None:
        self._loop = loop

    async def run(self, fn: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> _T:
        result: _T = await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args)
        return result


@final
@attrs.frozen
class _Queries:
    """The store's SQL, composed once per schema with :class:`psycopg.sql.Identifier`.

    The statements run by :mod:`chatbus._pq` (``$n`` placeholders, text parameters)
    are kept as UTF-8 bytes; the keyed ones, run by psycopg, as plain strings (psycopg
    converts a query once, cached by its text).
    """

    append_unkeyed: bytes
    append_streams: bytes
    lock_stream: str
    find_keys: str
    insert_keyed: str
    read: bytes
    heads: bytes

    @classmethod
    def for_schema(cls, schema: str) -> _Queries:
        names = {
            "streams": sql.Identifier(schema, "streams"),
            "messages": sql.Identifier(schema, "messages"),
            "now_micros": _NOW_MICROS,
            "created_micros": _CREATED_MICROS,
        }
        # The bodies of a batch travel as ONE text parameter, joined with U+001E
        # (see _pack_bodies), and are split back server-side; each piece is still
        # cast to json on its own. Much cheaper on the client than a text[]
        # parameter, which psycopg escapes element by element.
        #
        # One statement, one implicit transaction (pool connections are autocommit):
        # bump the counter (the row lock orders concurrent appenders), insert the
        # batch with the ids just reserved, and notify once.
        append_unkeyed = sql.SQL(
            """
            WITH bump AS (
                INSERT INTO {streams} AS st (stream, last_id)
                VALUES ($1::text, $2::bigint)
                ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id
                RETURNING st.last_id
            ), ins AS (
                INSERT INTO {messages} (stream, id, key, body)
                SELECT $1::text, bump.last_id - $2::bigint + b.ord, NULL, b.body::json
                FROM bump,
                    unnest(string_to_array($3::text, chr(30))) WITH ORDINALITY
                    AS b(body, ord)
            )
            SELECT bump.last_id, {now_micros}, pg_notify(
                $4::text, json_build_object('stream', $1::text, 'last_id', bump.last_id)::text
            ) FROM bump
            """
        ).format(**names)
        # Several streams in one statement (coalesced appends): one JSON array of
        # [stream, count, packed bodies] (the bodies of a stream packed as above).
        # The counter rows are upserted in ORDER BY stream COLLATE "C": the
        # ModifyTable node takes each row lock as the sorted rows reach it, so every
        # multi-stream statement, in every process, locks its rows in the same order
        # and two of them cannot deadlock (a single-stream statement holds one row).
        # One pg_notify per stream, with that stream's new last id.
        append_streams = sql.SQL(
            """
            WITH input AS MATERIALIZED (
                SELECT s.value->>0 AS stream, (s.value->>1)::bigint AS n, s.value->>2 AS packed
                FROM json_array_elements($1::json) AS s
            ), bump AS (
                INSERT INTO {streams} AS st (stream, last_id)
                SELECT input.stream, input.n FROM input ORDER BY input.stream COLLATE "C"
                ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id
                RETURNING st.stream, st.last_id
            ), ins AS (
                INSERT INTO {messages} (stream, id, key, body)
                SELECT bump.stream, bump.last_id - input.n + b.ord, NULL, b.body::json
                FROM bump JOIN input ON input.stream = bump.stream,
                    unnest(string_to_array(input.packed, chr(30))) WITH ORDINALITY
                    AS b(body, ord)
            )
            SELECT bump.stream, bump.last_id, {now_micros},
                pg_notify(
                    $2::text,
                    json_build_object('stream', bump.stream, 'last_id', bump.last_id)::text
                )
            FROM bump
            """
        ).format(**names)
        # Keyed appends take the row lock first, then look the keys up in a new
        # statement (a new snapshot, taken after the lock), so concurrent appends with
        # the same key serialise and the later one finds the earlier one's message.
        lock_stream = sql.SQL(
            """
            INSERT INTO {streams} AS st (stream, last_id) VALUES (%s::text, 0)
            ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id
            RETURNING st.last_id
            """
        ).format(**names)
        # One index probe per key, whatever the statistics say. Keys (any text but
        # NUL) travel as a binary text[]: no escaping.
        find_keys = sql.SQL(
            "SELECT m.key, m.id, m.body::text, m.created_at"
            " FROM unnest(%b::text[]) AS k(key) JOIN {messages} AS m"
            " ON m.stream = %s::text AND m.key = k.key AND m.key IS NOT NULL"
        ).format(**names)
        insert_keyed = sql.SQL(
            """
            WITH ins AS (
                INSERT INTO {messages} (stream, id, key, body)
                SELECT %(stream)s::text, %(first)s::bigint - 1 + b.ord, b.key, b.body::json
                FROM unnest(
                    %(keys)b::text[], string_to_array(%(bodies)s::text, chr(30))
                ) WITH ORDINALITY AS b(key, body, ord)
            ), upd AS (
                UPDATE {streams} SET last_id = %(last_id)s::bigint WHERE stream = %(stream)s::text
            )
            SELECT now(), pg_notify(
                %(channel)s::text,
                json_build_object('stream', %(stream)s::text, 'last_id', %(last_id)s::bigint)::text
            )
            """
        ).format(**names)
        # A page as a few JSON values, each [[id, key, body, created_at µs], …]: one
        # json.loads decodes the ids, keys and bodies of many rows at once (body is a
        # json column, embedded verbatim). Rows are grouped by the running total of
        # their body sizes, 16 MiB a group, so no value nears Postgres's 1 GB limit
        # on one string whatever the page holds.
        read = sql.SQL(
            """
            SELECT json_agg(json_build_array(m.id, m.key, m.body, m.micros) ORDER BY m.id)
            FROM (
                SELECT id, key, body,
                    {created_micros} AS micros,
                    sum(octet_length(body::text)) OVER (ORDER BY id) AS running
                FROM {messages}
                WHERE stream = $1::text AND id > $2::bigint ORDER BY id LIMIT $3::bigint
            ) AS m
            GROUP BY m.running / 16777216
            ORDER BY min(m.id)
            """
        ).format(**names)
        heads = sql.SQL(
            "SELECT json_object_agg(st.stream, st.last_id) FROM {streams} AS st"
            " WHERE st.stream IN (SELECT json_array_elements_text($1::json))"
        ).format(**names)
        return cls(
            append_unkeyed=append_unkeyed.as_string(None).encode("utf-8"),
            append_streams=append_streams.as_string(None).encode("utf-8"),
            lock_stream=lock_stream.as_string(None),
            find_keys=find_keys.as_string(None),
            insert_keyed=insert_keyed.as_string(None),
            read=read.as_string(None).encode("utf-8"),
            heads=heads.as_string(None).encode("utf-8"),
        )


#: ``now()`` and ``created_at`` as µs since the epoch, exact on every server version:
#: whole seconds and the microseconds within the second each fit a double exactly
#: (``extract`` returns one before PostgreSQL 14).
_NOW_MICROS: Final = sql.SQL(
    "(extract(epoch FROM date_trunc('second', now()))::bigint * 1000000"
    " + extract(microseconds FROM now())::bigint % 1000000)"
)
_CREATED_MICROS: Final = sql.SQL(
    "(extract(epoch FROM date_trunc('second', created_at))::bigint * 1000000"
    " + extract(microseconds FROM created_at)::bigint % 1000000)"
)


def _plan_keyed_batch(
    drafts: list[Draft], existing: dict[str, Message]
) -> tuple[list[Message | int], list[Draft]]:
    """Split a batch into already-stored messages and new drafts.

    Returns ``slots`` (per draft: the existing message, or the index of the new draft
    it resolves to) and the new drafts in order. A key used earlier in the stream
    resolves to the stored message; a key repeated within the batch to its first use.
    """
    slots: list[Message | int] = []
    new: list[Draft] = []
    first_new_with_key: dict[str, int] = {}
    for draft in drafts:
        if draft.key is not None:
            if (old := existing.get(draft.key)) is not None:
                slots.append(old)
                continue
            if (index := first_new_with_key.get(draft.key)) is not None:
                slots.append(index)
                continue
            first_new_with_key[draft.key] = len(new)
        slots.append(len(new))
        new.append(draft)
    return slots, new


def _ddl(schema: str) -> list[sql.Composed]:
    ident = sql.Identifier(schema)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ( stream text PRIMARY KEY, last_id bigint NOT NULL)"
        ).format(sql.Identifier(schema, "streams")),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " stream text NOT NULL,"
            " id bigint NOT NULL,"
            " key text,"
            " body json NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (stream, id))"
        ).format(sql.Identifier(schema, "messages")),
        sql.SQL(
            "CREATE UNIQUE INDEX IF NOT EXISTS messages_stream_key"
            " ON {} (stream, key) WHERE key IS NOT NULL"
        ).format(sql.Identifier(schema, "messages")),
    ]


def _ddl_lock_key(schema: str) -> int:
    # A signed 64-bit advisory lock key, fixed per schema.
    digest = hashlib.md5(b"chatbus-ddl:" + schema.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _utc(ts: datetime.datetime) -> datetime.datetime:
    # Pool sessions run in UTC (see _configure_connection): no conversion needed.
    return ts if ts.tzinfo is datetime.UTC else ts.astimezone(datetime.UTC)


def _store_error(what: str, exc: BaseException) -> StoreError:
    return StoreError(f"{what} failed: {type(exc).__name__}: {exc}".strip())


#: The most drafts, and packed body characters, one coalesced statement carries (an
#: append bigger than that on its own still goes out, alone).
_MAX_STATEMENT_DRAFTS: Final = 4096
#: Default limit on unkeyed append statements running at once (see open_postgres).
_DEFAULT_MAX_IN_FLIGHT: Final = 3
_MAX_STATEMENT_CHARS: Final = 8 * 1024 * 1024


@attrs.frozen(kw_only=True)
class PostgresStoreStatistics:
    """A snapshot of a :class:`PostgresStore`'s append coalescing and connections.

    Attributes:
        appends: Unkeyed :meth:`~PostgresStore.append` calls that reached the server
            queue (keyed appends take their own path and are not counted).
        statements: Unkeyed append statements sent (each one transaction).
        merged_statements: Statements that carried more than one append.
        largest_statement: The most appends one statement carried.
        in_flight: Statements running (or about to be sent) now.
        pending: Appends waiting for a statement now.
        connections: Pool connections the store holds now, busy or idle. It keeps
            them between operations and gives one back after 10 s unused (checked
            when the next operation starts), or when it failed or was cancelled.
        borrows: Connections taken from the pool so far: steady traffic keeps this
            flat; a climbing count means connections keep failing.
    """

    appends: int
    statements: int
    merged_statements: int
    largest_statement: int
    in_flight: int
    pending: int
    connections: int
    borrows: int


@final
@attrs.define(eq=False)
class _PendingAppend:
    """One caller's unkeyed append: sent alone, or merged into another caller's statement."""

    stream: str
    packed: str
    bodies: list[Any]
    #: Set when the outcome is in, or when this caller is promoted to send a statement.
    wake: trio.Event = attrs.field(factory=trio.Event)
    #: Promoted: holds a reserved in-flight slot and must send the next statement.
    lead: bool = False
    #: Part of a statement that was handed to the server: it may commit.
    sent: bool = False
    messages: list[Message] | None = None
    cause: BaseException | None = None

    def outcome(self) -> list[Message]:
        if self.cause is not None:
            raise _store_error("append", self.cause) from self.cause
        assert self.messages is not None
        return self.messages


@final
@attrs.define(eq=False)
class _Lanes:
    """Pool connections lent to trio, kept between operations.

    The pool (psycopg, through trio-asyncio) makes, configures, checks and replaces
    connections; taking one from it and giving it back are asyncio crossings, so a
    connection is borrowed once and then reused from trio for as long as operations
    keep coming. Single statements run on its ``pgconn`` (:mod:`chatbus._pq`);
    keyed appends run on it through psycopg, one crossing each. A connection that
    failed, was cancelled mid-operation, idled for ``idle_return`` seconds or has
    been lent for ``max_lend`` seconds goes back to the pool, which resets, checks or
    closes it. ``limit`` caps the connections out at once (the pool's ``max_size``);
    waiting for one is bounded by ``timeout``.
    """

    _pool: psycopg_pool.AsyncConnectionPool
    _aio: _AioRunner
    _limit: int
    _timeout: float
    idle_return: float = 10.0
    #: Seconds a connection stays lent before it goes back to the pool at its next
    #: use, so the pool's own upkeep (``max_lifetime``, checks) still reaches it.
    max_lend: float = 300.0
    _slots: trio.Semaphore = attrs.field(init=False)
    #: Borrowed, idle, most recently used last: (connection, idle since).
    _idle: list[tuple[psycopg.AsyncConnection[Any], float]] = attrs.field(factory=list, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    #: Connections taken from the pool so far.
    borrows: int = attrs.field(default=0, init=False)
    _borrowed_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = attrs.field(
        factory=weakref.WeakKeyDictionary, init=False
    )
    #: Names of the statements prepared in each connection's session.
    _prepared: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], set[bytes]] = attrs.field(
        factory=weakref.WeakKeyDictionary, init=False
    )

    def __attrs_post_init__(self) -> None:
        self._slots = trio.Semaphore(self._limit)

    @property
    def held(self) -> int:
        """Connections out of the pool now: running an operation, or idle here."""
        return self._limit - self._slots.value + len(self._idle)

    async def acquire(self) -> psycopg.AsyncConnection[Any]:
        """Return an idle connection, borrowing one from the pool if none is idle.

        Waits ``timeout`` seconds at most, in all, for a free slot and the pool.
        """
        deadline = trio.current_time() + self._timeout
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_at(deadline) as scope:
                await self._slots.acquire()
            if scope.cancelled_caught:
                raise psycopg_pool.PoolTimeout(
                    f"couldn't get a connection after {self._timeout:.2f} sec"
                ) from None
        try:
            idle = self._idle
            if idle and trio.current_time() - idle[0][1] > self.idle_return:
                await self._give_back(idle.pop(0)[0])  # unused for a while: the pool's again
            while idle:
                conn = idle.pop()[0]
                lent_for = trio.current_time() - self._borrowed_at.get(conn, 0.0)
                if lent_for <= self.max_lend and _usable(conn):
                    return conn
                await self._give_back(conn)
            remaining = max(0.001, deadline - trio.current_time())
            conn = await self._aio.run(functools.partial(self._pool.getconn, timeout=remaining))
            self.borrows += 1
            self._borrowed_at[conn] = trio.current_time()
            return conn
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Take back a connection that is idle and healthy after an operation."""
        self._slots.release()
        if self._closed:
            _pq.close(conn.pgconn)
        else:
            self._idle.append((conn, trio.current_time()))

    async def discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give back a connection in an unknown state; the pool resets or closes it.

        Runs even when the caller is being cancelled (bounded by a few seconds).
        """
        self._slots.release()
        await self._give_back(conn)

    async def prepared(self, conn: psycopg.AsyncConnection[Any], query: bytes) -> bytes:
        """The name ``query`` is prepared under in ``conn``'s session (prepared now if new).

        The name is derived from the query text (which holds the schema), so it
        stays valid for as long as the session, also after the connection went back
        to the pool and was borrowed again.
        """
        names = self._prepared.get(conn)
        if names is None:
            names = self._prepared[conn] = set()
        name = _statement_name(query)
        if name not in names:
            # Already there if this session was lent to us before.
            with contextlib.suppress(psycopg.errors.DuplicatePreparedStatement):
                await _pq.prepare(conn.pgconn, name, query)
            names.add(name)
        return name

    def forget_prepared(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """``conn``'s session dropped our prepared statements (``DEALLOCATE ALL``).

        psycopg sends that when it rolls back a transaction of its own after preparing
        statements (the keyed path), and a pool reset may too; the store finds out
        when a statement's name is unknown, forgets, and prepares again.
        """
        self._prepared.pop(conn, None)

    async def recover(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Take back a connection whose statement was interrupted (cancelled, failed).

        As psycopg does for its own interrupted queries: ask the server to cancel
        the statement, wait for it to end, and keep the connection if it is idle
        again; else give it to the pool to close. A statement not fully sent yet
        cannot be cancelled (the server is still reading it): the connection goes
        at once. Runs even when the caller is being cancelled, bounded by a few
        seconds.
        """
        with trio.move_on_after(5.0, shield=True):
            pgconn = conn.pgconn
            try:
                if (
                    pgconn.status == pq.ConnStatus.OK
                    and pgconn.transaction_status == pq.TransactionStatus.ACTIVE
                    and _pq.fully_sent(pgconn)
                ):
                    await self._aio.run(functools.partial(conn.cancel_safe, timeout=4.0))
                    await _pq.drain(pgconn)
            except Exception:
                # Not idle after all (or the loop is gone): discarded below.
                logger.debug("cancelling an interrupted statement failed", exc_info=True)
            if _usable(conn):
                self.release(conn)
                return
        await self.discard(conn)

    async def aclose(self) -> None:
        """Give every idle connection back; connections still out close on release."""
        self._closed = True
        while self._idle:
            await self._give_back(self._idle.pop()[0])

    async def _give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Return ``conn`` to the pool, even when the caller is being cancelled.

        A connection neither here nor in the pool would still count towards the pool's
        ``max_size`` for good, so this is shielded (bounded by a few seconds).
        """
        with trio.move_on_after(5.0, shield=True) as scope:
            try:
                await self._aio.run(self._pool.putconn, conn)
            except Exception:  # the pool is closing: close it ourselves
                _pq.close(conn.pgconn)
        if scope.cancelled_caught:  # pragma: no cover - the pool did not answer
            _pq.close(conn.pgconn)


@functools.cache
def _statement_name(query: bytes) -> bytes:
    """A prepared-statement name for ``query``: ``chatbus_`` and a digest of its text."""
    return b"chatbus_" + hashlib.blake2b(query, digest_size=12).hexdigest().encode("ascii")


def _usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    """An idle connection whose socket has nothing to say (else: probably closed)."""
    pgconn = conn.pgconn
    return (
        pgconn.status == pq.ConnStatus.OK
        and pgconn.transaction_status == pq.TransactionStatus.IDLE
        and not _pq.has_input(pgconn)
    )


@final
@attrs.define(eq=False)
class PostgresStore:
    """A :class:`~chatbus.Store` in PostgreSQL. Made by :func:`open_postgres`.

    Safe to use from many trio tasks at once and from many processes at once. Every
    database or connection error is raised as :class:`~chatbus.StoreError` with the
    psycopg error as ``__cause__``; a failed append stores nothing.
    """

    _lanes: _Lanes
    _aio: _AioRunner
    _schema: str
    _channel: str
    _queries: _Queries
    _max_in_flight: int = 3
    #: How long a statement carrying other callers' appends may run once sent; its
    #: leader is shielded from cancellation meanwhile (the others wait for it).
    _shield_timeout: float = 65.0
    _closed: bool = attrs.field(default=False, init=False)
    _in_flight: int = attrs.field(default=0, init=False)
    _pending: deque[_PendingAppend] = attrs.field(factory=deque, init=False)
    _promoted: bool = attrs.field(default=False, init=False)
    _appends: int = attrs.field(default=0, init=False)
    _statements: int = attrs.field(default=0, init=False)
    _merged_statements: int = attrs.field(default=0, init=False)
    _largest_statement: int = attrs.field(default=0, init=False)

    @property
    def schema(self) -> str:
        """The schema holding this store's tables."""
        return self._schema

    @property
    def channel(self) -> str:
        """The NOTIFY channel every append of this store notifies on."""
        return self._channel

    async def append(self, stream: str, drafts: Sequence[Draft]) -> list[Message]:
        """Append ``drafts`` to ``stream`` in one transaction; see :meth:`chatbus.Store.append`.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the append failed; nothing of the batch was stored.
        """
        check_stream(stream)
        if not drafts:
            await trio.lowlevel.checkpoint()
            return []
        drafts = list(drafts)
        if all(draft.key is None for draft in drafts):
            return await self._append_unkeyed(stream, drafts)
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise StoreError("append failed: the Postgres store is closed")
        try:
            conn = await self._lanes.acquire()
            try:
                messages = await self._aio.run(self._aio_append_keyed, conn, stream, drafts)
            except BaseException:
                await self._lanes.discard(conn)  # the pool rolls back or replaces it
                raise
            self._lanes.release(conn)
        except _DB_ERRORS as exc:
            raise _store_error("append", exc) from exc
        return messages

    @property
    def max_in_flight(self) -> int:
        """Most unkeyed append statements running at once; more appends are merged."""
        return self._max_in_flight

    def statistics(self) -> PostgresStoreStatistics:
        """Return a snapshot of the append coalescing and connection counters."""
        return PostgresStoreStatistics(
            appends=self._appends,
            statements=self._statements,
            merged_statements=self._merged_statements,
            largest_statement=self._largest_statement,
            in_flight=self._in_flight,
            pending=len(self._pending),
            connections=self._lanes.held,
            borrows=self._lanes.borrows,
        )

    # ---- unkeyed appends: cross-stream group commit ----
    #
    # Leader/follower, no background task. An append that finds a free slot (fewer
    # than max_in_flight statements running, nobody queued) sends its own statement
    # at once. Otherwise it queues and waits. When a statement completes, the oldest
    # queued append is promoted: it takes a slot and sends ONE statement with
    # everything queued (up to the caps), for all streams; the others get their
    # slices. A queued caller cancelled before its entry was sent is removed and
    # stores nothing. Every counter row is bumped once per statement, in sorted order
    # (see _Queries), and a stream's entries get consecutive ids in arrival order.

    async def _append_unkeyed(self, stream: str, drafts: list[Draft]) -> list[Message]:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise StoreError("append failed: the Postgres store is closed")
        try:
            # Before merging: a bad body fails its own caller only.
            packed, bodies = _pack_bodies(drafts)
        except psycopg.DataError as exc:
            await trio.lowlevel.checkpoint()
            raise _store_error("append", exc) from exc
        entry = _PendingAppend(stream, packed, bodies)
        self._appends += 1
        if self._pending or self._in_flight >= self._max_in_flight:
            self._pending.append(entry)
            try:
                await entry.wake.wait()
            except BaseException:
                self._abandon(entry)
                raise
            if not entry.lead:
                return entry.outcome()
        else:
            self._in_flight += 1
        await self._lead(entry)
        return entry.outcome()

    def _abandon(self, entry: _PendingAppend) -> None:
        """A queued caller was cancelled: drop its entry unless it was already sent."""
        if entry.sent:
            return  # it is in a statement that may commit; nothing to undo
        if entry.lead:
            entry.lead = False
            self._promoted = False
            self._in_flight -= 1
        if entry in self._pending:  # an unsent entry is always queued
            self._pending.remove(entry)
        self._promote()

    def _promote(self) -> None:
        """Hand a free slot to the oldest queued append, which then sends a statement."""
        if self._promoted or not self._pending or self._in_flight >= self._max_in_flight:
            return
        head = self._pending[0]
        head.lead = True
        self._promoted = True
        self._in_flight += 1
        head.wake.set()

    async def _lead(self, entry: _PendingAppend) -> None:
        """Send one statement with ``entry`` and what is queued; one slot is held."""
        batch = [entry]
        pending = self._pending
        if pending and pending[0] is entry:
            pending.popleft()
            self._promoted = False
            drafts = len(entry.bodies)
            chars = len(entry.packed)
            while pending:
                head = pending[0]
                drafts += len(head.bodies)
                chars += len(head.packed)
                if drafts > _MAX_STATEMENT_DRAFTS or chars > _MAX_STATEMENT_CHARS:
                    break
                batch.append(pending.popleft())
        for member in batch:
            member.sent = True
        self._promote()  # leftovers over the caps, if a slot is still free
        self._statements += 1
        if len(batch) > 1:
            self._merged_statements += 1
            self._largest_statement = max(self._largest_statement, len(batch))
        elif not self._largest_statement:
            self._largest_statement = 1
        try:
            await self._send(batch)
        finally:
            self._in_flight -= 1
            for member in batch:
                if member.messages is None and member.cause is None:
                    # The leader stopped half-way (KeyboardInterrupt, a cancelled solo
                    # send): nobody else may be left waiting without an outcome.
                    member.cause = psycopg.OperationalError(
                        "the statement carrying this append was abandoned;"
                        " it may have been committed"
                    )
                if member is not entry:
                    member.wake.set()
            self._promote()

    async def _send(self, batch: list[_PendingAppend]) -> None:
        """Run one statement for ``batch`` and record each member's outcome."""
        groups: dict[str, list[_PendingAppend]] = {}
        for member in batch:
            groups.setdefault(member.stream, []).append(member)
        request = [
            (
                stream,
                sum(len(member.bodies) for member in members),
                _BODY_SEP.join(member.packed for member in members),
            )
            for stream, members in groups.items()
        ]
        try:
            if len(batch) == 1:
                # Only this caller's work: cancellable as any single operation.
                rows = await self._append_statement(request)
            else:
                # Other callers wait for this statement: the leader's cancellation
                # must not abandon it half-way (it may commit). Bounded all the same.
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self._shield_timeout
                    rows = await self._append_statement(request)
                if scope.cancelled_caught:
                    raise psycopg.OperationalError(
                        f"the statement did not finish within {self._shield_timeout} s"
                        " (it may have been committed)"
                    )
        except Exception as exc:
            for member in batch:
                member.cause = exc
            if not isinstance(exc, _DB_ERRORS):
                raise  # a bug: the leader sees it as is; the others a StoreError
            return
        for stream, last_id, created_at in rows:
            members = groups.pop(stream)
            first = last_id - sum(len(member.bodies) for member in members) + 1
            for member in members:
                member.messages = [
                    Message.from_row(stream, first + i, body, None, created_at)
                    for i, body in enumerate(member.bodies)
                ]
                first += len(member.bodies)
        if groups:  # pragma: no cover - every upsert returns its row
            missing = psycopg.DataError(f"no counter row returned for {len(groups)} streams")
            for members in groups.values():
                for member in members:
                    member.cause = missing

    async def read(self, stream: str, after: int, limit: int) -> list[Message]:
        """Return up to ``limit`` messages after ``after``; see :meth:`chatbus.Store.read`.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the query failed.
        """
        check_stream(stream)
        check_after(after)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, got {limit!r}")
        if limit == 0:
            await trio.lowlevel.checkpoint()
            return []
        params = [stream.encode("utf-8"), b"%d" % after, b"%d" % limit]
        result = await self._execute("read", self._queries.read, params)
        to_datetime = _pq.from_epoch_micros
        return [
            Message.from_row(stream, id_, body, key, to_datetime(micros))
            for group in range(result.ntuples)
            for id_, key, body, micros in json.loads(_pq.value(result, group, 0))
        ]

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        """Return each stream's highest committed id in one query; see :meth:`chatbus.Store.heads`.

        Raises:
            InvalidStream: one of ``streams`` is not a valid stream name.
            StoreError: the query failed.
        """
        wanted = list(dict.fromkeys(check_stream(stream) for stream in streams))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return {}
        params = [json.dumps(wanted, ensure_ascii=False).encode("utf-8")]
        result = await self._execute("heads", self._queries.heads, params)
        found = result.get_value(0, 0)
        heads: dict[str, int] = {} if found is None else json.loads(found)
        return {stream: heads.get(stream, 0) for stream in wanted}

    async def _execute(self, what: str, query: bytes, params: list[bytes]) -> pq.abc.PGresult:
        """Run one statement on a lent connection, from trio; errors as StoreError."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise StoreError(f"{what} failed: the Postgres store is closed")
        try:
            return await self._statement(query, params)
        except _DB_ERRORS as exc:
            raise _store_error(what, exc) from exc

    async def _statement(self, query: bytes, params: list[bytes]) -> pq.abc.PGresult:
        """Run one statement on a lent connection; psycopg errors pass as they are."""
        lanes = self._lanes
        conn = await lanes.acquire()
        try:
            name = await lanes.prepared(conn, query)
            try:
                result = await _pq.execute(conn.pgconn, query, params, name=name)
            except psycopg.errors.InvalidSqlStatementName:
                # Deallocated behind our back (see _Lanes.forget_prepared); the
                # statement did not run: prepare it again and run it.
                lanes.forget_prepared(conn)
                name = await lanes.prepared(conn, query)
                result = await _pq.execute(conn.pgconn, query, params, name=name)
        except psycopg.DatabaseError:
            lanes.release(conn)  # the server refused it: the connection is fine
            raise
        except BaseException:
            await lanes.recover(conn)  # cancelled or lost mid-statement
            raise
        lanes.release(conn)
        return result

    async def _append_statement(
        self, request: list[tuple[str, int, str]]
    ) -> list[tuple[str, int, datetime.datetime]]:
        """One statement: per ``(stream, count, packed bodies)``, bump, insert, notify.

        Returns ``(stream, new last id, commit timestamp)`` per stream.
        """
        channel = self._channel.encode("utf-8")
        if len(request) == 1:
            ((stream, n, packed),) = request
            params = [stream.encode("utf-8"), b"%d" % n, packed.encode("utf-8"), channel]
            result = await self._statement(self._queries.append_unkeyed, params)
            if result.ntuples != 1:  # pragma: no cover - the upsert returns its row
                return []
            last_id, micros = _pq.value(result, 0, 0), _pq.value(result, 0, 1)
            return [(stream, int(last_id), _pq.from_epoch_micros(int(micros)))]
        document = json.dumps(request, ensure_ascii=False, separators=(",", ":"))
        result = await self._statement(
            self._queries.append_streams, [document.encode("utf-8"), channel]
        )
        return [
            (
                _pq.value(result, row, 0).decode("utf-8"),
                int(_pq.value(result, row, 1)),
                _pq.from_epoch_micros(int(_pq.value(result, row, 2))),
            )
            for row in range(result.ntuples)
        ]

    # ---- asyncio side: each method below is one whole logical operation ----
    #
    # Runs on a connection lent by _Lanes (autocommit); it manages its transaction
    # explicitly. Should it fail half-way, the lanes give the connection back to the
    # pool, which rolls back or replaces it.

    async def _aio_append_keyed(
        self, conn: psycopg.AsyncConnection[Any], stream: str, drafts: list[Draft]
    ) -> list[Message]:
        q = self._queries
        keys = list(dict.fromkeys(d.key for d in drafts if d.key is not None))
        # Pipelined: BEGIN + lock + key lookup travel together, then insert +
        # COMMIT: two round trips. The server still runs them one after the other,
        # so the lookup's snapshot is taken after the row lock was granted.
        async with conn.pipeline():
            async with conn.transaction():
                lock = await conn.execute(q.lock_stream, (stream,))
                found = await conn.execute(q.find_keys, (keys, stream))
                row = await lock.fetchone()
                if row is None:  # pragma: no cover
                    raise psycopg.DataError("counter upsert returned no row")
                last_id: int = row[0]
                rows = await found.fetchall()
                old_bodies = _decode_bodies([body for _, _, body, _ in rows])
                existing = {
                    key: Message.from_row(stream, id_, body, key, _utc(ts))
                    for (key, id_, _, ts), body in zip(rows, old_bodies, strict=True)
                }
                slots, new = _plan_keyed_batch(drafts, existing)
                if not new:
                    return [slot for slot in slots if isinstance(slot, Message)]
                # Raising here (a bad body) rolls the transaction back.
                packed, bodies = _pack_bodies(new)
                new_last = last_id + len(new)
                inserted = await conn.execute(
                    q.insert_keyed,
                    {
                        "stream": stream,
                        "first": last_id + 1,
                        "keys": [d.key for d in new],
                        "bodies": packed,
                        "last_id": new_last,
                        "channel": self._channel,
                    },
                )
            # Fetching after the COMMIT was queued: one sync for both.
            row = await inserted.fetchone()
        if row is None:  # pragma: no cover
            raise psycopg.DataError("insert returned no row")
        created_at = _utc(row[0])
        fresh = [
            Message.from_row(stream, last_id + 1 + i, body, d.key, created_at)
            for i, (d, body) in enumerate(zip(new, bodies, strict=True))
        ]
        return [fresh[slot] if isinstance(slot, int) else slot for slot in slots]


#: Joins the bodies of a batch into one query parameter. A control character: valid
#: JSON text never contains it raw (not even inside strings), so splitting on it
#: server-side gives back exactly the bodies.
_BODY_SEP: Final = "\x1e"


def _pack_bodies(drafts: Sequence[Draft]) -> tuple[str, list[Any]]:
    """Return the bodies of ``drafts`` joined into one parameter, and decoded.

    One :func:`json.loads` of the whole batch instead of one per body. Raises
    :class:`psycopg.DataError` (hence :class:`~chatbus.StoreError`), before anything
    is sent, unless the bodies are exactly ``len(drafts)`` JSON values with no
    separator inside; the server still casts each piece to ``json`` on its own.
    """
    texts = [draft.body_json for draft in drafts]
    packed = _BODY_SEP.join(texts)
    try:
        bodies: list[Any] = json.loads(
            "[" + ",".join(texts) + "]", parse_constant=_reject_json_constant
        )
    except (ValueError, RecursionError) as exc:
        raise psycopg.DataError(f"a message body is not valid JSON: {exc}") from None
    if len(bodies) != len(texts) or packed.count(_BODY_SEP) != len(texts) - 1:
        raise psycopg.DataError("a message body is not exactly one JSON value")
    return packed, bodies


def _reject_json_constant(name: str) -> Any:
    # NaN, Infinity, -Infinity: Python's json accepts them, the server's json does not.
    raise ValueError(f"{name} is not valid JSON")


def _decode_bodies(texts: list[str]) -> list[Any]:
    """Decode stored ``json`` bodies (each one valid JSON value) with one :func:`json.loads`."""
    if not texts:
        return []
    bodies: list[Any] = json.loads("[" + ",".join(texts) + "]")
    if len(bodies) != len(texts):  # pragma: no cover - the json column validated them
        raise psycopg.DataError("a stored message body is not exactly one JSON value")
    return bodies


class _ListenLost(Exception):
    """The LISTEN connection failed or went silent."""


@final
@attrs.define(eq=False)
class _ListenSession:
    """One LISTEN connection, driven by hand through :mod:`psycopg.pq`."""

    pgconn: pq.abc.PGconn
    channel: bytes
    ping_channel: bytes
    handler: NoticeHandler
    sock: int = attrs.field(init=False)
    query_in_flight: bool = attrs.field(default=False, init=False)
    ping_token: bytes | None = attrs.field(default=None, init=False)
    ping_answered: bool = attrs.field(default=False, init=False)
    notices: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.sock = self.pgconn.socket

    @property
    def backend_pid(self) -> int:
        return self.pgconn.backend_pid

    @property
    def ping_done(self) -> bool:
        """The last ping came back and its query finished."""
        return self.ping_answered and not self.query_in_flight

    def close(self) -> None:
        self.sock = -1
        _pq.close(self.pgconn)

    async def send(self, query: bytes, params: Sequence[bytes] | None = None) -> None:
        if self.query_in_flight:  # pragma: no cover - callers check
            raise _ListenLost("a query is already in flight")
        try:
            if params is None:
                self.pgconn.send_query(query)
            else:
                self.pgconn.send_query_params(query, params)
            # Our queries are tiny: they fit in the socket buffer at once.
            while self.pgconn.flush():
                await trio.lowlevel.wait_writable(self.sock)
        except _DB_ERRORS as exc:
            raise _ListenLost(f"sending failed: {exc}") from exc
        self.query_in_flight = True

    async def execute(self, query: bytes) -> None:
        """Send ``query`` and wait until all its results are in."""
        await self.send(query)
        while self.query_in_flight:
            await trio.lowlevel.wait_readable(self.sock)
            self.pump()

    def pump(self) -> None:
        """Consume what has arrived: query results, then notifications. Never blocks."""
        pgconn = self.pgconn
        try:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    self.query_in_flight = False
                    break
                if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                    message = result.error_message.decode("utf-8", "replace").strip()
                    raise _ListenLost(f"query failed: {message}")
            while (notify := pgconn.notifies()) is not None:
                self._dispatch(notify)
        except _DB_ERRORS as exc:
            raise _ListenLost(str(exc).strip() or type(exc).__name__) from exc
        if pgconn.status == pq.ConnStatus.BAD:
            raise _ListenLost("connection is bad")

    def _dispatch(self, notify: pq.PGnotify) -> None:
        if notify.relname == self.channel:
            parsed = _parse_payload(notify.extra)
            if parsed is not None:
                self.notices += 1
                self.handler.notice(*parsed)
        elif notify.relname == self.ping_channel and notify.extra == self.ping_token:
            self.ping_answered = True


def _parse_payload(payload: bytes) -> tuple[str, int] | None:
    """Decode ``{"stream": str, "last_id": int}``; ``None`` for anything else."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    stream = data.get("stream")
    last_id = data.get("last_id")
    if not isinstance(stream, str) or type(last_id) is not int or last_id < 1:
        return None
    try:
        check_stream(stream)
    except ValueError:
        return None
    return stream, last_id


async def _pin_host_address(conninfo: str) -> str:
    """Resolve a single host name off the event loop and pin it as ``hostaddr``.

    libpq's non-blocking connect still resolves host names synchronously; with
    ``hostaddr`` set it does not. Several hosts, sockets and addresses are left alone.
    """
    params = conninfo_to_dict(conninfo)
    host = str(params.get("host") or "")
    if params.get("hostaddr") or not host or "," in host or host.startswith("/"):
        return conninfo
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return conninfo
    port = int(str(params.get("port") or 5432))
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise psycopg.OperationalError(f"could not resolve host {host!r}: {exc}") from exc
    return make_conninfo(conninfo, hostaddr=str(infos[0][4][0]))


async def _connect_pq(conninfo: str, connect_timeout: float) -> pq.abc.PGconn:
    """Open a raw libpq connection without blocking the trio loop (or a thread).

    Follows libpq's ``PQconnectStart`` / ``PQconnectPoll`` protocol under
    :func:`trio.lowlevel.wait_readable` / ``wait_writable``; the timeout is ours,
    since libpq only enforces ``connect_timeout`` in its blocking connect.
    """
    conninfo = await _pin_host_address(conninfo)
    pgconn = pq.PGconn.connect_start(conninfo.encode("utf-8"))
    try:
        with trio.move_on_after(connect_timeout) as scope:
            status = pq.PollingStatus.WRITING
            while status != pq.PollingStatus.OK:
                if status == pq.PollingStatus.FAILED or pgconn.status == pq.ConnStatus.BAD:
                    message = pgconn.get_error_message().strip()
                    raise psycopg.OperationalError(f"connection failed: {message}")
                if status == pq.PollingStatus.READING:
                    await trio.lowlevel.wait_readable(pgconn.socket)
                else:
                    await trio.lowlevel.wait_writable(pgconn.socket)
                status = pq.PollingStatus(pgconn.connect_poll())
        if scope.cancelled_caught:
            raise psycopg.OperationalError(f"connection timed out after {connect_timeout} s")
        pgconn.nonblocking = 1
    except BaseException:
        pgconn.finish()
        raise
    return pgconn


@final
@attrs.define(eq=False)
class PostgresNotifier:
    """A :class:`~chatbus.Notifier` over PostgreSQL LISTEN/NOTIFY. Made by :func:`open_postgres`.

    The notices are sent by :class:`PostgresStore` inside each append transaction,
    so :meth:`notify` does nothing. :meth:`listen` owns one dedicated session
    connection (``application_name`` ``chatbus-listen``) and reads it with
    :mod:`psycopg.pq` under :func:`trio.lowlevel.wait_readable`.

    Liveness: libpq TCP keepalives, plus a self-notify ("ping") on a private channel
    every ``ping_interval`` seconds that must come back within ``ping_timeout``. A
    failed or silent connection is replaced (exponential backoff with jitter, up to
    ``max_backoff`` seconds) and each reconnect ends with ``handler.resync()``.
    """

    _conninfo: str
    _channel: str
    connect_timeout: float = 5.0
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    min_backoff: float = 0.05
    max_backoff: float = 5.0
    _reconnects: int = attrs.field(default=0, init=False)
    _sessions: set[_ListenSession] = attrs.field(factory=set, init=False)

    @property
    def channel(self) -> str:
        """The NOTIFY channel this notifier listens on."""
        return self._channel

    @property
    def reconnects(self) -> int:
        """How many times a LISTEN connection was replaced after a failure."""
        return self._reconnects

    @property
    def listen_pids(self) -> frozenset[int]:
        """Server process ids of the live LISTEN connections (for monitoring and tests)."""
        return frozenset(session.backend_pid for session in self._sessions)

    async def notify(self, stream: str, last_id: int) -> None:
        """Do nothing: :class:`PostgresStore` already notified inside the append transaction.

        The NOTIFY is part of the transaction that commits the batch, so it is delivered
        if and only if the batch commits, in commit order, to every process.
        """
        await trio.lowlevel.checkpoint()

    async def listen(
        self,
        handler: NoticeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report notices to ``handler`` until cancelled; see :meth:`chatbus.Notifier.listen`.

        ``task_status.started()`` is called once LISTEN is acknowledged by the server.
        After that, connection failures are never raised: the connection is replaced
        and ``handler.resync()`` is called once LISTEN is acknowledged again.

        Raises:
            StoreError: the first connection (before ``started()``) failed.
        """
        try:
            session = await self._open_session(handler)
        except _ListenLost as exc:
            raise StoreError(f"LISTEN connection failed: {exc}") from exc
        task_status.started()
        while True:
            try:
                await self._serve(session)
            except _ListenLost as exc:
                logger.warning("chatbus LISTEN connection lost (%s); reconnecting", exc)
            finally:
                self._sessions.discard(session)
                session.close()
            session = await self._reconnect(handler)
            self._reconnects += 1
            handler.resync()

    async def _reconnect(self, handler: NoticeHandler) -> _ListenSession:
        delay = self.min_backoff
        while True:
            # Jitter in [delay/2, delay]: processes that lost the server together
            # do not all come back in the same instant.
            await trio.sleep(random.uniform(delay / 2, delay))
            try:
                return await self._open_session(handler)
            except _ListenLost as exc:
                logger.info("chatbus LISTEN reconnect failed (%s)", exc)
                delay = min(delay * 2, self.max_backoff)

    async def _open_session(self, handler: NoticeHandler) -> _ListenSession:
        try:
            pgconn = await _connect_pq(self._conninfo, self.connect_timeout)
        except _DB_ERRORS as exc:
            raise _ListenLost(str(exc).strip()) from exc
        token = random.getrandbits(64)
        session = _ListenSession(
            pgconn=pgconn,
            channel=self._channel.encode("ascii"),
            ping_channel=f"{self._channel}_ping_{token:016x}".encode("ascii"),
            handler=handler,
        )
        try:
            listen = sql.SQL("LISTEN {}; LISTEN {}").format(
                sql.Identifier(self._channel),
                sql.Identifier(session.ping_channel.decode("ascii")),
            )
            with trio.fail_after(self.ping_timeout):
                await session.execute(listen.as_bytes(None))
        except BaseException as exc:
            session.close()
            if isinstance(exc, trio.TooSlowError):
                raise _ListenLost("LISTEN was not acknowledged in time") from exc
            raise
        self._sessions.add(session)
        return session

    async def _serve(self, session: _ListenSession) -> None:
        ping_query = b"SELECT pg_notify($1, $2)"
        next_ping = trio.current_time() + self.ping_interval
        ping_deadline: float | None = None
        serial = 0
        while True:
            with trio.move_on_at(next_ping if ping_deadline is None else ping_deadline):
                await trio.lowlevel.wait_readable(session.sock)
                session.pump()
            now = trio.current_time()
            if ping_deadline is not None:
                if not session.ping_done and now >= ping_deadline:
                    session.pump()  # the answer may be waiting, unread, in the socket
                    if not session.ping_done:
                        raise _ListenLost(f"no answer to a ping within {self.ping_timeout} s")
                if session.ping_done:
                    ping_deadline = None
                    next_ping = now + self.ping_interval
            elif now >= next_ping:
                serial += 1
                session.ping_token = str(serial).encode("ascii")
                session.ping_answered = False
                await session.send(ping_query, [session.ping_channel, session.ping_token])
                ping_deadline = now + self.ping_timeout


async def _configure_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Set up each new pool connection: session time zone UTC.

    ``timestamptz`` values then load directly as UTC datetimes (psycopg returns them
    in the session's time zone), with no zone conversion per row on our side.
    """
    await conn.execute("SET TIME ZONE 'UTC'")


async def _check_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Pool check: cheap unless the idle connection's socket has something to say.

    An idle connection should receive nothing. If its socket is readable, the
    server probably closed it (restart, ``pg_terminate_backend``), so a real round
    trip decides; otherwise the connection is handed out without one.
    """
    if conn.closed or conn.pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError("connection is closed")
    if _pq.has_input(conn.pgconn):
        await conn.execute("")


def _check_schema(schema: object) -> None:
    if not isinstance(schema, str):
        raise TypeError(f"schema must be a str, not {type(schema).__name__}")
    # Postgres truncates identifiers to 63 bytes: two long names could collide.
    if not schema or "\x00" in schema or len(schema.encode("utf-8", "replace")) > 63:
        raise ValueError(f"schema must be 1 to 63 bytes of UTF-8 without NULs, got {schema!r}")


def _with_defaults(dsn: str, **defaults: Any) -> str:
    given = conninfo_to_dict(dsn)
    extra = {name: value for name, value in defaults.items() if name not in given}
    return make_conninfo(dsn, **extra)


@asynccontextmanager
async def open_postgres(
    dsn: str,
    *,
    schema: str = "chatbus",
    min_connections: int = 1,
    max_connections: int = 10,
    max_in_flight: int | None = None,
    acquire_timeout: float = 5.0,
    connect_timeout: int = 5,
    ping_interval: float = 5.0,
    ping_timeout: float = 5.0,
    max_backoff: float = 5.0,
) -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    """Open a Postgres store and notifier pair for ``dsn``; close both on exit.

    Works from plain trio code: if no trio-asyncio loop is running in this task, one
    is opened for the lifetime of the block; otherwise the running one is used.
    Creates the schema and tables if they do not exist (safe when several processes
    start at once: the DDL runs under a transaction-scoped advisory lock).

    Example::

        async with chatbus.postgres.open_postgres(dsn) as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                ...

    Args:
        dsn: A libpq connection string or ``postgresql://`` URL. Keepalives, a
            ``connect_timeout`` and an ``application_name`` are added unless given.
        schema: The schema holding the tables; each schema is an independent
            namespace with its own NOTIFY channel.
        min_connections: Connections the pool keeps open (1 to 100).
        max_connections: Most connections the pool opens (``min_connections`` to 1000).
        max_in_flight: Most unkeyed append statements running at once (1 to
            ``max_connections - 1``, so reads always find a connection; 1 when the pool
            has a single connection). Appends made while that many are running are
            merged, across streams, into the next statement (group commit). Default:
            ``min(3, max_connections - 1)``.
        acquire_timeout: Seconds an operation waits for a pool connection before it
            fails with :class:`~chatbus.StoreError` (0.1 to 600). This is what makes
            a publish fail promptly while the database is unreachable.
        connect_timeout: libpq ``connect_timeout`` in seconds, unless the DSN sets one
            (1 to 600).
        ping_interval: Seconds between LISTEN liveness pings (0.1 to 3600).
        ping_timeout: Seconds a ping may take before the LISTEN connection is
            declared dead and replaced (0.1 to 3600).
        max_backoff: Longest pause between LISTEN reconnect attempts (0.1 to 600).

    Raises:
        StoreError: the database could not be reached or the schema not created.
    """
    _check_schema(schema)
    check_range("min_connections", min_connections, 1, 100)
    check_range("max_connections", max_connections, min_connections, 1000)
    if max_in_flight is None:
        max_in_flight = max(1, min(_DEFAULT_MAX_IN_FLIGHT, max_connections - 1))
    elif isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
        raise TypeError(f"max_in_flight must be an int, not {type(max_in_flight).__name__}")
    check_range("max_in_flight", max_in_flight, 1, max(1, max_connections - 1))
    check_range("acquire_timeout", acquire_timeout, 0.1, 600)
    check_range("connect_timeout", connect_timeout, 1, 600)
    check_range("ping_interval", ping_interval, 0.1, 3600)
    check_range("ping_timeout", ping_timeout, 0.1, 3600)
    check_range("max_backoff", max_backoff, 0.1, 600)
    try:
        common = {"connect_timeout": int(connect_timeout), **_KEEPALIVES}
        # UTF-8 on every connection: chatbus._pq sends and reads text as UTF-8.
        pool_conninfo = make_conninfo(
            _with_defaults(dsn, application_name=POOL_APPLICATION_NAME, **common),
            client_encoding="UTF8",
        )
        listen_conninfo = make_conninfo(
            _with_defaults(dsn, **common),
            application_name=LISTEN_APPLICATION_NAME,
            client_encoding="UTF8",
        )
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"invalid Postgres DSN: {exc}") from None

    settings = _PairSettings(
        pool_conninfo=pool_conninfo,
        listen_conninfo=listen_conninfo,
        schema=schema,
        min_connections=min_connections,
        max_connections=max_connections,
        max_in_flight=max_in_flight,
        acquire_timeout=acquire_timeout,
        connect_timeout=connect_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        max_backoff=max_backoff,
    )
    loop = trio_asyncio.current_loop.get()
    if loop is not None and not loop.is_closed():
        async with _open_pair(_AioRunner(loop), settings) as pair:
            yield pair
        return

    # Our own trio-asyncio loop. Its nurseries wrap whatever passes through them
    # (our errors and the body's) in ExceptionGroups; a single failure comes out as
    # itself, the very object that was raised.
    body_error: BaseException | None = None
    try:
        async with (
            trio_asyncio.open_loop() as loop,
            _open_pair(_AioRunner(loop), settings) as pair,
        ):
            try:
                yield pair
            except BaseException as exc:
                body_error = exc
                raise
        return
    except BaseExceptionGroup as group:
        sole = _sole_error(group, body_error)
        if sole is None:
            raise
    raise sole


def _sole_error(
    group: BaseExceptionGroup[Any], body_error: BaseException | None
) -> BaseException | None:
    """The one exception wrapped (possibly in nested groups) by ``group``, if only one."""
    node: BaseException = group
    while isinstance(node, BaseExceptionGroup):
        if node is body_error:
            return node
        if len(node.exceptions) != 1:
            return None
        node = node.exceptions[0]
    return node


@final
@attrs.frozen(kw_only=True)
class _PairSettings:
    pool_conninfo: str
    listen_conninfo: str
    schema: str
    min_connections: int
    max_connections: int
    max_in_flight: int
    acquire_timeout: float
    connect_timeout: float
    ping_interval: float
    ping_timeout: float
    max_backoff: float


@asynccontextmanager
async def _open_pair(
    aio: _AioRunner, settings: _PairSettings
) -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    schema = settings.schema
    channel = channel_for_schema(schema)
    pool: psycopg_pool.AsyncConnectionPool = psycopg_pool.AsyncConnectionPool(
        settings.pool_conninfo,
        kwargs={"autocommit": True},
        min_size=settings.min_connections,
        max_size=settings.max_connections,
        open=False,
        configure=_configure_connection,
        check=_check_connection,
        timeout=settings.acquire_timeout,
        reconnect_timeout=max(60.0, settings.acquire_timeout),
        name=f"chatbus:{schema}",
    )
    lanes = _Lanes(pool, aio, settings.max_connections, settings.acquire_timeout)
    store = PostgresStore(
        lanes,
        aio,
        schema,
        channel,
        _Queries.for_schema(schema),
        max_in_flight=settings.max_in_flight,
        # Long enough for any pool wait (acquire_timeout) plus a slow statement.
        shield_timeout=settings.acquire_timeout + 60.0,
    )
    notifier = PostgresNotifier(
        settings.listen_conninfo,
        channel,
        connect_timeout=settings.connect_timeout,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        max_backoff=settings.max_backoff,
    )
    try:
        await aio.run(_aio_open_pool, pool, schema, settings.acquire_timeout)
    except BaseException as exc:
        # Cancelled or failed half-way: the pool's workers may be running (and
        # retrying connections); close it, or the asyncio loop never finishes.
        with trio.move_on_after(5, shield=True):
            try:
                await aio.run(pool.close, 1.0)
            except Exception:  # cleanup must not mask the real error
                logger.exception("closing the chatbus connection pool failed")
        if isinstance(exc, _DB_ERRORS):
            raise StoreError(f"opening the Postgres store failed: {exc}") from exc
        raise
    try:
        yield store, notifier
    finally:
        store._closed = True
        with trio.move_on_after(5, shield=True):
            try:
                await lanes.aclose()
                await aio.run(pool.close, 3.0)
            except Exception:  # cleanup must not mask the body's error
                logger.exception("closing the chatbus connection pool failed")


async def _aio_open_pool(
    pool: psycopg_pool.AsyncConnectionPool, schema: str, acquire_timeout: float
) -> None:
    await pool.open(wait=True, timeout=acquire_timeout)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ddl_lock_key(schema),))
        for statement in _ddl(schema):
            await conn.execute(statement)
