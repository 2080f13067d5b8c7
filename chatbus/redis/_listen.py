"""The listening side of the Redis backend: the notifier.

Owns: :class:`RedisNotifier`, which runs listening sessions (:mod:`._session`) with
the shared reconnecting skeleton (:mod:`chatbus._listener`) and keeps the set of
watched streams (:meth:`RedisNotifier.watch`). Imports this package's
:mod:`._session` and :mod:`._lua`; never the store.

Why not coredis's pub/sub: it re-subscribes silently after a reconnect (notices sent
meanwhile are lost without a resync), it queues what it receives without bound, and
a shard subscription that the server ends on a slot migration ends its iterator.
Here every loss becomes a new session and a ``handler.resync()``.
"""

from __future__ import annotations

import collections
import functools
import operator
from collections.abc import Callable, Sequence
from typing import ClassVar, final

import attrs
import trio

from .._event import Event
from .._listener import ListenLost, Reconnecting
from .._protocols import NoticeHandler
from .._tasks import Backoff
from ._lua import StreamKeys
from ._session import Address, ListenSession, Server, cluster_slots


def _no_slots(slot: int) -> Address | None:
    return None


@final
@attrs.define(eq=False)
class RedisNotifier:
    """A :class:`~chatbus.Notifier` over Redis sharded pub/sub. Made by :func:`open_redis`.

    Each stream's notices travel on its own shard channel (in the stream's slot),
    published by :class:`RedisStore`'s scripts with the data they announce:
    :meth:`notify` does nothing. A bus tells the notifier which streams it follows
    (:meth:`watch`, :meth:`unwatch`); :meth:`listen` keeps one connection per server
    holding a watched stream subscribed to those streams' channels.

    Liveness: a self-published ping on each connection every ``ping_interval``
    seconds that must come back within ``ping_timeout``. A failed or silent
    connection, a subscription the server ended (its slot migrated) or a refused
    command replaces the whole session (with exponential backoff and jitter up to
    ``max_backoff``), and each replacement ends with ``handler.resync()``.
    """

    #: The append script publishes the notice with the data (:meth:`notify` does
    #: nothing): the bus's producers need not call :meth:`notify`.
    notifies_at_commit: ClassVar[bool] = True

    _server: Server
    _prefix: str
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    min_backoff: float = 0.05
    max_backoff: float = 5.0
    _watched: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _sessions: set[ListenSession] = attrs.field(factory=set, init=False)
    #: Slot → address as the store's client knows it, for the first session.
    first_slots: Callable[[int], Address | None] | None = None
    _handlers: set[NoticeHandler] = attrs.field(factory=set, init=False)
    _reconnects: int = attrs.field(default=0, init=False)
    _sessions_opened: int = attrs.field(default=0, init=False)
    #: Every node the last ``CLUSTER SLOTS`` named: asked too when no seed answers.
    _known_nodes: list[Address] = attrs.field(factory=list, init=False)

    @property
    def reconnects(self) -> int:
        """How many times a listening session was replaced after a failure."""
        return self._reconnects

    @property
    def watched(self) -> frozenset[str]:
        """The streams whose notices are received now."""
        return frozenset(self._watched)

    @property
    def confirmed(self) -> frozenset[str]:
        """The watched streams whose subscription every live session has confirmed."""
        return frozenset(
            stream
            for stream in self._watched
            if self._sessions
            and all(session.has(self.channel(stream).encode()) for session in self._sessions)
        )

    def channel(self, stream: str) -> str:
        """The shard channel of ``stream``."""
        return StreamKeys.of(self._prefix, stream).channel

    async def notify(self, stream: str, last_id: int) -> None:
        """Do nothing: the append script published the notice with the data."""
        await trio.lowlevel.checkpoint()

    async def notify_reset(self, stream: str, first_id: int | None = None) -> None:
        """Do nothing: the delete and trim scripts published it."""
        await trio.lowlevel.checkpoint()

    async def notify_redacted(self, stream: str, id: int) -> None:
        """Do nothing: the redact script published it."""
        await trio.lowlevel.checkpoint()

    async def notify_events(self, events: Sequence[Event], encoded: Sequence[str]) -> None:
        """Do nothing: :meth:`RedisStore.retain_events` published them."""
        await trio.lowlevel.checkpoint()

    async def watch(self, stream: str) -> None:
        """Receive ``stream``'s notices from now on (counted: balance with :meth:`unwatch`).

        Returns once every listening session has the subscription confirmed by the
        server, or has been given up (its replacement subscribes again and resyncs).
        The watch is counted before the first checkpoint, even if then cancelled.
        """
        self._watched[stream] += 1
        channel = self.channel(stream).encode()
        for session in list(self._sessions):
            try:
                await session.subscribe([channel], self.ping_timeout)
            except ListenLost as exc:
                session.fail(str(exc))
        await trio.lowlevel.checkpoint()

    def reset_locally(self, stream: str) -> None:
        """Tell this notifier's listeners now that ``stream``'s history was replaced
        (its store started a new epoch; the notice on the channel follows)."""
        for handler in list(self._handlers):
            if (reset := getattr(handler, "reset", None)) is not None:
                reset(stream)

    def unwatch(self, stream: str) -> None:
        """One watcher of ``stream`` less; at none, unsubscribe (in the background)."""
        self._watched[stream] -= 1
        if self._watched[stream] > 0:
            return
        del self._watched[stream]
        channel = self.channel(stream).encode()
        wanted = functools.partial(operator.contains, self._watched, stream)
        for session in self._sessions:
            if session.nursery is not None and not session.broken.is_set():
                try:
                    session.nursery.start_soon(session.unsubscribe, channel, wanted)
                except RuntimeError:  # closing already: its replacement won't subscribe
                    session.fail("closing")

    async def listen(
        self,
        handler: NoticeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report notices to ``handler`` until cancelled; see :meth:`chatbus.Notifier.listen`.

        ``task_status.started()`` is called once the first session is up (every
        watched stream's subscription confirmed). After that, failures are never
        raised: the session is replaced and ``handler.resync()`` called.

        Raises:
            StoreError: the first session could not be opened.
        """

        async def open_session() -> ListenSession:
            return await self._open_session(handler)

        def reconnected() -> None:
            self._reconnects += 1

        self._handlers.add(handler)
        sessions = Reconnecting(
            open=open_session,
            serve=self._serve,
            close=self._close_session,
            backoff=Backoff(self.min_backoff, self.max_backoff),
            reconnected=reconnected,
            name="Redis listen",
        )
        try:
            await sessions.run(handler, task_status=task_status)
        finally:
            self._handlers.discard(handler)

    async def _open_session(self, handler: NoticeHandler) -> ListenSession:
        server = self._server
        slots: Callable[[int], Address | None] = _no_slots
        if server.cluster:
            if self.first_slots is not None and not self._sessions_opened:
                slots = self.first_slots  # the store's client has just asked
            else:
                layout, self._known_nodes = await cluster_slots(
                    server, self.ping_timeout, self._known_nodes
                )
                slots = layout.__getitem__
        self._sessions_opened += 1
        session = ListenSession(server, self._prefix, handler, slots, self.ping_interval)
        try:
            if not server.cluster:  # one server: connect (and ping) even with nothing watched
                await session.subscribe([], self.ping_timeout)
            # Until nothing is missing: a watch may come in while this subscribes. The
            # last check and registering the session happen with no checkpoint between.
            while missing := [
                channel
                for channel in (self.channel(stream).encode() for stream in self._watched)
                if not session.has(channel)
            ]:
                await session.subscribe(missing, self.ping_timeout)
                if session.broken.is_set():
                    raise ListenLost(session.reason)
        except BaseException:
            session.close()
            raise
        self._sessions.add(session)
        return session

    def _close_session(self, session: ListenSession) -> None:
        self._sessions.discard(session)
        session.close()

    async def _serve(self, session: ListenSession) -> None:
        async with trio.open_nursery() as nursery:
            session.nursery = nursery
            for link in list(session.links.values()):
                nursery.start_soon(session.serve_link, link, self.ping_timeout)
            await session.broken.wait()
            nursery.cancel_scope.cancel()
        raise ListenLost(session.reason)
