"""One listening session of the Redis backend: its sharded pub/sub connections.

Owns: :class:`ListenSession` (one RESP3 connection per server that holds a watched
stream's slot, subscribed to those streams' channels, pinging itself; all given up
together when one fails), how a session reads what it is sent (notices, committed
notices, history changes, events) and hands it to the handler, and where a Cluster's
slots live (:func:`cluster_slots`). :class:`Server` says where and how to connect.
Imports this package's :mod:`._resp` and :mod:`._lua`; never the store. The notifier
that runs sessions is :mod:`._listen`.
"""

from __future__ import annotations

import collections
import random
import re
from collections.abc import Callable, Sequence
from typing import Final, final

import attrs
import trio

from .._codec import (
    parse_notice,
)
from .._event import decode_events
from .._exceptions import InvalidStream
from .._listener import Beat, ListenLost, Liveness, hand_over
from .._message import check_stream
from .._protocols import NoticeHandler
from ._lua import ping_channel
from ._resp import Push, RespConnection, RespError, hash_slot

#: ``CLIENT SETNAME`` of listening connections (find them with ``CLIENT LIST``).
LISTEN_CLIENT_NAME: Final = "chatbus-listen"
#: How a payload of events begins (see chatbus._event.encode_events).
_EVENTS_PREFIX: Final = b'{"events":'

Address = tuple[str, int]

#: A notice as the append script writes it, when the stream's name needs no escapes
#: (JSON allows no raw ``"``, ``\\`` or control characters in a string).
_PLAIN_NOTICE: Final = re.compile(rb'\{"stream":"([^"\\\x00-\x1f]*)","last_id":([1-9][0-9]*)\}')


def quick_notice(payload: bytes) -> tuple[str, int] | None:
    """The ``(stream, last_id)`` of a notice as the append script writes it, read
    without a JSON parser: ``{"stream":"<name>","last_id":<digits>}`` where the name
    needs no escapes. None for anything else (:func:`chatbus._codec.parse_notice`
    then decides): this never accepts what ``parse_notice`` refuses, nor reads a
    notice differently (once a listener's most frequent value, a notice per stream
    per append round trip).
    """
    match = _PLAIN_NOTICE.fullmatch(payload)
    if match is None:
        return None
    try:
        stream = check_stream(match[1].decode("utf-8"))
    except (UnicodeDecodeError, InvalidStream):
        return None
    return stream, int(match[2])


def _read_notice(payload: bytes) -> tuple[str, int] | None:
    return quick_notice(payload) or parse_notice(payload)


@final
@attrs.frozen(kw_only=True)
class Server:
    """Where and how to connect (shared by the store's client and the listener)."""

    #: The seed nodes (standalone: the one server).
    addresses: tuple[Address, ...]
    cluster: bool
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    db: int = 0


@final
@attrs.define(eq=False)
class Link:
    """One subscribed connection of a session: the channels of one server."""

    conn: RespConnection
    ping_channel: bytes
    subscribed: set[bytes] = attrs.field(factory=set)
    #: Per channel, those waiting for the server to confirm an SSUBSCRIBE (in order).
    confirming: dict[bytes, collections.deque[trio.Event]] = attrs.field(factory=dict)
    #: Per channel, SUNSUBSCRIBEs sent and not yet confirmed: any other is the server's.
    leaving: collections.Counter[bytes] = attrs.field(factory=collections.Counter)
    ping_token: bytes | None = None
    ping_answered: bool = False


