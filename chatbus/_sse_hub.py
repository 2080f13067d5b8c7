"""The shared fan-out of ``chatbus.sse``: one subscription per room per process.

Owns: :class:`_Hub`, a bounded ring of already-encoded SSE frames of one
(bus, stream, events, encoding), fed by one subscription (its "pump", a trio system
task), from which every caught-up SSE stream of that room takes the joined frames after
its position, once per flush: no subscription, merge task or per-message work per
client. The streams themselves (``chatbus.sse``) decide when to join and leave it.

How a stream uses it (see ``chatbus.sse._frames``):

- it starts on a subscription of its own (the cursor resolved, history, epoch checks,
  retained events for joiners), and once that has nothing buffered and its cursor
  ``c`` is inside the ring (``low <= c <= high``, same epoch), it closes it and takes
  the ring from the entry of message ``c + 1`` (:meth:`_Hub.position`): the ring holds
  every message after ``low`` densely (one subscription's exactly-once order), so the
  switch loses and doubles nothing. Events positioned after ``c`` that came before the
  switch are left out (an event arrives in its place or not at all); none is doubled;
- a stream whose position falls below the ring's start (a slow client: the ring is
  bounded) goes back to a subscription of its own at its cursor, as a slow
  subscriber always did, and switches again once caught up;
- when the pump's subscription ends (the bus closed, the stream deleted or reset, an
  undecodable message), the ring stays readable: each stream takes what it holds and
  then ends as its own subscription would have, with the same error; on any other
  error it goes back to a subscription of its own.

The last stream to leave stops the pump and waits for its subscription to close, so
a bus with no SSE client has no subscription left behind.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Final, Generic, final

import attrs
import trio
import trio.lowlevel

import chatbus

from ._flush_clock import WAKE_BATCH
from ._sse_frames import _Chunk, _Encoding, event_frame

#: Most frames (messages and events) a room's ring holds.
RING_SIZE: Final = 4096
#: Most frames one chunk takes from the ring.
MAX_TAKE: Final = 512
#: Longest wait, by the last stream leaving, for the pump's subscription to close.
_CLOSE_DEADLINE: Final = 5.0

_Key = tuple[str, bool, int]


@final
@attrs.define(eq=False)
class _Hub(Generic[_Chunk]):
    """One room's ring of encoded frames and the pump that fills it (see the module)."""

    bus: chatbus.Bus
    stream: str
    events: bool
    encoding: _Encoding[_Chunk]
    size: int = attrs.field(factory=lambda: RING_SIZE)
    #: The frames, oldest first; ``_cursors[i]`` is the id of the last message at or
    #: before ``_frames[i]`` (where a stream that took it resumes).
    _frames: list[_Chunk] = attrs.field(factory=list)
    _cursors: list[int] = attrs.field(factory=list)
    #: The sequence number of ``_frames[0]`` (positions are sequence numbers).
    base: int = 0
    #: The cursor before the ring's first frame (streams at ``low`` or above fit).
    low: int = 0
    #: The pump's subscription is open (and ``low`` set).
    opened: bool = False
    #: The pump's subscription ended: what it raised (None: closed, no error).
    ended: bool = False
    error: BaseException | None = None
    _sub: (
        chatbus.Subscriber[chatbus.Message | chatbus.Event]
        | chatbus.Subscriber[chatbus.Message]
        | None
    ) = None
    #: The streams waiting for frames.
    _waiting: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _members: int = 0
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _done: trio.Event = attrs.field(factory=trio.Event)
    _started: bool = False
    #: The last chunk joined: (from, to, chunk): the streams at one position share it.
    _joined: tuple[int, int, _Chunk] | None = None

    @property
    def end(self) -> int:
        """The position after the newest frame."""
        return self.base + len(self._frames)

    @property
    def high(self) -> int:
        """The id of the newest message in the ring (``low`` when it holds none)."""
        return self._cursors[-1] if self._cursors else self.low

    @property
    def epoch(self) -> int | None:
        """The epoch of the pump's subscription (its frames' resume ids)."""
        return None if self._sub is None else self._sub.epoch

    def position(self, cursor: int, epoch: int | None) -> int | None:
        """Where a stream whose last message is ``cursor`` (in ``epoch``) takes the
        ring from: the frame of message ``cursor + 1`` (or the end); None when the ring
        cannot serve it (not open, ended, another epoch, the cursor outside it)."""
        if not self.opened or self.ended or epoch != self.epoch:
            return None
        if not self.low <= cursor <= self.high:
            return None
        return self.base + bisect.bisect_right(self._cursors, cursor)

    def cursor_at(self, position: int) -> int:
        """The id of the last message before ``position`` (where to resume)."""
        index = position - self.base - 1
        return self._cursors[index] if index >= 0 else self.low

    def take(self, position: int) -> tuple[_Chunk | None, int]:
        """The joined frames from ``position`` on (at most :data:`MAX_TAKE`), and the
        position after them; (None, position) when there are none. ``position`` must
        not be below :attr:`base`."""
        end = min(self.end, position + MAX_TAKE)
        if position >= end:
            return None, position
        joined = self._joined
        if joined is not None and joined[0] == position and joined[1] == end:
            return joined[2], end
        start = position - self.base
        chunk = self.encoding.join(self._frames[start : end - self.base])
        self._joined = (position, end, chunk)
        return chunk, end

    async def wait(self) -> None:
        """Return when frames come (or the pump ends)."""
        await self._waiting.park()

    # -- members ---------------------------------------------------------------------

    def join(self) -> None:
        """A stream uses this hub (the first starts the pump)."""
        self._members += 1
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._pump, name=f"chatbus.sse hub {self.stream!r}")

    async def leave(self) -> None:
        """A stream is done with this hub; the last one stops the pump and waits (a
        bounded time, shielded) until its subscription is closed."""
        self._members -= 1
        if self._members > 0:
            return
        self._forget()
        self._scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_DEADLINE):
            await self._done.wait()

    # -- the pump --------------------------------------------------------------------

    def _forget(self) -> None:
        hubs = _HUBS.get(self.bus)
        key = (self.stream, self.events, id(self.encoding))
        if hubs is not None and hubs.get(key) is self:
            del hubs[key]

    def _announce(self) -> None:
        self._waiting.unpark_all()
        self._waiting = trio.lowlevel.ParkingLot()

    async def _wake(self) -> None:
        # The streams waiting for frames, WAKE_BATCH per scheduler pass (as the flush
        # clock does): 1,000 of them in one pass would hold every other task for it.
        # Those that wait again meanwhile wait for the next frames.
        waiting, self._waiting = self._waiting, trio.lowlevel.ParkingLot()
        try:
            while waiting:
                waiting.unpark(count=WAKE_BATCH)
                await trio.lowlevel.checkpoint()
        finally:
            waiting.unpark_all()

    def _append(self, item: chatbus.Message | chatbus.Event, epoch: int | None) -> None:
        if isinstance(item, chatbus.Message):
            self._frames.append(self.encoding.message(item, epoch))
            self._cursors.append(item.id)
        else:
            self._frames.append(self.encoding.other(event_frame(item)))
            self._cursors.append(self.high)

    def _trim(self) -> None:
        over = len(self._frames) - self.size
        if over > 0:
            over += self.size // 8  # (trim in steps: a list's front is costly to cut)
            self.low = self._cursors[over - 1]
            del self._frames[:over], self._cursors[:over]
            self.base += over

    async def _pump(self) -> None:
        try:
            with self._scope:
                if self.events:
                    subscriber = self.bus.open_subscriber(self.stream, last=0, events=True)
                else:
                    subscriber = self.bus.open_subscriber(self.stream, last=0)
                async with subscriber as sub:
                    self._sub = sub
                    self.low = sub.cursor
                    self.opened = True
                    self._announce()
                    while True:
                        item = await sub.receive()
                        self._append(item, sub.epoch)
                        for _ in range(sub.statistics().buffered):
                            self._append(await sub.receive(), sub.epoch)
                        self._trim()
                        await self._wake()
        except Exception as exc:  # (a system task must not raise: the streams see it)
            self.error = exc
        finally:
            self.ended = True
            self._forget()
            self._announce()
            self._done.set()


_HUBS: Final[weakref.WeakKeyDictionary[chatbus.Bus, dict[_Key, _Hub[str] | _Hub[bytes]]]] = (
    weakref.WeakKeyDictionary()
)


def hub_for(
    bus: chatbus.Bus, stream: str, events: bool, encoding: _Encoding[_Chunk]
) -> _Hub[_Chunk]:
    """The live hub of this room (made if there is none, or the last one ended);
    the caller :meth:`_Hub.join`\\ s it."""
    hubs = _HUBS.get(bus)
    if hubs is None:
        hubs = _HUBS[bus] = {}
    key = (stream, events, id(encoding))
    hub = hubs.get(key)
    if hub is None or hub.ended:
        hub = hubs[key] = _Hub(bus, stream, events, encoding)
    return hub  # type: ignore[return-value]
