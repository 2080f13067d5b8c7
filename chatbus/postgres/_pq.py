"""Raw libpq from trio, over psycopg's public :mod:`psycopg.pq` layer.

Owns: one statement at a time on a connection (:func:`execute`, :func:`prepare`,
:func:`drain`), a non-blocking connect (:func:`connect`), and the socket helpers
(:func:`has_input`, :func:`close`). Imports psycopg and trio only.

The store's hot operations (unkeyed appends, reads, heads) are single autocommit
statements. Running them here, on a pool connection's ``pgconn`` under
:func:`trio.lowlevel.wait_readable`, costs about a third of the client CPU of the
same statement through psycopg's asyncio API behind a trio-asyncio crossing
(``python -m benchmarks --only statement``). Parameters and results travel as text;
the store's statements return a few scalars or one JSON value, so there is nothing
to adapt per column.
"""

from __future__ import annotations

import datetime
import ipaddress
import select
from collections.abc import Sequence
from typing import Final

import psycopg
import psycopg.errors
import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: Exceptions that mean "the server or the connection failed" rather than a bug (every
#: module of the package catches these, never a wider net).
DB_ERRORS: Final = (psycopg.Error, OSError)

_OK: Final = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)
EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


async def execute(
    pgconn: pq.abc.PGconn, query: bytes, params: Sequence[bytes], *, name: bytes | None = None
) -> pq.abc.PGresult:
    """Run one statement with text ``params`` and return its result, checked.

    With ``name``, run the statement prepared under that name (see :func:`prepare`)
    instead of sending ``query``: the server skips parsing and planning it again.

    The connection must be idle and non-blocking. It is idle again when this returns
    or raises a server error (:class:`psycopg.Error` subclass by SQLSTATE). Any other
    exception (a lost connection, a cancellation) leaves it in an unknown state:
    the caller must not use it again.
    """
    if name is None:
        pgconn.send_query_params(query, params)
    else:
        pgconn.send_query_prepared(name, params)
    return await _result(pgconn)


async def execute_pipeline(
    pgconn: pq.abc.PGconn, statements: Sequence[tuple[bytes, Sequence[bytes]]]
) -> list[pq.abc.PGresult]:
    """Run prepared ``statements`` (name, text params) as ONE transaction in ONE round
    trip (libpq pipeline mode, a single Sync) and return their results, checked.

    Each statement still takes its own snapshot (READ COMMITTED), so one can wait
    for a lock and the next see what the holder committed. If one fails, the
    transaction rolls back and its error is raised (same contract as :func:`execute`).
    """
    pgconn.enter_pipeline_mode()
    for name, params in statements:
        pgconn.send_query_prepared(name, params)
    pgconn.pipeline_sync()
    sock = pgconn.socket
    while pgconn.flush():
        pgconn.consume_input()
        await trio.lowlevel.wait_writable(sock)
    results: list[pq.abc.PGresult] = []
    error: psycopg.Error | None = None
    while True:
        while pgconn.is_busy():
            await trio.lowlevel.wait_readable(sock)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            continue  # the end of one statement's results
        if result.status == pq.ExecStatus.PIPELINE_SYNC:
            break
        if result.status in _OK:
            results.append(result)
        elif result.status != pq.ExecStatus.PIPELINE_ABORTED and error is None:
            error = _error_from(result)
    pgconn.exit_pipeline_mode()
    if error is not None:
        raise error
    return results


async def prepare(pgconn: pq.abc.PGconn, name: bytes, query: bytes) -> None:
    """Prepare ``query`` under ``name`` in this session (same contract as :func:`execute`)."""
    pgconn.send_prepare(name, query)
    await _result(pgconn)


async def _result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult:
    """Flush what was sent, then wait for and return the first result, checked."""
    sock = pgconn.socket
    while pgconn.flush():
        pgconn.consume_input()  # take what the server sent meanwhile; never blocks
        await trio.lowlevel.wait_writable(sock)
    waited = False
    first: pq.abc.PGresult | None = None
    while True:
        while pgconn.is_busy():
            await trio.lowlevel.wait_readable(sock)
            waited = True
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if first is None:
            first = result
    if not waited:  # pragma: no cover - a reply cannot be there before it was asked for
        await trio.lowlevel.checkpoint()
    if first is None:  # pragma: no cover - libpq always returns a result
        raise psycopg.OperationalError("the server returned no result")
    if first.status not in _OK:
        raise _error_from(first)
    return first


def has_input(pgconn: pq.abc.PGconn) -> bool:
    """Whether the socket has something to read now (never blocks).

    An idle connection should receive nothing: input means the server probably
    closed it (a restart, ``pg_terminate_backend``).
    """
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN)
    return bool(poller.poll(0))


def close(pgconn: pq.abc.PGconn) -> None:
    """Close the connection, telling trio first (its fd number may be reused at once)."""
    try:
        sock = pgconn.socket
    except psycopg.Error:
        pass  # already closed
    else:
        trio.lowlevel.notify_closing(sock)
    pgconn.finish()


def fully_sent(pgconn: pq.abc.PGconn) -> bool:
    """Whether all of the statement in flight has left libpq's buffer (never blocks)."""
    return pgconn.flush() == 0


async def drain(pgconn: pq.abc.PGconn) -> None:
    """Wait for the statement in flight to end (however it ends); discard its results.

    The statement must have been sent in full (:func:`fully_sent`).
    """
    sock = pgconn.socket
    while True:
        while pgconn.is_busy():
            await trio.lowlevel.wait_readable(sock)
            pgconn.consume_input()
        if pgconn.get_result() is None:
            return


def _error_from(result: pq.abc.PGresult) -> psycopg.Error:
    """The psycopg exception for a failed result, by SQLSTATE, as psycopg raises it."""
    return psycopg.errors.error_from_result(result, encoding="utf-8")


def value(result: pq.abc.PGresult, row: int, column: int) -> bytes:
    """A text-format result value that must not be SQL NULL."""
    found = result.get_value(row, column)
    if found is None:  # pragma: no cover - the store's statements never return NULL here
        raise psycopg.DataError(f"unexpected NULL in row {row}, column {column}")
    return found


def from_epoch_micros(value: int) -> datetime.datetime:
    """The UTC datetime ``value`` microseconds after the Unix epoch (exact)."""
    return EPOCH + datetime.timedelta(microseconds=value)


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


async def connect(conninfo: str, connect_timeout: float) -> pq.abc.PGconn:
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
