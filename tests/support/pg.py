"""Test support for the Postgres backend: a real server, fresh schemas, a TCP proxy.

* :func:`pg_dsn` returns the test server's DSN (env ``CHATBUS_TEST_DSN``, default
  ``postgresql://postgres@127.0.0.1:5432/test``), or skips the test when the server is
  unreachable — or fails it when ``CHATBUS_REQUIRE_POSTGRES=1``.
* :func:`fresh_postgres_pair` yields a ``(PostgresStore, PostgresNotifier)`` pair on a
  new uniquely named schema that is dropped afterwards, so tests are isolated::

      async with fresh_postgres_pair() as (store, notifier):
          async with chatbus.open_bus(store=store, notifier=notifier) as bus:
              ...

* :func:`fresh_schema` yields ``(dsn, schema)`` for tests that open the store
  themselves or in subprocesses (``open_postgres(dsn, schema=schema)``).
* :func:`send_raw_notice` sends a notice the way another process's append would.
* :func:`postgres_backend` is the Postgres world of the conformance suite.
* :class:`Recorder` is a NoticeHandler that remembers; :func:`draft` makes a Draft.
* :class:`TcpProxy` sits between a client and the server and can refuse, cut or
  freeze traffic: the way to make the database "unavailable" or "silent" on demand.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, final

import attrs
import psycopg
import pytest
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import chatbus
from chatbus._codec import CommittedNotice, encode_notice
from chatbus._message import Draft, Message, make_draft
from chatbus.postgres import PostgresNotifier, PostgresStore, channel_for_schema, open_postgres

from . import tcp_proxy

DEFAULT_TEST_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def configured_dsn() -> str:
    """The DSN tests use: ``$CHATBUS_TEST_DSN`` or the local default."""
    return os.environ.get("CHATBUS_TEST_DSN") or DEFAULT_TEST_DSN


@functools.cache
def _probe(dsn: str) -> str | None:
    """``None`` if the server answers, else why not (cached per process)."""
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def pg_dsn() -> str:
    """Return the test DSN if the server is reachable, else skip (or fail) the test."""
    dsn = configured_dsn()
    reason = _probe(dsn)
    if reason is not None:
        message = f"PostgreSQL not reachable at {dsn}: {reason}"
        if os.environ.get("CHATBUS_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return dsn


def unique_schema_name(prefix: str = "chatbus_test") -> str:
    """A fresh schema name, unique across processes and runs."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def admin_execute(query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on a short-lived autocommit connection; return its rows."""
    with psycopg.connect(pg_dsn(), connect_timeout=3, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description is not None else []


def drop_schema(schema: str) -> None:
    """Drop ``schema`` and everything in it."""
    admin_execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


async def terminate_backends(pids: Iterable[int]) -> int:
    """``pg_terminate_backend`` each of ``pids``; return how many were terminated."""
    wanted = sorted(pids)
    if not wanted:
        return 0
    rows = await trio.to_thread.run_sync(
        admin_execute,
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid",
        (wanted,),
    )
    return int(rows[0][0])


def notice_payload(stream: str, last_id: int) -> str:
    """The NOTIFY payload a :class:`PostgresStore` append sends."""
    return encode_notice(stream, last_id)


async def send_raw_notice(channel: str, stream: str, last_id: int) -> None:
    """NOTIFY ``channel`` like another process's append would, without appending.

    ``channel`` is ``store.channel`` (or ``channel_for_schema(schema)``).
    """
    await trio.to_thread.run_sync(
        admin_execute, "SELECT pg_notify(%s, %s)", (channel, notice_payload(stream, last_id))
    )


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[tuple[str, str]]:
    """Yield ``(dsn, schema)`` for a new schema name; drop the schema afterwards."""
    dsn = pg_dsn()
    schema = unique_schema_name()
    try:
        yield dsn, schema
    finally:
        with trio.move_on_after(10, shield=True):
            await trio.to_thread.run_sync(drop_schema, schema)


@asynccontextmanager
async def fresh_postgres_pair(
    *, dsn: str | None = None, **options: Any
) -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    """Yield a store/notifier pair on a fresh schema that is dropped afterwards.

    Args:
        dsn: Connect here instead of the test server (e.g. through a
            :class:`TcpProxy`); the schema is still created and dropped on the
            test server.
        **options: Passed to :func:`chatbus.postgres.open_postgres`.
    """
    async with fresh_schema() as (default_dsn, schema):
        async with open_postgres(dsn or default_dsn, schema=schema, **options) as pair:
            yield pair


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds; bound it with the test's ``trio.fail_after``.

    Polling, because the state watched (a recorder, a set of pids) has no event.
    """
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


def listen_pids(notifier: PostgresNotifier) -> frozenset[int]:
    """Server pids of ``notifier``'s LISTEN connections."""
    return notifier.listen_pids


def dsn_via(dsn: str, host: str, port: int) -> str:
    """``dsn`` with its host and port replaced."""
    params = conninfo_to_dict(dsn)
    params.pop("hostaddr", None)
    return make_conninfo(**{**params, "host": host, "port": str(port)})


@final
class TcpProxy(tcp_proxy.TcpProxy):
    """:class:`support.tcp_proxy.TcpProxy` with DSN helpers."""

    @classmethod
    def to_dsn(cls, dsn: str) -> TcpProxy:
        """A proxy to the server ``dsn`` points at (not started)."""
        params = conninfo_to_dict(dsn)
        return cls(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))

    def dsn(self, dsn: str) -> str:
        """``dsn`` rewritten to go through this proxy."""
        return dsn_via(dsn, "127.0.0.1", self.port)