@final
@attrs.define(eq=False)
class ListenSession:
    """The connections of one listening session: one per server holding a channel."""

    server: Server
    prefix: str
    handler: NoticeHandler
    #: Slot → server address (cluster): the client's view for the first session, then
    #: CLUSTER SLOTS when a session is opened again (the topology may have changed).
    slots: Callable[[int], Address | None]
    ping_interval: float
    links: dict[Address, Link] = attrs.field(factory=dict)
    nursery: trio.Nursery | None = None
    broken: trio.Event = attrs.field(factory=trio.Event)
    reason: str = ""
    notices: int = 0

    def fail(self, reason: str) -> None:
        """Give the session up: it is replaced, and the handler resynced.

        Whoever waits for a confirmation this session will never get is released (a
        watch returns: the replacement subscribes again; found by a review: a watch
        waited out ``ping_timeout`` when the connection was killed under it).
        """
        if not self.broken.is_set():
            self.reason = reason
            self.broken.set()
            for link in self.links.values():
                for waits in link.confirming.values():
                    for wait in waits:
                        wait.set()
                link.confirming.clear()

    def close(self) -> None:
        self.fail("closed")
        for link in self.links.values():
            link.conn.close()

    def address_of(self, channel: bytes) -> Address:
        if not self.server.cluster:
            return self.server.addresses[0]
        address = self.slots(hash_slot(channel))
        if address is None:
            raise ListenLost(f"no server holds the slot of channel {channel!r}")
        return address

    async def link(self, address: Address, ping_timeout: float) -> Link:
        """The link to ``address``, connected (and pinging itself) if it was not."""
        link = self.links.get(address)
        if link is not None:
            return link
        try:
            with trio.fail_after(ping_timeout):
                conn = await RespConnection.connect(
                    address,
                    username=self.server.username,
                    password=self.server.password,
                    db=self.server.db,
                    client_name=LISTEN_CLIENT_NAME,
                )
        except (OSError, RespError, trio.TooSlowError) as exc:
            raise ListenLost(f"connecting to {address[0]}:{address[1]} failed: {exc!r}") from exc
        link = self.links.get(address)
        if link is not None:  # another task connected meanwhile
            conn.close()
            return link
        tag = f"{random.getrandbits(64):016x}"
        if self.server.cluster:
            tag = _tag_in(address, self.slots, tag)
        link = self.links[address] = Link(conn, ping_channel(self.prefix, tag).encode())
        if self.nursery is not None:
            self.nursery.start_soon(self.serve_link, link, ping_timeout)
        await self._subscribe(link, [link.ping_channel], ping_timeout)
        return link

    def has(self, channel: bytes) -> bool:
        """Whether ``channel``'s subscription is confirmed."""
        link = self.links.get(self.address_of(channel))
        return link is not None and channel in link.subscribed and not link.leaving[channel]

    async def subscribe(self, channels: Sequence[bytes], ping_timeout: float) -> None:
        """SSUBSCRIBE ``channels`` and wait until the server confirms each (a session
        that cannot gets replaced, and a resync follows: then this returns too).

        Before the session is served (while it opens) nothing else reads its links:
        this reads them itself until the confirmations are in.
        """
        by_link: dict[Address, list[bytes]] = {}
        for channel in channels:
            by_link.setdefault(self.address_of(channel), []).append(channel)
        waits: list[tuple[Link, trio.Event]] = []
        for address, wanted in by_link.items():
            if self.broken.is_set():  # nothing would confirm (see fail): returns at once
                return
            link = await self.link(address, ping_timeout)
            waits += [(link, wait) for wait in await self._subscribe(link, wanted, ping_timeout)]
            if self.nursery is None:  # opening: the ping's confirmation too
                waits += [(link, wait) for wait in link.confirming.get(link.ping_channel, ())]
        with trio.move_on_after(ping_timeout) as scope:
            for link, wait in waits:
                while not wait.is_set():
                    if self.nursery is None:
                        await self.pump(link)
                    else:
                        await wait.wait()
        if scope.cancelled_caught:
            self.fail("SSUBSCRIBE was not confirmed in time")

    async def _subscribe(
        self, link: Link, channels: Sequence[bytes], ping_timeout: float
    ) -> list[trio.Event]:
        waits: list[trio.Event] = []
        new: list[bytes] = []
        if self.broken.is_set():  # given up meanwhile: nothing would confirm (see fail)
            return waits
        for channel in channels:
            if channel in link.subscribed and not link.leaving[channel]:
                continue
            wait = trio.Event()
            link.confirming.setdefault(channel, collections.deque()).append(wait)
            waits.append(wait)
            new.append(channel)
        if new:
            # Shielded (and bounded): a caller cancelled here would leave waits for
            # SSUBSCRIBEs never sent, and the next confirmation of such a channel
            # would release the stale wait, not the one it answers (a later open
            # then waited out ping_timeout, and the session was given up).
            with trio.CancelScope(shield=True), trio.move_on_after(ping_timeout) as timer:
                try:
                    await link.conn.send([["SSUBSCRIBE", channel] for channel in new])
                except OSError as exc:
                    self.fail(f"sending SSUBSCRIBE failed: {exc!r}")
            if timer.cancelled_caught:
                self.fail("sending SSUBSCRIBE took longer than ping_timeout")
        return waits

    async def unsubscribe(self, channel: bytes, wanted: Callable[[], bool]) -> None:
        """SUNSUBSCRIBE ``channel`` unless it is ``wanted`` again by now (in the
        background: never raises; a session that cannot is given up, and its
        replacement no longer subscribes the channel).

        A subscription closed and opened again at once (a client reconnecting) watches
        the stream again before this runs: its SSUBSCRIBE was skipped, the channel
        being subscribed still, so this must not end it. Once this has marked the
        channel as leaving (no checkpoint before), a new watch sends its SSUBSCRIBE
        after this SUNSUBSCRIBE (the connection's sends keep their order)."""
        if wanted():
            return
        try:
            address = self.address_of(channel)
        except ListenLost as exc:
            self.fail(str(exc))
            return
        link = self.links.get(address)
        if link is None or channel not in link.subscribed:
            return
        link.subscribed.discard(channel)
        link.leaving[channel] += 1
        try:
            await link.conn.send([["SUNSUBSCRIBE", channel]])
        except OSError as exc:
            self.fail(f"sending SUNSUBSCRIBE failed: {exc!r}")

    async def pump(self, link: Link) -> None:
        """Read once from ``link`` and handle every complete value."""
        try:
            await link.conn.receive()
        except OSError as exc:
            raise ListenLost(f"{_where(link)}: {exc!r}") from exc
        events = False
        try:
            for value in link.conn.parser.values():
                events |= self._dispatch(link, value)
        except RespError as exc:
            raise ListenLost(f"{_where(link)}: {exc}") from exc
        if events:
            await trio.lowlevel.checkpoint()  # consumers drain their events first

    def _dispatch(self, link: Link, value: object) -> bool:
        """Handle one value from ``link``; return whether it carried events."""
        if isinstance(value, RespError):
            # MOVED for an SSUBSCRIBE (the slot left), or anything else refused.
            raise ListenLost(f"{_where(link)} refused a command: {value}")
        if not isinstance(value, Push):
            return False  # the count an SPUBLISH (a ping) reached
        items = value.items
        if len(items) < 3 or not isinstance(kind := items[0], bytes):
            return False
        channel = items[1]
        if not isinstance(channel, bytes):
            return False
        if kind == b"smessage":
            payload = items[2]
            if not isinstance(payload, bytes):
                return False
            if channel == link.ping_channel:
                if payload == link.ping_token:
                    link.ping_answered = True
                return False
            return self._message(payload)
        if kind == b"ssubscribe":
            link.subscribed.add(channel)
            waiting = link.confirming.get(channel)
            if waiting:
                waiting.popleft().set()
                if not waiting:
                    del link.confirming[channel]
        elif kind == b"sunsubscribe":
            if link.leaving[channel]:
                link.leaving[channel] -= 1
                if not link.leaving[channel]:
                    del link.leaving[channel]
            else:
                # The server ended it: its slot moved to another server.
                raise ListenLost(f"{_where(link)} ended the subscription of {channel!r}")
        return False

    def _message(self, payload: bytes) -> bool:
        handler = self.handler
        if payload.startswith(_EVENTS_PREFIX):
            events = decode_events(payload)
            if events:
                handler.events(events)
            return bool(events)
        self.notices += hand_over(handler, payload, _read_notice)
        return False

    async def serve_link(self, link: Link, ping_timeout: float) -> None:
        """Read ``link`` until the session breaks; ping it; a failure breaks the session."""
        liveness = Liveness.starting(self.ping_interval, ping_timeout, trio.current_time())
        try:
            while True:
                # A bare scope, not trio.move_on_at: this is once per read.
                with trio.CancelScope(deadline=liveness.wake_at()):
                    await self.pump(link)
                beat = liveness.step(trio.current_time(), link.ping_answered)
                if beat is Beat.DEAD:
                    raise ListenLost(f"{_where(link)}: no answer to a ping in {ping_timeout} s")
                if beat is Beat.PING:
                    link.ping_token = liveness.token
                    link.ping_answered = False
                    await link.conn.send([["SPUBLISH", link.ping_channel, liveness.token]])
        except ListenLost as exc:
            self.fail(str(exc))
        except OSError as exc:
            self.fail(f"{_where(link)}: {exc!r}")


