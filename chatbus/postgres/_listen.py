"""The LISTEN side of the Postgres backend: one session per bus, and the notifier.

Owns: :class:`ListenSession` (a dedicated session connection driven by hand through
:mod:`psycopg.pq` under :func:`trio.lowlevel.wait_readable`: no thread and no asyncio
crossing per notification) and :class:`PostgresNotifier`, which runs sessions with
the shared reconnecting skeleton (:mod:`chatbus._listener`). Imports psycopg and
this package's :mod:`._pq` and :mod:`._sql`; never the store.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar, Final, final

import attrs
import trio
from psycopg import pq, sql

from .._event import Event, decode_events
from .._listener import Beat, ListenLost, Liveness, Reconnecting, hand_over
from .._protocols import NoticeHandler
from .._tasks import Backoff
from . import _pq
from ._pq import DB_ERRORS
from ._sql import events_payload_tail

_PING_QUERY: Final = b"SELECT pg_notify($1, $2)"
#: How a payload of events begins (see chatbus._event.encode_events).
_EVENTS_PREFIX: Final = b'{"events":'


@final
@attrs.define(eq=False)
class ListenSession:
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
    #: Notifications left in libpq's buffer by :meth:`pump` (the socket will not say).
    buffered: bool = attrs.field(default=False, init=False)
    #: How the payloads of the handler's own bus's events end (see
    #: _sql.events_payload_tail): skipped undecoded, its subscriptions had them.
    own_events_tail: bytes | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.sock = self.pgconn.socket
        emitter = getattr(self.handler, "emitter", None)
        if isinstance(emitter, str) and (tail := events_payload_tail(emitter)) is not None:
            self.own_events_tail = tail.encode("utf-8")

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
            raise ListenLost("a query is already in flight")
        try:
            if params is None:
                self.pgconn.send_query(query)
            else:
                self.pgconn.send_query_params(query, params)
            # Our queries are tiny: they fit in the socket buffer at once.
            while self.pgconn.flush():
                await trio.lowlevel.wait_writable(self.sock)
        except DB_ERRORS as exc:
            raise ListenLost(f"sending failed: {exc}") from exc
        self.query_in_flight = True

    async def execute(self, query: bytes) -> None:
        """Send ``query`` and wait until all its results are in."""
        await self.send(query)
        while self.query_in_flight:
            await self.drain()

    def pump(self) -> None:
        """Consume what has arrived: query results, then notifications. Never blocks.

        Stops after a notification of events, with :attr:`buffered` set: the caller
        lets the consumers run before pumping again (see :meth:`drain`), or a burst
        of payloads (up to ~100 events each) overflows their bounded event buffers.
        """
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
                    raise ListenLost(f"query failed: {message}")
            self.buffered = False
            while (notify := pgconn.notifies()) is not None:
                if self._dispatch(notify):
                    self.buffered = True
                    break
        except DB_ERRORS as exc:
            raise ListenLost(str(exc).strip() or type(exc).__name__) from exc
        if pgconn.status == pq.ConnStatus.BAD:
            raise ListenLost("connection is bad")

    async def drain(self) -> None:
        """Wait for input unless some is buffered, then pump until none is buffered,
        letting other tasks run between payloads of events."""
        if not self.buffered:
            await trio.lowlevel.wait_readable(self.sock)
        self.pump()
        while self.buffered:
            await trio.lowlevel.checkpoint()  # consumers drain their events
            self.pump()

    def _dispatch(self, notify: pq.PGnotify) -> bool:
        """Hand one notification to the handler; return whether it carried events."""
        if notify.relname == self.channel:
            payload = notify.extra
            if payload.startswith(_EVENTS_PREFIX):
                own = self.own_events_tail
                if own is not None and payload.endswith(own):
                    return False
                events = decode_events(payload)
                if events:
                    self.handler.events(events)
                return bool(events)
            self.notices += hand_over(self.handler, payload)
        elif notify.relname == self.ping_channel and notify.extra == self.ping_token:
            self.ping_answered = True
        return False


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

    #: The store's append transaction sends the notice (its :meth:`notify` does
    #: nothing): the bus's producers need not call :meth:`notify`.
    notifies_at_commit: ClassVar[bool] = True

    _conninfo: str
    _channel: str
    connect_timeout: float = 5.0
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    min_backoff: float = 0.05
    max_backoff: float = 5.0
    _reconnects: int = attrs.field(default=0, init=False)
    _sessions: set[ListenSession] = attrs.field(factory=set, init=False)

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

    async def notify_reset(self, stream: str, first_id: int | None = None) -> None:
        """Do nothing: :meth:`PostgresStore.delete_stream` and :meth:`~PostgresStore.trim`
        NOTIFY it at their commit."""
        await trio.lowlevel.checkpoint()

    async def notify_redacted(self, stream: str, id: int) -> None:
        """Do nothing: :meth:`PostgresStore.redact` NOTIFYs it at its commit."""
        await trio.lowlevel.checkpoint()

    async def notify_events(self, events: Sequence[Event], encoded: Sequence[str]) -> None:
        """Do nothing: :meth:`PostgresStore.retain_events` sent them, as NOTIFY, already."""
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

        async def open_session() -> ListenSession:
            return await self._open_session(handler)

        def reconnected() -> None:
            self._reconnects += 1

        sessions = Reconnecting(
            open=open_session,
            serve=self._serve,
            close=self._close_session,
            backoff=Backoff(self.min_backoff, self.max_backoff),
            reconnected=reconnected,
            name="LISTEN",
        )
        await sessions.run(handler, task_status=task_status)

    def _close_session(self, session: ListenSession) -> None:
        self._sessions.discard(session)
        session.close()

    async def _open_session(self, handler: NoticeHandler) -> ListenSession:
        try:
            pgconn = await _pq.connect(self._conninfo, self.connect_timeout)
        except DB_ERRORS as exc:
            raise ListenLost(str(exc).strip()) from exc
        token = random.getrandbits(64)
        session = ListenSession(
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
                raise ListenLost("LISTEN was not acknowledged in time") from exc
            raise
        self._sessions.add(session)
        return session

    async def _serve(self, session: ListenSession) -> None:
        liveness = Liveness.starting(self.ping_interval, self.ping_timeout, trio.current_time())
        while True:
            # One cancel scope for every wake-up until the schedule needs a step: the
            # wake-at time, or a ping's answer (not one per batch of notifications).
            with trio.move_on_at(liveness.wake_at()):
                while not (liveness.awaiting_answer and session.ping_done):
                    await session.drain()
            beat = liveness.step(trio.current_time(), session.ping_done)
            if beat is Beat.DEAD:
                session.pump()  # the answer may be waiting, unread, in the socket
                beat = liveness.step(trio.current_time(), session.ping_done)
                if beat is Beat.DEAD:
                    raise ListenLost(f"no answer to a ping within {self.ping_timeout} s")
            elif beat is Beat.PING:
                session.ping_token = liveness.token
                session.ping_answered = False
                await session.send(_PING_QUERY, [session.ping_channel, liveness.token])
