"""The Postgres store: :class:`PostgresStore` and its statistics.

Owns: how appends, reads and heads become statements. Unkeyed appends are single
statements run over :mod:`._pq` on lent connections, group-committed across streams
(:mod:`chatbus._coalesce`); keyed appends run as one transaction through psycopg on a
lent connection, one asyncio crossing each (:mod:`._aio`). Imports this package's
:mod:`._pq`, :mod:`._sql`, :mod:`._aio`, :mod:`._connections`; never the listener.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any, Final, final

import attrs
import psycopg
import psycopg.errors
import trio
from psycopg import pq

from .._coalesce import GroupCommit, PendingAppend
from .._codec import BODY_SEPARATOR, BadBody, decode_bodies, pack_bodies, plan_keyed_batch
from .._exceptions import StoreError, store_error
from .._message import Draft, Message, check_after, check_stream
from . import _pq
from ._aio import AioRunner
from ._connections import LentConnections
from ._sql import Queries

#: Exceptions that mean "the store failed" rather than "chatbus has a bug".
DB_ERRORS: Final = (psycopg.Error, OSError)
#: Default limit on unkeyed append statements running at once (see open_postgres).
DEFAULT_MAX_IN_FLIGHT: Final = 3


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


def _utc(ts: datetime.datetime) -> datetime.datetime:
    # Pool sessions run in UTC (see chatbus.postgres._aio): no conversion needed.
    return ts if ts.tzinfo is datetime.UTC else ts.astimezone(datetime.UTC)


def _abandoned() -> psycopg.OperationalError:
    return psycopg.OperationalError(
        "the statement carrying this append was abandoned; it may have been committed"
    )


@final
@attrs.define(eq=False)
class PostgresStore:
    """A :class:`~chatbus.Store` in PostgreSQL. Made by :func:`open_postgres`.

    Safe to use from many trio tasks at once and from many processes at once. Every
    database or connection error is raised as :class:`~chatbus.StoreError` with the
    psycopg error as ``__cause__``; a failed append stores nothing.
    """

    _connections: LentConnections
    _aio: AioRunner
    _schema: str
    _channel: str
    _queries: Queries
    _max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    #: How long a statement carrying other callers' appends may run once sent.
    _shield_timeout: float = 65.0
    _closed: bool = attrs.field(default=False, init=False)
    _group: GroupCommit = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._group = GroupCommit(
            send=self._send_batch,
            failures=DB_ERRORS,
            abandoned=_abandoned,
            max_in_flight=self._max_in_flight,
            shield_timeout=self._shield_timeout,
        )

    @property
    def schema(self) -> str:
        """The schema holding this store's tables."""
        return self._schema

    @property
    def channel(self) -> str:
        """The NOTIFY channel every append of this store notifies on."""
        return self._channel

    @property
    def max_in_flight(self) -> int:
        """Most unkeyed append statements running at once; more appends are merged."""
        return self._max_in_flight

    def close(self) -> None:
        """Refuse further operations (those running finish); the opener closes the pool."""
        self._closed = True

    def statistics(self) -> PostgresStoreStatistics:
        """Return a snapshot of the append coalescing and connection counters."""
        group = self._group
        return PostgresStoreStatistics(
            appends=group.appends,
            statements=group.batches,
            merged_statements=group.merged_batches,
            largest_statement=group.largest_batch,
            in_flight=group.in_flight,
            pending=len(group.pending),
            connections=self._connections.held,
            borrows=self._connections.borrows,
        )

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
        await self._check_open("append")
        try:
            # Before merging (and before any lock): a bad body fails its caller only.
            packed, bodies = pack_bodies(drafts)
        except BadBody as exc:
            await trio.lowlevel.checkpoint()
            cause = psycopg.DataError(str(exc))
            raise store_error("append", cause, stream=stream) from cause
        if all(draft.key is None for draft in drafts):
            return await self._append_unkeyed(stream, packed, bodies, len(drafts))
        try:
            conn = await self._connections.acquire()
            try:
                messages = await self._aio.run(self._aio_append_keyed, conn, stream, drafts)
            except BaseException:
                await self._connections.recover(conn)  # the pool rolls back or replaces it
                raise
            self._connections.keep(conn)
        except DB_ERRORS as exc:
            raise store_error("append", exc, stream=stream) from exc
        return messages

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
        result = await self._query("read", self._queries.read, params, stream=stream)
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
        result = await self._query("heads", self._queries.heads, params)
        found = result.get_value(0, 0)
        heads: dict[str, int] = {} if found is None else json.loads(found)
        return {stream: heads.get(stream, 0) for stream in wanted}

    async def _check_open(self, operation: str) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise StoreError(f"{operation} failed: the Postgres store is closed")

    # ---- unkeyed appends: one statement per batch of the group commit ----

    async def _append_unkeyed(
        self, stream: str, packed: str, bodies: list[Any], count: int
    ) -> list[Message]:
        entry = PendingAppend(stream, count, len(packed), (packed, bodies))
        await self._group.submit(entry)
        if entry.cause is not None:
            raise store_error("append", entry.cause, stream=stream) from entry.cause
        messages: list[Message] = entry.result
        return messages

    async def _send_batch(self, batch: list[PendingAppend]) -> None:
        """One statement for ``batch``: per stream, bump, insert, notify; settle each."""
        groups: dict[str, list[PendingAppend]] = {}
        for member in batch:
            groups.setdefault(member.stream, []).append(member)
        request = [
            (
                stream,
                sum(member.drafts for member in members),
                BODY_SEPARATOR.join(member.payload[0] for member in members),
            )
            for stream, members in groups.items()
        ]
        for stream, last_id, created_at in await self._append_rows(request):
            members = groups.pop(stream)
            first = last_id - sum(member.drafts for member in members) + 1
            for member in members:
                member.settle(
                    [
                        Message.from_row(stream, first + i, body, None, created_at)
                        for i, body in enumerate(member.payload[1])
                    ]
                )
                first += member.drafts
        if groups:  # pragma: no cover - every upsert returns its row
            raise psycopg.DataError(f"no counter row returned for {len(groups)} streams")

    async def _append_rows(
        self, request: list[tuple[str, int, str]]
    ) -> list[tuple[str, int, datetime.datetime]]:
        """Run the append statement for ``(stream, count, packed bodies)`` triples.

        Returns ``(stream, new last id, commit timestamp)`` per stream.
        """
        channel = self._channel.encode("utf-8")
        if len(request) == 1:
            ((stream, n, packed),) = request
            params = [stream.encode("utf-8"), b"%d" % n, packed.encode("utf-8"), channel]
            result = await self._run_prepared(self._queries.append_unkeyed, params)
            if result.ntuples != 1:  # pragma: no cover - the upsert returns its row
                return []
            last_id, micros = _pq.value(result, 0, 0), _pq.value(result, 0, 1)
            return [(stream, int(last_id), _pq.from_epoch_micros(int(micros)))]
        document = json.dumps(request, ensure_ascii=False, separators=(",", ":"))
        result = await self._run_prepared(
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

    # ---- one statement on a lent connection ----

    async def _query(
        self, operation: str, query: bytes, params: list[bytes], *, stream: str | None = None
    ) -> pq.abc.PGresult:
        """:meth:`_run_prepared`, with failures raised as :class:`~chatbus.StoreError`."""
        await self._check_open(operation)
        try:
            return await self._run_prepared(query, params)
        except DB_ERRORS as exc:
            raise store_error(operation, exc, stream=stream) from exc

    async def _run_prepared(self, query: bytes, params: list[bytes]) -> pq.abc.PGresult:
        """Run ``query`` as a prepared statement on a lent connection; psycopg errors as is."""
        connections = self._connections
        conn = await connections.acquire()
        try:
            name = await connections.prepared(conn, query)
            try:
                result = await _pq.execute(conn.pgconn, query, params, name=name)
            except psycopg.errors.InvalidSqlStatementName:
                # Deallocated behind our back (see LentConnections.forget_prepared);
                # the statement did not run: prepare it again and run it.
                connections.forget_prepared(conn)
                name = await connections.prepared(conn, query)
                result = await _pq.execute(conn.pgconn, query, params, name=name)
        except psycopg.DatabaseError:
            connections.keep(conn)  # the server refused it: the connection is fine
            raise
        except BaseException:
            await connections.recover(conn)  # cancelled or lost mid-statement
            raise
        connections.keep(conn)
        return result

    # ---- asyncio side: one whole keyed append ----
    #
    # Runs on a lent connection (autocommit); it manages its transaction explicitly.
    # Should it fail half-way, the connection goes back to the pool, which rolls back
    # or replaces it.

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
                old_bodies = decode_bodies([body for _, _, body, _ in rows])
                existing = {
                    key: Message.from_row(stream, id_, body, key, _utc(ts))
                    for (key, id_, _, ts), body in zip(rows, old_bodies, strict=True)
                }
                slots, new = plan_keyed_batch(drafts, existing)
                if not new:
                    return [slot for slot in slots if isinstance(slot, Message)]
                packed, bodies = pack_bodies(new)
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
