"""The Postgres store: :class:`PostgresStore` and its statistics.

Owns: how reads, heads, events and the stream lifecycle become statements, and
running one statement (or a pipeline) over :mod:`._pq` on a lent connection. Appends,
keyed or not, are single statements group-committed across streams
(:mod:`chatbus._coalesce`); how a batch becomes its statement is :mod:`._append`'s.
An append may carry emitted events (:meth:`PostgresStore.append_carrying`,
statements from :mod:`._events`). Imports this package's :mod:`._pq`, :mod:`._sql`,
:mod:`._append`, :mod:`._events`, :mod:`._aio`, :mod:`._connections`; never the
listener.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final, final

import attrs
import psycopg
import psycopg.errors
import trio
from psycopg import pq

from .._coalesce import Batch, GroupCommit, PendingAppend
from .._codec import BadBody, pack_bodies
from .._event import Event, decode_event_items
from .._exceptions import BusError, OutcomeUnknown, StoreError, UndecodableMessage, store_error
from .._message import Appended, Draft, Message, StreamInfo, check_read, check_stream
from .._options import EventRetention
from .._retention import RetentionPage
from . import _pq
from ._aio import AioRunner
from ._append import Appends
from ._connections import LentConnections
from ._events import CarriedEvents, event_statements
from ._pq import DB_ERRORS
from ._rows import decode_page
from ._sql import LIFECYCLE_BATCH, Queries

#: Default limit on append statements running at once (see open_postgres).
DEFAULT_MAX_IN_FLIGHT: Final = 3

# What a stream retains of its events when the bus names no bounds.
_DEFAULT_RETENTION: Final = EventRetention()


@attrs.frozen(kw_only=True)
class PostgresStoreStatistics:
    """A snapshot of a :class:`PostgresStore`'s append coalescing and connections.

    Attributes:
        appends: :meth:`~PostgresStore.append` calls that reached the server queue,
            keyed or not.
        statements: Append statements sent (each one transaction).
        merged_statements: Statements that carried more than one append.
        largest_statement: The most appends one statement carried.
        in_flight: Statements running (or about to be sent) now.
        pending: Appends waiting for a statement now.
        connections: Pool connections the store holds now, busy or idle. It keeps
            them between operations and gives one back after 10 s unused (checked
            when the next operation starts), or when it failed or was cancelled.
        borrows: Connections taken from the pool so far: steady traffic keeps this
            flat; a climbing count means connections keep failing.
        keyed_reruns: Keyed statements run again, storing nothing the first time:
            the keys this store had not sent before are inserted without a lookup,
            and the batch runs again looking every key up when the unique index
            refuses one (a key another process, or this one before a restart, stored);
            or a same-key append (another process, or another statement of this one)
            committed while a statement waited for a stream's lock, unseen by its
            key lookup. Rare unless retries cross processes or the same keys race.
    """

    appends: int
    statements: int
    merged_statements: int
    largest_statement: int
    in_flight: int
    pending: int
    connections: int
    borrows: int
    keyed_reruns: int


def _no_limit(value: float | None) -> bytes:
    """A lifecycle statement's optional limit as a text parameter: -1 for None."""
    return b"-1" if value is None else repr(value).encode("ascii")