def draft(body: object = None, key: str | None = None) -> Draft:
    return make_draft(body, key, max_body_bytes=1 << 20)


@attrs.define(eq=False)
class Recorder:
    """A NoticeHandler that remembers everything."""

    notices: list[tuple[str, int]] = attrs.Factory(list)
    resyncs: int = 0

    def notice(self, stream: str, last_id: int) -> None:
        self.notices.append((stream, last_id))

    def resync(self) -> None:
        self.resyncs += 1

    def ids(self, stream: str) -> list[int]:
        return [last_id for s, last_id in self.notices if s == stream]


@attrs.define(eq=False)
class CommittedRecorder(Recorder):
    """A Recorder that also keeps the notices carrying their messages apart."""

    committed_notices: list[CommittedNotice] = attrs.Factory(list)

    def committed(self, notice: CommittedNotice) -> None:
        self.committed_notices.append(notice)


@asynccontextmanager
async def postgres_backend() -> AsyncIterator[
    tuple[Callable[..., AbstractAsyncContextManager[chatbus.Bus]], Callable[[str, int], Any], str]
]:
    async with fresh_schema() as (dsn, schema):

        @asynccontextmanager
        async def open_bus(**options: Any) -> AsyncIterator[chatbus.Bus]:
            """A bus with its own pool and LISTEN connection: another "process"."""
            wrap = options.pop("wrap_notifier", lambda n: n)
            async with open_postgres(dsn, schema=schema) as (store, notifier):
                async with chatbus.open_bus(
                    store=options.pop("store", store), notifier=wrap(notifier), **options
                ) as bus:
                    yield bus

        def notify(stream: str, last_id: int) -> None:
            payload = encode_notice(stream, last_id)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", [channel_for_schema(schema), payload])

        async def inject_notice(stream: str, last_id: int) -> None:
            await trio.to_thread.run_sync(notify, stream, last_id)

        url = f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
        yield open_bus, inject_notice, url


@final
class RowLock:
    """Holds a stream's counter row locked from another session, so appends to it block."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    async def release(self) -> None:
        if not self._conn.closed:
            await trio.to_thread.run_sync(self._conn.close)  # rolls back


@asynccontextmanager
async def row_lock(schema: str, stream: str) -> AsyncIterator[RowLock]:
    """Lock ``stream``'s counter row until :meth:`RowLock.release` or the block's end."""
    query = sql.SQL(
        "INSERT INTO {} AS st (stream, last_id) VALUES (%s, 0)"
        " ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id"
    ).format(sql.Identifier(schema, "streams"))

    def lock() -> psycopg.Connection[Any]:
        conn = psycopg.connect(pg_dsn(), connect_timeout=3)
        conn.execute(query, (stream,))
        return conn

    held = RowLock(await trio.to_thread.run_sync(lock))
    try:
        yield held
    finally:
        # Always, even on failure: a forgotten lock would block the schema's DROP.
        with trio.CancelScope(shield=True):
            await held.release()


def check_dense(store_returned: list[list[Message]]) -> dict[str, list[int]]:
    """Each returned batch is contiguous; all ids of each stream are 1..n exactly once."""
    by_stream: dict[str, list[int]] = {}
    for messages in store_returned:
        ids = [m.id for m in messages]
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"batch not contiguous: {ids}"
        assert len({m.stream for m in messages}) == 1
        by_stream.setdefault(messages[0].stream, []).extend(ids)
    for stream, ids in by_stream.items():
        assert sorted(ids) == list(range(1, len(ids) + 1)), f"{stream}: ids not dense"
    return by_stream
