"""The events half of a subscription: where each event waits for its consumer.

Owns: a subscription's bounded buffer of events (ordered by position), the checks an
event passes on its way in and again where the consumer takes it (stale for its
position, late for its emitter's order, a copy of one received: :class:`EmitterOrder`),
and the joiner's state (retained events not fetched yet; live ones seen before
them). No I/O, no trio:
:class:`chatbus._subscriber.Subscriber` holds one and wakes its consumer.
"""

from __future__ import annotations

import bisect
import collections
import datetime
import enum
from collections.abc import Sequence
from typing import Any, Final, final

import attrs

from ._event import RETAINED_EVENTS, Event

#: Emitters one subscription remembers the last event of (see :class:`EmitterOrder`).
TRACKED_EMITTERS: Final = 1024


class Arrival(enum.Enum):
    """How an event stands against what a consumer got from its emitter."""

    NEW = enum.auto()
    COPY = enum.auto()
    LATE = enum.auto()


#: Arrival's members as plain constants for the paths that run once per event: an
#: enum member's lookup on its class costs about 90 ns on CPython 3.11, ten times a
#: global's.
_NEW: Final = Arrival.NEW
_COPY: Final = Arrival.COPY
_LATE: Final = Arrival.LATE


@final
@attrs.define(eq=False)
class EmitterOrder:
    """Per-emitter order for one consumer: the last event it got from each emitter.

    An event whose ``seq`` is at or below its emitter's last one is not shown: it is a
    copy (:attr:`Arrival.COPY`), or it arrived late (:attr:`Arrival.LATE`: its notice
    was delayed or reordered), and shown now it would break its emitter's order. A
    window over the last :data:`_WINDOW` seqs of each emitter tells the two apart, so
    only events the consumer never saw count as stale.

    Bounded: past ``capacity`` emitters the one heard from least recently is
    forgotten, and from then on an event of an emitter not remembered must be newer
    (``created_at``) than the last event got from any forgotten one. A forgotten
    emitter's late event is refused that way too; so, rarely, is the first event of a
    new emitter whose clock lags that much.
    """

    capacity: int = TRACKED_EMITTERS
    #: emitter -> (last seq, window, its created_at); least recently heard first.
    #: Bit i of the window: seq ``last - i`` was got (or counted late) already.
    _last: collections.OrderedDict[str, tuple[int, int, datetime.datetime]] = attrs.field(
        factory=collections.OrderedDict, init=False
    )
    #: The newest ``created_at`` among the forgotten emitters' last events.
    _forgotten_until: datetime.datetime | None = attrs.field(default=None, init=False)
    #: The emitter heard from last (the end of ``_last``).
    _newest: str | None = attrs.field(default=None, init=False)

    def take(self, event: Event) -> Arrival:
        """:meth:`arrival`, and :meth:`received` if it is new: what a consumer about to
        be handed ``event`` asks. O(1), and quickest for the next event of the emitter
        heard from last."""
        if event.emitter == self._newest:
            seq, window, _ = self._last[event.emitter]
            if event.seq == seq + 1:  # its next one: new, and the newest stays newest
                self._last[event.emitter] = (
                    event.seq,
                    (window << 1 | 1) & _WINDOW_MASK,
                    event.created_at,
                )
                return _NEW
        arrival = self.arrival(event)
        if arrival is _NEW:
            self.received(event)
        return arrival

    def arrival(self, event: Event) -> Arrival:
        """Whether ``event`` is new (to be shown), a copy, or late; a late one is
        remembered as seen, so a copy of it is a copy."""
        last = self._last.get(event.emitter)
        if last is None:
            forgotten = self._forgotten_until
            if forgotten is not None and event.created_at <= forgotten:
                return _LATE
            return _NEW
        seq, window, created_at = last
        back = seq - event.seq
        if back < 0:
            return _NEW
        if back < _WINDOW:
            if window >> back & 1:
                return _COPY
            self._last[event.emitter] = (seq, window | 1 << back, created_at)
        return _LATE

    def received(self, event: Event) -> None:
        """The consumer got ``event`` (a new one)."""
        last = self._last
        known = last.get(event.emitter)
        window = 1
        if known is not None and (ahead := event.seq - known[0]) < _WINDOW:
            window = (known[1] << ahead | 1) & _WINDOW_MASK
        last[event.emitter] = (event.seq, window, event.created_at)
        last.move_to_end(event.emitter)
        self._newest = event.emitter
        if len(last) > self.capacity:
            _, (_, _, created_at) = last.popitem(last=False)
            if self._forgotten_until is None or created_at > self._forgotten_until:
                self._forgotten_until = created_at

    def __len__(self) -> int:
        return len(self._last)


#: Seqs per emitter whose copies :class:`EmitterOrder` tells from late events.
_WINDOW: Final = 64
_WINDOW_MASK: Final = (1 << _WINDOW) - 1