def _abandoned() -> OutcomeUnknown:
    return OutcomeUnknown(
        "the statement carrying this append was abandoned or ran out of time;"
        " it may or may not have been committed. Retry with the same key to find out."
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
    #: The append path (see :mod:`._append`): the group commit's ``send``.
    _appends: Appends = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._appends = Appends(
            self._connections,
            self._channel,
            self._queries,
            self._run_prepared,
            self._run_pipeline,
            self.read,
        )
        self._group = GroupCommit(
            send=self._appends.send_batch,
            failures=(*DB_ERRORS, OutcomeUnknown),
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
        """Most append statements running at once; more appends are merged."""
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
            keyed_reruns=self._appends.keyed_reruns,
        )

    async def append(self, stream: str, drafts: Sequence[Draft]) -> list[Message]:
        """Append ``drafts`` to ``stream`` in one transaction; see :meth:`chatbus.Store.append`.

        Keyed or not, the batch joins the cross-stream group commit and costs one
        round trip. A repeated key returns the original message with ``replay=True``.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the append failed; nothing of the batch was stored.
            OutcomeUnknown: the reply was lost after the append reached the server,
                and whether it committed could not be found out.
        """
        return await self._append(stream, drafts, None)

    async def append_carrying(
        self,
        stream: str,
        drafts: Sequence[Draft],
        events: Sequence[Event],
        encoded: Sequence[str],
        *,
        retention: EventRetention | None = None,
    ) -> list[Message]:
        """:meth:`append`, with ``events`` retained and NOTIFYed in the same transaction,
        ahead of the messages' notice (see :meth:`retain_events`). Unkeyed events an
        append of an unkeyed message carries are only NOTIFYed: the message moves the
        stream's head past them, so no joiner would be given them.

        The bus hands a stream's waiting events to that stream's next append this
        way (see :class:`chatbus._outbox.Outbox`): they cost no transaction of their
        own (nor a second turn at NOTIFY's lock), and the publish waits for no flush.
        If the append fails, the events are lost with it (they are at most once).
        """
        # An unkeyed draft is stored whatever happens to keyed ones (replays store
        # nothing): then the head moves past the carried events (see CarriedEvents.of).
        behind_head = any(draft.key is None for draft in drafts)
        carried = CarriedEvents.of(
            events, encoded, retention or _DEFAULT_RETENTION, behind_head=behind_head
        )
        return await self._append(stream, drafts, carried)

    async def _append(
        self, stream: str, drafts: Sequence[Draft], carried: CarriedEvents | None
    ) -> list[Message]:
        check_stream(stream)
        if not drafts:
            if carried is not None:
                await self.retain_events(
                    carried.events, carried.encoded, retention=carried.retention
                )
            await trio.lowlevel.checkpoint()
            return []
        drafts = list(drafts)
        await self._check_open("append")
        try:
            # Before merging (and long before any lock): a bad body fails its caller only.
            packed, bodies = pack_bodies(drafts)
        except BadBody as exc:
            await trio.lowlevel.checkpoint()
            cause = psycopg.DataError(str(exc))
            raise store_error("append", cause, stream=stream) from cause
        keyed = any(draft.key is not None for draft in drafts)
        entry = PendingAppend(
            stream, len(drafts), len(packed), Batch(drafts, packed, bodies, keyed)
        )
        if carried is not None:
            self._appends.carried[entry] = carried
        try:
            await self._group.submit(entry)
        finally:
            if carried is not None:
                del self._appends.carried[entry]
        if entry.cause is not None:
            if isinstance(entry.cause, BusError):
                raise entry.cause
            raise store_error("append", entry.cause, stream=stream) from entry.cause
        return Appended(entry.result, entry.epoch)

    async def read(self, stream: str, after: int, limit: int) -> list[Message]:
        """Return up to ``limit`` messages after ``after``; see :meth:`chatbus.Store.read`.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the query failed.
        """
        return (await self.read_with_epoch(stream, after, limit))[1]

    async def read_with_epoch(
        self, stream: str, after: int, limit: int
    ) -> tuple[int, list[Message]]:
        """:meth:`read`, with the epoch the stream was in when read (0: it did not
        exist, or the page is empty); see :class:`chatbus._protocols.EpochReader`.

        A subscription reads this way: a page of a stream deleted and created again
        meanwhile is never taken as the rest of the history it follows.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the query failed.
        """
        check_read(stream, after, limit)
        if limit == 0:
            await trio.lowlevel.checkpoint()
            return 0, []
        params = [stream.encode("utf-8"), b"%d" % after, b"%d" % limit]
        result = await self._query("read", self._queries.read, params, stream=stream)
        epoch = int(_pq.value(result, 0, 1)) if result.ntuples else 0
        try:
            return epoch, decode_page(stream, result)
        except (ValueError, RecursionError):
            return epoch, await self._read_up_to_undecodable(stream, after, limit)

    async def _read_up_to_undecodable(self, stream: str, after: int, limit: int) -> list[Message]:
        """A page failed to decode: return the messages before the culprit, else name it.

        So the good messages of the page still reach their readers, and the one that
        no reader here can decode (written by a process with other limits, or by hand)
        stops them with an error that says which it is, instead of silently.
        """
        good: list[Message] = []
        while len(good) < limit:
            cursor = good[-1].id if good else after
            params = [stream.encode("utf-8"), b"%d" % cursor, b"1"]
            result = await self._query("read", self._queries.read, params, stream=stream)
            try:
                page = decode_page(stream, result)
            except (ValueError, RecursionError) as exc:
                if good:
                    return good
                error = UndecodableMessage(
                    f"message {cursor + 1} of stream {stream!r} cannot be decoded here: {exc}",
                    stream,
                    cursor + 1,
                )
                raise error from exc
            if not page:
                break
            good.extend(page)
        return good

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

    async def retain_events(
        self,
        events: Sequence[Event],
        encoded: Sequence[str],
        *,
        retention: EventRetention | None = None,
    ) -> None:
        """Retain ``events`` for joiners and NOTIFY them, in one transaction and round trip.

        See :meth:`chatbus.EventStore.retain_events`; :class:`PostgresNotifier` then
        has nothing to do for them (the NOTIFY went out here, at this commit).

        Raises:
            StoreError: the statement failed (the events reached local subscribers).
        """
        if not events:
            await trio.lowlevel.checkpoint()
            return
        carried = CarriedEvents.of(events, encoded, retention or _DEFAULT_RETENTION)
        statements = event_statements(self._queries, self._channel, carried)
        await self._check_open("emit")
        try:
            # Locked, written, bounded: one transaction, one round trip (see _sql_events).
            await self._run_pipeline(statements)
        except DB_ERRORS as exc:
            raise store_error("emit", exc) from exc

    async def retained_events(self, stream: str, head: int) -> list[Event]:
        """Events a joiner at ``head`` gets; see :meth:`chatbus.EventStore.retained_events`.

        Raises:
            StoreError: the query failed.
        """
        params = [stream.encode("utf-8"), b"%d" % head]
        result = await self._query(
            "read events", self._queries.retained_events, params, stream=stream
        )
        found = result.get_value(0, 0)
        return [] if found is None else decode_event_items(json.loads(found))

    # ---- the stream lifecycle ----

    async def stream_info(self, stream: str) -> StreamInfo:
        """Where ``stream`` stands; see :meth:`chatbus.Bus.stream_info`.

        Raises:
            StoreError: the query failed.
        """
        check_stream(stream)
        result = await self._query(
            "stream info", self._queries.stream_info, [stream.encode("utf-8")], stream=stream
        )
        if result.ntuples == 0:
            return StreamInfo(stream=stream, head=0, first_id=1, epoch=0, exists=False)
        head, first_id, epoch = (int(_pq.value(result, 0, c)) for c in range(3))
        return StreamInfo(stream=stream, head=head, first_id=first_id, epoch=epoch, exists=True)

    async def trim(
        self,
        stream: str,
        before: int,
        *,
        keys_for: float | None = None,
        epoch: int | None = None,
    ) -> int:
        """Drop the messages of ``stream`` below ``before``, in bounded batches.

        The first retained id moves first (one short statement), so readers stop at
        it at once; then the rows go, :data:`LIFECYCLE_BATCH` at a time, each batch its
        own transaction (no long lock on a hot stream). Rows with an idempotency key
        stay, outside the history, until they are ``keys_for`` seconds old (None: as
        long as the stream lives): a retried publish returns the original id. With
        ``epoch``, nothing happens unless the stream is at that epoch.

        Returns:
            The stream's first retained id now.

        Raises:
            StoreError: a statement failed (the first id may have moved already).
        """
        check_stream(stream)
        name = stream.encode("utf-8")
        params = [name, b"%d" % before, self._channel.encode("utf-8"), _no_limit(epoch)]
        result = await self._query("trim", self._queries.trim_first, params, stream=stream)
        if result.ntuples == 0:
            return 1
        first_id = int(_pq.value(result, 0, 0))
        batch = [name, b"%d" % first_id, _no_limit(keys_for)]
        while True:
            done = await self._query("trim", self._queries.trim_batch, batch, stream=stream)
            if int(done.command_tuples or 0) < LIFECYCLE_BATCH:
                return first_id

    async def over_retention(
        self,
        after: str,
        limit: int,
        *,
        max_messages: int | None,
        max_age: float | None,
        keys_for: float | None,
    ) -> RetentionPage:
        """Which streams hold messages beyond a retention policy, by the server's clock;
        see :meth:`chatbus._protocols.LifecycleStore.over_retention`. One statement:
        a range of the counter table and a probe or two of the primary key per
        stream, the age rule walking at most :data:`LIFECYCLE_BATCH` rows of each
        (a stream with more to trim is examined again: ``next_after`` is ``after``).

        Raises:
            StoreError: the query failed.
        """
        params = [
            after.encode("utf-8"),
            b"%d" % limit,
            _no_limit(max_messages),
            _no_limit(max_age),
            _no_limit(keys_for),
            b"%d" % LIFECYCLE_BATCH,
        ]
        result = await self._query("retention", self._queries.over_retention, params)
        last, examined, found = json.loads(_pq.value(result, 0, 0))
        trims = [(stream, before, epoch) for stream, before, _, epoch in found]
        if any(more for _, _, more, _ in found):
            next_after: str | None = after
        else:
            next_after = last if examined == limit else None
        return RetentionPage(trims=trims, next_after=next_after)

    async def delete_stream(self, stream: str) -> None:
        """Delete ``stream``: its messages, keys and retained events; see
        :meth:`chatbus.Bus.delete_stream`. The bulk goes in bounded batches first;
        then one short transaction takes the stream's lock, removes the rest and the
        counter row, and NOTIFYs every listener.

        Raises:
            StoreError: a statement failed (some messages may be gone already).
        """
        check_stream(stream)
        name = stream.encode("utf-8")
        while True:
            done = await self._query("delete", self._queries.delete_batch, [name], stream=stream)
            if int(done.command_tuples or 0) < LIFECYCLE_BATCH:
                break
        try:
            conn = await self._connections.acquire()
            try:
                await self._aio.run(self._aio_delete_stream, conn, stream)
            except BaseException:
                await self._connections.recover(conn)
                raise
            self._connections.keep(conn)
        except DB_ERRORS as exc:
            raise store_error("delete", exc, stream=stream) from exc

    async def _aio_delete_stream(self, conn: psycopg.AsyncConnection[Any], stream: str) -> None:
        params = {"stream": stream, "channel": self._channel}
        async with conn.transaction():
            for statement in self._queries.delete_stream:
                await conn.execute(statement, params)

    async def redact(self, stream: str, id: int) -> Message | None:
        """Replace message ``id``'s body by a tombstone; see :meth:`chatbus.Bus.redact`.

        Returns:
            The tombstone, or None if ``id`` is not a retained message.

        Raises:
            StoreError: the statement failed.
        """
        check_stream(stream)
        result = await self._query(
            "redact",
            self._queries.redact,
            [stream.encode("utf-8"), b"%d" % id, self._channel.encode("utf-8")],
            stream=stream,
        )
        if result.ntuples == 0:
            return None
        key, micros = json.loads(_pq.value(result, 0, 0))
        return Message(
            stream=stream,
            id=id,
            body=None,
            key=key,
            created_at=_pq.from_epoch_micros(micros),
            redacted=True,
        )

    async def _check_open(self, operation: str) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise StoreError(f"{operation} failed: the Postgres store is closed")

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

    async def _run_pipeline(
        self, statements: Sequence[tuple[bytes, list[bytes]]], *, sent: list[bool] | None = None
    ) -> list[pq.abc.PGresult]:
        """Run prepared ``statements`` as one transaction in one round trip on a lent
        connection (:func:`._pq.execute_pipeline`); psycopg errors as is.

        ``sent`` (if given) gets an item once the statements may have reached the server.
        """
        connections = self._connections
        conn = await connections.acquire()
        try:
            for attempt in (1, 2):
                named = [
                    (await connections.prepared(conn, query), params)
                    for query, params in statements
                ]
                if sent is not None:
                    sent.append(True)
                try:
                    return_value = await _pq.execute_pipeline(conn.pgconn, named)
                    break
                except psycopg.errors.InvalidSqlStatementName:
                    if attempt == 2:
                        raise
                    connections.forget_prepared(conn)  # see _run_prepared; nothing ran
        except psycopg.DatabaseError:
            if conn.pgconn.pipeline_status != pq.PipelineStatus.OFF:
                await connections.recover(conn)  # lost mid-pipeline
            else:
                connections.keep(conn)  # the server refused it: the connection is fine
            raise
        except BaseException:
            await connections.recover(conn)
            raise
        connections.keep(conn)
        return return_value

    async def _run_prepared(
        self, query: bytes, params: list[bytes], *, sent: list[bool] | None = None
    ) -> pq.abc.PGresult:
        """Run ``query`` as a prepared statement on a lent connection; psycopg errors as is.

        ``sent`` (if given) gets an item once the statement may have reached the server.
        """
        connections = self._connections
        conn = await connections.acquire()
        try:
            name = await connections.prepared(conn, query)
            if sent is not None:
                sent.append(True)
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
