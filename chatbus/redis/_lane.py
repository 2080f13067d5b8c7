"""The store's hot path: one pipelined RESP3 connection per server for script calls.

Owns: :class:`Lanes` (a :class:`Lane` per server address) and :class:`Lane` (one
connection; calls made meanwhile go out in one write, replies are matched to callers
in order by whichever caller is reading). coredis costs a pool checkout, a task hop
and a socket write per command; here a script call is an encode and a share of one
``send``/``recv``. What it does not handle it says by :class:`Unsupported`, and the
store runs that call through coredis instead: error replies that redirect (MOVED,
ASK, TRYAGAIN, CLUSTERDOWN, READONLY). Failures look as they do from coredis: a
connection that cannot be opened is ``ConnectionError("Unable to establish …")`` (not
sent), a lost one ``ConnectionError`` (maybe run), no reply in time ``TimeoutError``
(the connection is dropped: replies behind a lost one cannot be trusted), NOSCRIPT
is ``NoScriptError`` and any other error reply ``ResponseError``. Imports
:mod:`._resp` and trio.
"""

from __future__ import annotations

import collections
import select
from collections.abc import Iterator, Sequence
from typing import Any, Final, final

import attrs
import coredis.exceptions
import trio

from ._resp import Push, RespConnection, RespError, encode

#: Error replies the lane leaves to coredis (it follows redirects; the lane does not).
_REDIRECTS: Final = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "LOADING")


class Unsupported(Exception):
    """This call must go through coredis (a redirect): nothing was changed by it."""


@final
@attrs.define(eq=False)
class _Call:
    done: bool = False
    value: object = None


@final
@attrs.define(eq=False)
class _Pipe:
    """One connection and the calls on it: wire order is :attr:`waiting` order."""

    conn: RespConnection
    #: Calls sent (or about to be, in :attr:`out`) and not yet answered, in wire order.
    waiting: collections.deque[_Call] = attrs.field(factory=collections.deque)
    out: list[bytes] = attrs.field(factory=list)
    writing: bool = False
    reading: bool = False
    dropped: bool = False
    #: Set (and replaced) whenever replies were handed out or the reader changed.
    turn: trio.Event = attrs.field(factory=trio.Event)
    #: Socket writes made (each carries every call queued by then).
    writes: int = 0
    #: Polls the socket for :meth:`readable` (made once: an idle call asks each time).
    _poller: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._poller = select.poll()
        self._poller.register(self.conn.stream.socket.fileno(), select.POLLIN | select.POLLHUP)

    def readable(self) -> bool:
        """Whether the socket has something to read now (without waiting)."""
        return bool(self._poller.poll(0))

    async def flush(self, timeout: float) -> None:
        """Write what is queued, in as few writes as possible; whoever finds no writer
        at work writes for everybody. The writer's cancellation does not stop the
        write (the others' requests are in it); a write that fails or takes more than
        ``timeout`` drops the connection: what reached the server is unknown.

        Raises:
            ConnectionResetError: the write failed.
            TimeoutError: it took too long.
        """
        if self.writing:
            return
        self.writing = True
        try:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout) as scope:
                while self.out and not self.dropped:
                    data = b"".join(self.out)
                    self.out.clear()
                    self.writes += 1
                    await self.conn.stream.send_all(data)
            if scope.cancelled_caught:
                self.drop("a write took too long")
                raise TimeoutError("a write took too long")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.drop(repr(exc))
            raise ConnectionResetError(str(exc) or "connection lost") from exc
        except BaseException as exc:  # pragma: no cover - a bug, or KeyboardInterrupt
            self.drop(repr(exc))
            raise
        finally:
            self.writing = False

    async def await_reply(self, call: _Call) -> None:
        """Read replies (when nobody else is) until ``call`` has its own."""
        while not call.done:
            if self.reading:
                await self.turn.wait()
                continue
            self.reading = True
            try:
                await self.conn.receive()
                for value in self.conn.parser.values():
                    if isinstance(value, Push):
                        continue  # not subscribed here: nothing to route
                    if not self.waiting:
                        raise ConnectionResetError("protocol error: an unexpected reply")
                    waiting = self.waiting.popleft()
                    waiting.value = value
                    waiting.done = True
            except OSError as exc:
                self.drop(repr(exc))
                raise
            finally:
                self.reading = False
                self.wake()

    def drop(self, why: str) -> None:
        """Close the connection; its unanswered calls are lost."""
        if self.dropped:
            return
        self.dropped = True
        self.conn.close()
        lost = ConnectionResetError(f"the connection was dropped ({why})")
        while self.waiting:
            waiting = self.waiting.popleft()
            waiting.value = lost
            waiting.done = True
        self.out.clear()
        self.wake()

    def wake(self) -> None:
        self.turn.set()
        self.turn = trio.Event()


