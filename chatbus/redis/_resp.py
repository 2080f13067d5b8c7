"""RESP3, by hand, for the listener's and the store lanes' own connections.

Owns: encoding commands (:func:`encode`), an incremental parser that never holds
more than one partial value (:class:`Parser`), the hash slot of a key or channel
(:func:`hash_slot`), and :class:`RespConnection` (a trio TCP stream speaking RESP3,
with the HELLO handshake). The listener does not use coredis, so that a lost
subscription is never silently re-made behind its back and what it reads is bounded
by what it has handled (TCP pushes back); the store's hot scripts use it through
:mod:`._lane` (pipelined), everything else through coredis. Imports only trio.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator, Sequence
from typing import Final, final

import attrs
import trio


class RespError(Exception):
    """An error reply from the server (``-ERR …``, ``-MOVED …``)."""


@final
@attrs.frozen
class Push:
    """A RESP3 push value (``>``): pub/sub messages and subscription confirmations."""

    items: list[object]


def encode(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append  # the store's hot path: one append per argument
    for arg in args:
        if type(arg) is str:
            data = arg.encode("utf-8")
        elif type(arg) is int:
            data = b"%d" % arg
        elif isinstance(arg, bytes):
            data = arg
        else:
            data = str(arg).encode("utf-8")
        append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    pass


#: Most bytes one value may take (a bulk string); beyond it the connection is broken.
MAX_VALUE_BYTES: Final = 64 * 1024 * 1024


@final
class Parser:
    """Incremental RESP3 parser: :meth:`feed` bytes, iterate :meth:`values`."""

    __slots__ = ("_buffer", "_pos")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        """Add what was received."""
        self._buffer += data

    def values(self) -> Iterator[object]:
        """Yield every complete value received so far, in order."""
        while True:
            start = self._pos
            try:
                value = self._value()
            except _Incomplete:
                self._pos = start
                break
            yield value
        del self._buffer[: self._pos]
        self._pos = 0

    def _value(self) -> object:
        # The hot path (every reply and push): one find per line, dispatch on the
        # type byte, no intermediate copies of a line.
        buffer = self._buffer
        pos = self._pos
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            if len(buffer) - pos > 1024 * 1024:
                raise RespError("protocol error: line too long")
            raise _Incomplete
        self._pos = end + 2
        kind = buffer[pos]
        if kind == 36 or kind == 61:  # $ bulk string, = verbatim string
            size = int(buffer[pos + 1 : end])
            return None if size < 0 else self._bulk(size)
        if kind == 58:  # : integer
            return int(buffer[pos + 1 : end])
        if kind == 42 or kind == 126 or kind == 62:  # * array, ~ set, > push
            count = int(buffer[pos + 1 : end])
            if count < 0:
                return None
            items = self._items(count)
            return Push(items) if kind == 62 else items
        if kind == 43 or kind == 40:  # + simple string, ( big number
            return bytes(buffer[pos + 1 : end])
        rest = bytes(buffer[pos + 1 : end])
        if kind == 45:  # - error
            return RespError(rest.decode("utf-8", "replace"))
        if kind == 33:  # ! bulk error
            return RespError(self._bulk(int(rest)).decode("utf-8", "replace"))
        if kind == 37:  # % map
            pairs = [(self._value(), self._value()) for _ in range(int(rest))]
            return {key: value for key, value in pairs if isinstance(key, bytes)}
        if kind == 124:  # | attributes: skip them, the value follows
            for _ in range(2 * int(rest)):
                self._value()
            return self._value()
        if kind == 95:  # _ null
            return None
        if kind == 35:  # # boolean
            return rest == b"t"
        if kind == 44:  # , double
            return float(rest)
        raise RespError(f"protocol error: unknown type {bytes([kind])!r}")

    def _items(self, count: int) -> list[object]:
        """An aggregate's items: bulk strings, integers and simple strings (all a
        script reply or a pub/sub push holds) read here, anything else by
        :meth:`_value`."""
        buffer = self._buffer
        items: list[object] = []
        append = items.append
        for _ in range(count):
            pos = self._pos
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                append(self._value())  # says why it cannot go on
                continue
            kind = buffer[pos]
            if kind == 36:  # $ bulk string
                size = int(buffer[pos + 1 : end])
                if 0 <= size <= MAX_VALUE_BYTES:
                    stop = end + 2 + size
                    if len(buffer) < stop + 2:
                        raise _Incomplete
                    append(bytes(buffer[end + 2 : stop]))
                    self._pos = stop + 2
                    continue
            elif kind == 58:  # : integer
                append(int(buffer[pos + 1 : end]))
                self._pos = end + 2
                continue
            elif kind == 43:  # + simple string
                append(bytes(buffer[pos + 1 : end]))
                self._pos = end + 2
                continue
            append(self._value())
        return items

    def _bulk(self, size: int) -> bytes:
        if size > MAX_VALUE_BYTES:
            raise RespError(f"protocol error: value of {size} bytes")
        start = self._pos
        end = start + size
        if len(self._buffer) < end + 2:
            raise _Incomplete
        data = bytes(self._buffer[start:end])
        self._pos = end + 2
        return data


def hash_slot(key: bytes) -> int:
    """The Redis Cluster slot of ``key`` (CRC16-XMODEM of its hash tag, mod 16384).

    ``binascii.crc_hqx`` is that CRC (CCITT polynomial, initial value 0), in C.
    """
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % 16384


@final
@attrs.define(eq=False)
class RespConnection:
    """One RESP3 connection to one server, driven from trio."""

    stream: trio.SocketStream
    address: tuple[str, int]
    parser: Parser = attrs.field(factory=Parser)
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)

    @classmethod
    async def connect(
        cls,
        address: tuple[str, int],
        *,
        username: str | None,
        password: str | None,
        db: int,
        client_name: str,
    ) -> RespConnection:
        """Connect and say HELLO 3 (authenticating, selecting ``db``, naming itself).

        Raises:
            OSError: the connection failed.
            RespError: the server refused the handshake.
        """
        stream = await trio.open_tcp_stream(*address)
        conn = cls(stream, address)
        try:
            hello: list[bytes | str | int] = ["HELLO", 3]
            if password is not None:
                hello += ["AUTH", username or "default", password]
            hello += ["SETNAME", client_name]
            commands = [hello] + ([["SELECT", db]] if db else [])
            await conn.send(commands)
            for _ in commands:
                reply = await conn.reply()
                if isinstance(reply, RespError):
                    raise reply
        except BaseException:
            conn.close()
            raise
        return conn

    async def send(self, commands: Sequence[Sequence[bytes | str | int]]) -> None:
        """Send ``commands`` in one write (safe from several tasks).

        Raises:
            OSError: the connection failed or was closed (as :meth:`receive` says it).
        """
        data = b"".join(encode(*command) for command in commands)
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionResetError(str(exc) or "connection lost") from exc

    async def receive(self) -> None:
        """Wait for more bytes and feed them to the parser.

        Raises:
            OSError: the connection failed or was closed by the server.
        """
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionResetError(str(exc) or "connection lost") from exc
        if not data:
            raise ConnectionResetError("the server closed the connection")
        self.parser.feed(data)

    async def reply(self) -> object:
        """The next value that is not a push (for the handshake and one-off commands)."""
        while True:
            for value in self.parser.values():
                if not isinstance(value, Push):
                    return value
            await self.receive()

    def close(self) -> None:
        """Close at once (no goodbye: the server notices the socket closing)."""
        self.stream.socket.close()
