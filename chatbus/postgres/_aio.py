"""The trio → asyncio bridge: psycopg's connection pool on a trio-asyncio loop.

Owns: the one typed wrapper around trio-asyncio (:class:`AioRunner`, untyped
underneath), the fix that lets psycopg's waits find trio-asyncio's loop, the pool's
connection hooks, and opening the pool with the schema's DDL. The only module of
chatbus that imports trio_asyncio or psycopg_pool's pool class for running it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import psycopg
import psycopg.waiting
import psycopg_pool
import trio
import trio_asyncio
from psycopg import pq

from .._exceptions import BusClosed
from . import _pq, _sql

# trio-asyncio makes asyncio.get_running_loop() find its loop by patching the asyncio
# module, but psycopg.waiting binds the function at import time. If psycopg was
# imported before trio_asyncio (anywhere in the process), its async waits would not
# find the loop ("no running event loop"): hand it the patched function.
_psycopg_waiting: Any = psycopg.waiting
if _psycopg_waiting.get_running_loop is not asyncio.get_running_loop:
    _psycopg_waiting.get_running_loop = asyncio.get_running_loop

_T = TypeVar("_T")


class AioRunner:
    """Typed wrapper around a trio-asyncio loop.

    :meth:`run` is the one trio → asyncio crossing of a logical operation.
    """

    __slots__ = ("loop",)

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    async def run(self, fn: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> _T:
        """Run ``fn(*args)`` on the asyncio loop and return its result, from trio.

        Raises:
            BusClosed: the loop cancelled ``fn`` itself: it is closing (the store's
                block is ending) under a caller it does not own.
        """
        try:
            result: _T = await trio_asyncio.aio_as_trio(fn, loop=self.loop)(*args)
        except asyncio.CancelledError as exc:
            # Our own cancellation comes out as trio.Cancelled; an asyncio one means
            # the loop is closing and cancelled its tasks (say, the cancel_safe of a
            # publisher's statement cut short by closing the bus). Never let it into
            # trio, where no scope owns it (nurseries report it as a crashed task):
            # a cancelled caller gets its trio Cancelled, anyone else BusClosed.
            await trio.lowlevel.checkpoint_if_cancelled()
            raise BusClosed(
                "the Postgres store is closing: its asyncio loop cancelled the operation"
            ) from exc
        return result


def open_loop() -> Any:
    """``trio_asyncio.open_loop()``: an async context manager yielding a new loop."""
    return trio_asyncio.open_loop()


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


def make_pool(
    conninfo: str, *, schema: str, min_size: int, max_size: int, acquire_timeout: float
) -> psycopg_pool.AsyncConnectionPool:
    """A closed pool of autocommit connections in UTC, checked cheaply on checkout."""
    return psycopg_pool.AsyncConnectionPool(
        conninfo,
        kwargs={"autocommit": True},
        min_size=min_size,
        max_size=max_size,
        open=False,
        configure=_configure_connection,
        check=_check_connection,
        timeout=acquire_timeout,
        reconnect_timeout=max(60.0, acquire_timeout),
        name=f"chatbus:{schema}",
    )


async def open_pool(
    pool: psycopg_pool.AsyncConnectionPool, schema: str, acquire_timeout: float
) -> None:
    """(asyncio side) Open ``pool`` and create the schema's tables if they are missing.

    Safe when several processes start at once: the DDL runs under a
    transaction-scoped advisory lock.
    """
    await pool.open(wait=True, timeout=acquire_timeout)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_sql.ddl_lock_key(schema),))
        # The DDL takes strong table locks even when there is nothing to do: run it only
        # if the schema is not at this version yet (its last object is missing), so
        # opening never blocks the appends of other processes.
        table = _sql.streams_table(schema).as_string(conn)
        cursor = await conn.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class') = %s",
            (table, _sql.SCHEMA_VERSION),
        )
        row = await cursor.fetchone()
        if row is not None and row[0]:
            return
        for statement in _sql.ddl(schema):
            await conn.execute(statement)
