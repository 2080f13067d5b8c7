"""Pool connections lent to trio and kept between operations.

Owns: :class:`LentConnections` (borrow once, reuse from trio, give back after idling,
failing or being lent too long) and the statements prepared in each lent session.
Imports psycopg, psycopg_pool (its types), and this package's :mod:`._pq`,
:mod:`._sql` and :mod:`._aio`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from typing import Any, Final, final

import attrs
import psycopg
import psycopg.errors
import psycopg_pool
import trio
from psycopg import pq

from .._tasks import shielded_cleanup
from . import _pq
from ._aio import AioRunner
from ._sql import statement_name

logger = logging.getLogger("chatbus.postgres")

#: Longest wait for the server to cancel an interrupted statement (a cancel request
#: on a connection of its own: milliseconds on a live server). A server that does not
#: answer (a TCP black hole) holds whoever waits for the recovery that long (an SSE
#: stream telling its client the store is down, a subscription being closed): then
#: the connection goes, as it would anyway.
_CANCEL_TIMEOUT: Final = 1.0


@final
@attrs.define(eq=False)
class LentConnections:
    """Pool connections lent to trio, kept between operations.

    The pool (psycopg, through trio-asyncio) makes, configures, checks and replaces
    connections; taking one from it and giving it back are asyncio crossings, so a
    connection is borrowed once and then reused from trio for as long as operations
    keep coming. Single statements run on its ``pgconn`` (:mod:`chatbus._pq`); the
    rare multi-statement operations run on it through psycopg, one crossing each. A connection that
    failed, was cancelled mid-operation, idled for ``idle_return`` seconds or has
    been lent for ``max_lend`` seconds goes back to the pool, which resets, checks or
    closes it. ``limit`` caps the connections out at once (the pool's ``max_size``);
    waiting for one is bounded by ``timeout``.
    """

    _pool: psycopg_pool.AsyncConnectionPool
    _aio: AioRunner
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
    def acquire_timeout(self) -> float:
        """Seconds :meth:`acquire` waits at most."""
        return self._timeout

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
                await self._return(idle.pop(0)[0])  # unused for a while: the pool's again
            while idle:
                conn = idle.pop()[0]
                lent_for = trio.current_time() - self._borrowed_at.get(conn, 0.0)
                if lent_for <= self.max_lend and _usable(conn):
                    return conn
                await self._return(conn)
            remaining = max(0.001, deadline - trio.current_time())
            conn = await self._aio.run(functools.partial(self._pool.getconn, timeout=remaining))
            self.borrows += 1
            self._borrowed_at[conn] = trio.current_time()
            return conn
        except BaseException:
            self._slots.release()
            raise

    def keep(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Take back a connection that is idle and healthy after an operation."""
        self._slots.release()
        if self._closed:
            _pq.close(conn.pgconn)
        else:
            self._idle.append((conn, trio.current_time()))

    async def prepared(self, conn: psycopg.AsyncConnection[Any], query: bytes) -> bytes:
        """The name ``query`` is prepared under in ``conn``'s session (prepared now if new).

        The name is derived from the query text (which holds the schema), so it
        stays valid for as long as the session, also after the connection went back
        to the pool and was borrowed again.
        """
        names = self._prepared.get(conn)
        if names is None:
            names = self._prepared[conn] = set()
        name = statement_name(query)
        if name not in names:
            # Already there if this session was lent to us before.
            with contextlib.suppress(psycopg.errors.DuplicatePreparedStatement):
                await _pq.prepare(conn.pgconn, name, query)
            names.add(name)
        return name

    def forget_prepared(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """``conn``'s session dropped our prepared statements (``DEALLOCATE ALL``).

        psycopg sends that when it rolls back a transaction of its own after preparing
        statements (a stream's delete), and a pool reset may too; the store finds out
        when a statement's name is unknown, forgets, and prepares again.
        """
        self._prepared.pop(conn, None)

    async def recover(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Take back a connection in an unknown state (interrupted, failed, mid-transaction).

        As psycopg does for its own interrupted queries: ask the server to cancel
        the statement, wait for it to end, and keep the connection if it is idle
        again; else give it to the pool, which rolls it back, resets or closes it.
        A statement not fully sent yet cannot be cancelled (the server is still
        reading it): the connection goes at once. Runs even when the caller is
        being cancelled, bounded by about a second (_CANCEL_TIMEOUT).
        """
        with shielded_cleanup():
            pgconn = conn.pgconn
            try:
                if (
                    pgconn.status == pq.ConnStatus.OK
                    and pgconn.transaction_status == pq.TransactionStatus.ACTIVE
                    and _pq.fully_sent(pgconn)
                ):
                    await self._aio.run(
                        functools.partial(conn.cancel_safe, timeout=_CANCEL_TIMEOUT)
                    )
                    await _pq.drain(pgconn)
            except Exception:
                # Not idle after all (or the loop is gone): discarded below.
                logger.debug("cancelling an interrupted statement failed", exc_info=True)
            if _usable(conn):
                self.keep(conn)
                return
        self._slots.release()
        await self._return(conn)

    async def aclose(self) -> None:
        """Give every idle connection back; connections still out close on release."""
        self._closed = True
        while self._idle:
            await self._return(self._idle.pop()[0])

    async def _return(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Return ``conn`` to the pool, even when the caller is being cancelled.

        A connection neither here nor in the pool would still count towards the pool's
        ``max_size`` for good, so this is shielded (bounded by a few seconds).
        """
        with shielded_cleanup() as scope:
            try:
                await self._aio.run(self._pool.putconn, conn)
            except Exception:  # the pool is closing: close it ourselves
                _pq.close(conn.pgconn)
        if scope.cancelled_caught:  # pragma: no cover - the pool did not answer
            _pq.close(conn.pgconn)


def _usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    """An idle connection whose socket has nothing to say (else: probably closed)."""
    pgconn = conn.pgconn
    return (
        pgconn.status == pq.ConnStatus.OK
        and pgconn.transaction_status == pq.TransactionStatus.IDLE
        and not _pq.has_input(pgconn)
    )
