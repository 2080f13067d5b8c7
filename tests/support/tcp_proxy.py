"""A TCP forwarder on loopback, run in a trio nursery, to make a server fail on demand.

Used by the Postgres and Redis tests alike: it refuses, cuts or freezes traffic,
and can lose the reply to one request after the server has acted on it.
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class TcpProxy:
    """A TCP forwarder to the test server, run in a trio nursery, for fault injection.

    States: ``open`` (forwards), ``frozen`` (connections stay up but no byte moves:
    a silent network), ``down`` (refuses new connections and cuts existing ones).
    Always listens on the same port, so a DSN through it stays valid.
    """

    target_host: str
    target_port: int
    port: int = 0
    state: str = "down"
    connections_made: int = 0
    _nursery: trio.Nursery | None = None
    _listener_scope: trio.CancelScope | None = None
    _pair_scopes: set[trio.CancelScope] = attrs.Factory(set)
    _flowing: trio.Event = attrs.Factory(trio.Event)
    #: See :meth:`lose_reply_to`.
    _reply_marker: bytes | None = None
    replies_lost: int = 0

    async def start(self, nursery: trio.Nursery) -> None:
        """Start forwarding (on a fresh port), running in ``nursery``."""
        self._nursery = nursery
        await self.up()

    async def up(self) -> None:
        """Accept and forward again (after :meth:`freeze` or :meth:`down`)."""
        assert self._nursery is not None
        self._flowing.set()
        if self.state == "down":
            await self._nursery.start(self._serve)
        self.state = "open"

    def freeze(self) -> None:
        """Keep connections open (and accept new ones) but forward no byte."""
        if self._flowing.is_set():
            self._flowing = trio.Event()
        if self.state == "open":
            self.state = "frozen"

    def lose_reply_to(self, marker: bytes) -> None:
        """Lose the reply to the next request that contains ``marker``, once.

        The request reaches the server, which runs (and commits) it and sends its
        reply as usual; the proxy swallows the reply and cuts the client's side, so
        the client sees its connection lost after a COMMIT it never hears of.
        """
        self._reply_marker = marker

    def down(self) -> None:
        """Refuse new connections and cut the existing ones."""
        if self._listener_scope is not None:
            self._listener_scope.cancel()
            self._listener_scope = None
        for scope in self._pair_scopes:
            scope.cancel()
        self.state = "down"

    async def _serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        listener = listeners[0]
        self.port = listener.socket.getsockname()[1]
        with trio.CancelScope() as scope:
            self._listener_scope = scope
            task_status.started()
            try:
                while True:
                    client = await listener.accept()
                    self.connections_made += 1
                    assert self._nursery is not None
                    self._nursery.start_soon(self._forward, client)
            finally:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _forward(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._pair_scopes.add(scope)
            try:
                try:
                    server = await trio.open_tcp_stream(self.target_host, self.target_port)
                except OSError:
                    return
                lost = trio.Event()  # set: the next reply is swallowed, the client cut
                async with server, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, server, nursery.cancel_scope, lost)
                    nursery.start_soon(self._replies, server, client, nursery.cancel_scope, lost)
            finally:
                self._pair_scopes.discard(scope)
                with trio.CancelScope(shield=True):
                    await client.aclose()

    async def _pipe(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        pair: trio.CancelScope,
        lost: trio.Event | None = None,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                while not self._flowing.is_set():
                    await self._flowing.wait()
                marker = self._reply_marker
                if lost is not None and marker is not None and marker in data:
                    self._reply_marker = None
                    lost.set()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # Either side closing ends the pair, as a direct connection would.
        pair.cancel()

    async def _replies(
        self,
        server: trio.SocketStream,
        client: trio.SocketStream,
        pair: trio.CancelScope,
        lost: trio.Event,
    ) -> None:
        """Forward the server's replies; once ``lost`` is set, swallow the next one."""
        try:
            while data := await server.receive_some(65536):
                if lost.is_set():
                    self.replies_lost += 1
                    await client.aclose()  # the client sees its connection lost
                    # Let the server finish (and commit) as if all were well.
                    with trio.move_on_after(1):
                        while await server.receive_some(65536):
                            pass
                    break
                while not self._flowing.is_set():
                    await self._flowing.wait()
                await client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pair.cancel()
