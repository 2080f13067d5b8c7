"""Topic: the bus's shared state for one stream (cache, high-water mark, wake-up)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import attrs
import trio

from ._cache import DurableCache
from ._message import Message


@final
@attrs.define(eq=False)
class Topic:
    """One stream as seen by one bus.

    The listener and local producers only ever raise :attr:`high_water` and swap
    :attr:`changed` (coalescing, never blocking); subscriptions wait on the event and
    do the work themselves. So a notice costs O(1) however many subscribers there are,
    and a slow subscriber holds up nobody.
    """

    name: str
    cache: DurableCache
    #: Highest id known to be committed (from local commits, notices and polls).
    high_water: int = 0
    #: Bumped on every resync; a subscription that sees it change rescans.
    resyncs: int = 0
    #: Set (and replaced) whenever high_water or resyncs change.
    changed: trio.Event = attrs.field(factory=trio.Event)
    subscribers: int = 0
    users: int = 0

    def advance(self, last_id: int) -> None:
        """Record that ids up to ``last_id`` exist; wake subscriptions if that is news."""
        if last_id > self.high_water:
            self.high_water = last_id
            self._wake()

    def committed(self, messages: Sequence[Message]) -> int:
        """A local append committed ``messages``: cache them, wake subscriptions.

        Returns the highest id among them.
        """
        self.cache.put(messages)
        last_id = max(message.id for message in messages)
        self.advance(last_id)
        return last_id

    def resync(self) -> None:
        """Make every subscription of this topic rescan from its cursor."""
        self.resyncs += 1
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
