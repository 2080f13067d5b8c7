"""A loopback TCP proxy, in trio, that can lose a reply after the server acted on it.

Every chatbus connection of the run goes through it, so the harness knows the local
port of each upstream socket (that is how the backend finds the run's own sessions).
When armed, the next client request that carries a publish (a body's ``"tok"``
marker, or a ``COMMIT``) is forwarded, the server's reply to it is read and thrown
away, and both sides are closed: the server has done the work, the client sees a
lost connection. Only connections of the ``pub`` role are ever cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs
import trio

#: Bytes that mark a request carrying a publish: harness bodies hold ``"tok"``.
PUBLISH_MARKERS: Final[tuple[bytes, ...]] = (b'"tok"', b"COMMIT")


@attrs.define(eq=False)
class _Conn:
    name: str
    role: str
    drop_reply: bool = False


@attrs.define(eq=False)
class Proxy:
    """Forward ``127.0.0.1:<port per role>`` to ``upstream``; see the module docstring."""

    upstream: tuple[str, int]
    markers: Sequence[bytes] = PUBLISH_MARKERS
    conns: dict[int, _Conn] = attrs.field(factory=dict)  # upstream local port → conn
    ports: dict[str, int] = attrs.field(factory=dict)  # listener name → port
    armed: int = 0
    armed_until: float = 0.0
    dropped: int = 0
    accepted: int = 0

    def arm(self, *, window: float = 3.0) -> None:
        """Cut the next publish request's reply seen within ``window`` seconds."""
        self.armed = 1
        self.armed_until = trio.current_time() + window

    def upstream_ports(self, name: str | None = None) -> list[int]:
        """Local ports of the open upstream sockets (of listener ``name``, or all).

        The server sees these as its sessions' client ports.
        """
        return [port for port, c in self.conns.items() if name is None or c.name == name]

    async def serve(
        self,
        name: str,
        role: str,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen as ``name`` on an ephemeral loopback port; report it via ``started``.

        One listener per client process tells the processes' sessions apart; only
        ``role == "pub"`` connections ever lose a reply.
        """
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = int(listeners[0].socket.getsockname()[1])
        self.ports[name] = port
        task_status.started(port)

        async def handler(client: trio.SocketStream) -> None:
            await self._handle(client, name, role)

        await trio.serve_listeners(handler, listeners)

    async def _handle(self, client: trio.SocketStream, name: str, role: str) -> None:
        self.accepted += 1
        try:
            with trio.fail_after(5):
                server = await trio.open_tcp_stream(*self.upstream)
        except (OSError, trio.TooSlowError):
            await trio.aclose_forcefully(client)
            return
        port = int(server.socket.getsockname()[1])
        conn = _Conn(name=name, role=role)
        self.conns[port] = conn
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._up, client, server, conn, nursery.cancel_scope)
                nursery.start_soon(self._down, server, client, conn, nursery.cancel_scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.conns.pop(port, None)
            await trio.aclose_forcefully(server)
            await trio.aclose_forcefully(client)

    async def _up(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        conn: _Conn,
        scope: trio.CancelScope,
    ) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if (
                    self.armed
                    and conn.role == "pub"
                    and trio.current_time() < self.armed_until
                    and any(m in data for m in self.markers)
                ):
                    self.armed = 0
                    conn.drop_reply = True
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    async def _down(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        conn: _Conn,
        scope: trio.CancelScope,
    ) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if conn.drop_reply:
                    # The server answered: the request was executed. Lose the answer.
                    self.dropped += 1
                    break
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()