@final
@attrs.define(eq=False)
class EventQueue:
    """Events waiting for one consumer, in (after, created_at) order; bounded."""

    #: Most events buffered for the consumer; beyond it the oldest are dropped.
    limit: int = 256
    #: Most events a stream retains for joiners (the bus's EventRetention.max_events).
    retained_limit: int = RETAINED_EVENTS
    #: The events not yet received.
    buffer: collections.deque[Event] = attrs.field(factory=collections.deque, init=False)
    #: The retained events are in (or not wanted): live ones wait until then, being newer.
    retained_fetched: bool = attrs.field(default=False, init=False)
    delivered: int = attrs.field(default=0, init=False)
    stale: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)
    #: Events refused while the history was in doubt (see Subscriber._in_doubt).
    refused: int = attrs.field(default=0, init=False)
    #: Per emitter, the last of its events the consumer received: one at or below it
    #: is a copy, or too late for its emitter's order (dropped; bounded).
    _order: EmitterOrder = attrs.field(factory=EmitterOrder, init=False)
    #: Room beyond ``limit`` while the retained block is worked through: its size,
    #: until the buffer is down to ``limit`` again (bounded by the stream's retention).
    #: A consumer keeping pace with the live events keeps its backlog, and loses none.
    _retained_room: int = attrs.field(default=0, init=False)
    #: Origins of the live events pushed before the retained ones came (bounded):
    #: the retained copies of those are dropped, so what a slow consumer lost while
    #: catching up does not come back.
    _early: dict[tuple[str, int], None] | None = attrs.field(factory=dict, init=False)

    #: Origins of the events refused before the retained ones came (bounded): those
    #: the retained block brings back are not counted refused.
    _refused_early: dict[tuple[str, int], None] | None = attrs.field(factory=dict, init=False)

    def no_retained(self) -> None:
        """No retained events will come (none kept, or this is no joiner): live ones go."""
        self.retained_fetched = True
        self._early = self._refused_early = None

    def refuse(self, events: Sequence[Event]) -> None:
        """Count ``events`` refused (the history in doubt); a joiner's retained block,
        asked again once the doubt is cleared, may bring them back."""
        self.refused += len(events)
        refused_early = self._refused_early
        if refused_early is not None and not self.retained_fetched:
            for event in events:
                _remember(refused_early, event.origin, self.retained_limit)

    def take(self, last_id: int) -> Event | None:
        """The event due before the message after ``last_id``, if one is here; events
        ahead of it wait for their message."""
        events = self.buffer
        while events and self.retained_fetched and events[0].after <= last_id:
            event = events.popleft()
            if self._retained_room and len(events) <= self.limit:
                self._retained_room = 0
            if event.key is None and event.after < last_id:
                self.stale += 1
                continue
            # Here, where the consumer takes it, whatever way it came (live, retained,
            # a copy): not behind an event of its emitter received already.
            arrival = self._order.take(event)
            if arrival is not _NEW:
                self.stale += arrival is _LATE
                continue
            self.delivered += 1
            return event
        return None

    def push(self, events: list[Event], last_id: int, *, retained: bool = False) -> None:
        """Buffer ``events`` (live, or a joiner's ``retained`` block), the consumer at
        ``last_id``.

        The retained events a joiner gets come all at once and may exceed the buffer
        (they are bounded per stream): the start of a streamed reply is not dropped,
        nor pushed out by live events while the consumer works through it.
        """
        buffer, order, early = self.buffer, self._order, self._early
        before = len(buffer)
        refused_early = self._refused_early if retained else None
        if retained:
            self._early = None  # from now on, copies are dropped on delivery
            self._refused_early = None
        for event in events:
            if refused_early and event.origin in refused_early:
                self.refused -= 1  # back after all: counted as whatever it is now
                del refused_early[event.origin]
            if event.key is None and event.after < last_id:
                self.stale += 1
                continue
            if (arrival := order.arrival(event)) is not _NEW:
                self.stale += arrival is _LATE  # see take
                continue
            if early is not None:
                if retained:
                    if event.origin in early:
                        continue
                else:
                    _remember(early, event.origin, self.retained_limit)
            if buffer and _event_order(event) < _event_order(buffer[-1]):
                bisect.insort(buffer, event, key=_event_order)  # rare: mostly in order
            else:
                buffer.append(event)
            if not retained and len(buffer) > self.limit + self._retained_room:
                buffer.popleft()
                self.dropped += 1
        if retained:
            self._retained_room = len(buffer) - before

    def push_emitted(self, event: Event, last_id: int) -> None:
        """:meth:`push` for one event this bus has just emitted, without its copy check
        (it is its emitter's newest; its order is checked in :meth:`take`)."""
        if event.key is None and event.after < last_id:
            self.stale += 1
            return
        early = self._early
        if early is not None:
            _remember(early, (event.emitter, event.seq), self.retained_limit)
        buffer = self.buffer
        if buffer and (
            event.after < (last := buffer[-1]).after
            or (event.after == last.after and event.created_at < last.created_at)
        ):
            bisect.insort(buffer, event, key=_event_order)  # rare: another's clock ahead
        else:
            buffer.append(event)
        if len(buffer) > self.limit + self._retained_room:
            buffer.popleft()
            self.dropped += 1


def _remember(origins: dict[tuple[str, int], None], origin: tuple[str, int], limit: int) -> None:
    """Add ``origin`` to a bounded record of event origins: beyond ``limit`` (what a
    stream retains, so no retained block can hold more) the oldest goes."""
    origins[origin] = None
    if len(origins) > limit:
        del origins[next(iter(origins))]


def _event_order(event: Event) -> tuple[int, Any]:
    return event.after, event.created_at