@final
@attrs.define(eq=False)
class Lane:
    """One pipelined connection to one server (opened on first use, re-opened after a
    failure). Safe from many trio tasks at once."""

    address: tuple[str, int]
    username: str | None
    password: str | None
    db: int
    client_name: str
    connect_timeout: float
    command_timeout: float
    _pipe: _Pipe | None = attrs.field(default=None, init=False)
    _connecting: trio.Event | None = attrs.field(default=None, init=False)
    #: Calls made, and socket writes made on earlier connections (see :attr:`writes`).
    calls: int = attrs.field(default=0, init=False)
    _old_writes: int = attrs.field(default=0, init=False)

    @property
    def writes(self) -> int:
        """Socket writes made (fewer than :attr:`calls` when calls were pipelined)."""
        return self._old_writes + (self._pipe.writes if self._pipe is not None else 0)

    async def call(self, args: Sequence[bytes | str | int]) -> Any:
        """Send one command and return its reply.

        Raises:
            Unsupported: a redirect or a server in transition: run it through coredis.
            coredis.exceptions.ConnectionError: not connected, or the connection was lost.
            TimeoutError: no reply within ``command_timeout``.
            coredis.exceptions.NoScriptError: the script is not loaded.
            coredis.exceptions.ResponseError: any other error reply.
        """
        pipe = await self._connected()
        self.calls += 1
        call = _Call()
        pipe.waiting.append(call)
        pipe.out.append(encode(*args))
        try:
            await pipe.flush(self.command_timeout)
            # A bare scope, not trio.fail_after: this is once per script call.
            with trio.CancelScope(deadline=trio.current_time() + self.command_timeout) as scope:
                await pipe.await_reply(call)
            if scope.cancelled_caught:
                raise TimeoutError
        except TimeoutError:
            # Replies behind one that never came cannot be matched: start afresh.
            pipe.drop("no reply in time")
            raise TimeoutError(
                f"no reply from {self._name} within {self.command_timeout:g} s"
            ) from None
        except OSError as exc:
            raise coredis.exceptions.ConnectionError(
                f"the connection to {self._name} was lost: {exc!r}"
            ) from exc
        value = call.value
        if isinstance(value, ConnectionError):
            raise coredis.exceptions.ConnectionError(
                f"the connection to {self._name} was lost: {value}"
            ) from value
        if isinstance(value, RespError):
            text = str(value)
            if text.startswith("NOSCRIPT"):
                raise coredis.exceptions.NoScriptError(text)
            if text.startswith(_REDIRECTS):
                raise Unsupported(text)
            raise coredis.exceptions.ResponseError(text)
        return value

    def close(self) -> None:
        """Close the connection (calls waiting on it fail as lost)."""
        if self._pipe is not None:
            self._pipe.drop("closed")

    @property
    def _name(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    async def _connected(self) -> _Pipe:
        # No yield to the scheduler before the send (the write's own checkpoint
        # follows it): a call goes out in the same turn it is made.
        await trio.lowlevel.checkpoint_if_cancelled()
        pipe = self._pipe
        if pipe is not None and not pipe.waiting and not pipe.dropped and pipe.readable():
            # Idle, yet something to read: the server closed it (or broke the protocol).
            # Caught before sending, a server that went away is "not sent", not "lost".
            pipe.drop("closed by the server while idle")
        while self._pipe is None or self._pipe.dropped:
            if self._connecting is not None:
                await self._connecting.wait()
                continue
            done = self._connecting = trio.Event()
            try:
                with trio.fail_after(self.connect_timeout):
                    conn = await RespConnection.connect(
                        self.address,
                        username=self.username,
                        password=self.password,
                        db=self.db,
                        client_name=self.client_name,
                    )
                if self._pipe is not None:
                    self._old_writes += self._pipe.writes
                self._pipe = _Pipe(conn)
            except (OSError, RespError, trio.TooSlowError) as exc:
                raise coredis.exceptions.ConnectionError(
                    f"Unable to establish a connection to {self._name}: {exc!r}"
                ) from exc
            finally:
                self._connecting = None
                done.set()
        return self._pipe


@final
@attrs.define(eq=False)
class Lanes:
    """A :class:`Lane` per server address, made on first use."""

    username: str | None
    password: str | None
    db: int
    client_name: str
    connect_timeout: float
    command_timeout: float
    _lanes: dict[tuple[str, int], Lane] = attrs.field(factory=dict, init=False)

    def to(self, address: tuple[str, int]) -> Lane:
        """The lane to ``address``."""
        lane = self._lanes.get(address)
        if lane is None:
            lane = self._lanes[address] = Lane(
                address,
                self.username,
                self.password,
                self.db,
                self.client_name,
                self.connect_timeout,
                self.command_timeout,
            )
        return lane

    def __iter__(self) -> Iterator[Lane]:
        return iter(list(self._lanes.values()))

    def close(self) -> None:
        """Close every lane's connection."""
        for lane in self._lanes.values():
            lane.close()