def _where(link: Link) -> str:
    host, port = link.conn.address
    return f"the listen connection to {host}:{port}"


def _tag_in(address: Address, slots: Callable[[int], Address | None], seed: str) -> str:
    """A hash tag starting with ``seed`` whose slot ``address`` holds (for its pings)."""
    for n in range(1_000_000):
        tag = f"{seed}.{n}"
        if slots(hash_slot(tag.encode())) == address:
            return tag
    raise ListenLost(f"no slot of {address} found for a ping channel")


async def cluster_slots(
    server: Server, timeout: float, known: Sequence[Address] = ()
) -> tuple[list[Address | None], list[Address]]:
    """Slot → primary address, asked of the first node that answers (the seeds, then
    the ``known`` nodes of an earlier answer: the seeds may all be gone by now); and
    every node this answer names."""
    errors = []
    for address in dict.fromkeys([*server.addresses, *known]):
        try:
            with trio.fail_after(timeout):
                conn = await RespConnection.connect(
                    address,
                    username=server.username,
                    password=server.password,
                    db=0,
                    client_name=LISTEN_CLIENT_NAME,
                )
                try:
                    await conn.send([["CLUSTER", "SLOTS"]])
                    reply = await conn.reply()
                finally:
                    conn.close()
        except (OSError, RespError, trio.TooSlowError) as exc:
            errors.append(f"{address[0]}:{address[1]}: {exc!r}")
            continue
        if isinstance(reply, RespError) or not isinstance(reply, list):
            errors.append(f"{address[0]}:{address[1]}: CLUSTER SLOTS gave {reply!r}")
            continue
        slots: list[Address | None] = [None] * 16384
        nodes: dict[Address, None] = {}
        for row in reply:
            start, end, primary = row[0], row[1], row[2]
            for node in row[2:]:
                nodes[(node[0].decode() if node[0] else address[0], int(node[1]))] = None
            host = primary[0].decode() if primary[0] else address[0]
            for slot in range(start, end + 1):
                slots[slot] = (host, int(primary[1]))
        return slots, list(nodes)
    raise ListenLost("no cluster node answered: " + "; ".join(errors))
