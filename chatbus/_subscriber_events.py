"""The events half of a subscription: where each event waits for its consumer.

Owns: a subscription's bounded buffer of events (ordered by position), the checks an
event passes on its way in and again where the consumer takes it (stale for its
position, late for its emitter's order, a copy of one received), and the joiner's
state (retained events not fetched yet; live ones seen before them). No I/O, no trio:
:class:`chatbus._subscriber.Subscriber` holds one and wakes its consumer.
"""

from __future__ import annotations

import bisect
import collections
from typing import Any, Final, final

import attrs

from ._event import RETAINED_EVENTS, Arrival, EmitterOrder, Event

#: Arrival's members as plain constants (see chatbus._event._NEW: quicker per event).
_NEW: Final = Arrival.NEW
_LATE: Final = Arrival.LATE


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
    #: Per emitter, the last of its events the consumer received: one at or below it
    #: is a copy, or too late for its emitter's order (dropped; bounded).
    _order: EmitterOrder = attrs.field(factory=EmitterOrder, init=False)
    #: Origins of the live events pushed before the retained ones came (bounded):
    #: the retained copies of those are dropped, so what a slow consumer lost while
    #: catching up does not come back.
    _early: dict[tuple[str, int], None] | None = attrs.field(factory=dict, init=False)

    def no_retained(self) -> None:
        """No retained events will come (none kept, or this is no joiner): live ones go."""
        self.retained_fetched = True
        self._early = None

    def take(self, last_id: int) -> Event | None:
        """The event due before the message after ``last_id``, if one is here; events
        ahead of it wait for their message."""
        events = self.buffer
        while events and self.retained_fetched and events[0].after <= last_id:
            event = events.popleft()
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
        (they are bounded per stream): the start of a streamed reply is not dropped.
        """
        buffer, order, early = self.buffer, self._order, self._early
        if retained:
            self._early = None  # from now on, copies are dropped on delivery
        for event in events:
            if event.key is None and event.after < last_id:
                self.stale += 1
                continue
            if (arrival := order.arrival(event)) is not Arrival.NEW:
                self.stale += arrival is _LATE  # see take
                continue
            if early is not None:
                if retained:
                    if event.origin in early:
                        continue
                else:
                    early[event.origin] = None
                    if len(early) > self.retained_limit:  # a stream retains no more
                        del early[next(iter(early))]
            if buffer and _event_order(event) < _event_order(buffer[-1]):
                bisect.insort(buffer, event, key=_event_order)  # rare: mostly in order
            else:
                buffer.append(event)
            if not retained and len(buffer) > self.limit:
                buffer.popleft()
                self.dropped += 1

    def push_emitted(self, event: Event, last_id: int) -> None:
        """:meth:`push` for one event this bus has just emitted, without its copy check
        (it is its emitter's newest; its order is checked in :meth:`take`)."""
        if event.key is None and event.after < last_id:
            self.stale += 1
            return
        early = self._early
        if early is not None:
            early[event.emitter, event.seq] = None
            if len(early) > self.retained_limit:
                del early[next(iter(early))]
        buffer = self.buffer
        if buffer and (
            event.after < (last := buffer[-1]).after
            or (event.after == last.after and event.created_at < last.created_at)
        ):
            bisect.insort(buffer, event, key=_event_order)  # rare: another's clock ahead
        else:
            buffer.append(event)
        if len(buffer) > self.limit:
            buffer.popleft()
            self.dropped += 1


def _event_order(event: Event) -> tuple[int, Any]:
    return event.after, event.created_at
