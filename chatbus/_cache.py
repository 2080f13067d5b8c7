"""DurableCache: a bounded window of one stream's recently committed messages.

Pure state, no I/O. Only committed messages go in (after a local append returns, or
from a store read), so anything the cache returns is durable. A lookup answers only
with a run it can prove complete: contiguous from the cursor + 1, which dense ids
make sufficient. Anything else is the caller's cue to read the store.

What the cache holds may go stale: the stream deleted, trimmed or a message redacted
(by any process). :meth:`clear`, :meth:`forget_below` and :meth:`forget` apply such a
change; each bumps :attr:`generation`, so a store read or an append that was in flight
across it (and may hold the old history) is not put in afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import final

import attrs

from ._message import Message


@final
@attrs.define(eq=False)
class DurableCache:
    """Keeps the messages with the ``capacity`` highest ids seen so far.

    Messages may arrive in any order (two local producers race to fill it, store
    reads refill older ids); ids at or below :attr:`floor` are ignored.
    """

    capacity: int
    _by_id: dict[int, Message] = attrs.field(factory=dict, init=False)
    #: Every id <= floor has been evicted (or was never kept).
    floor: int = attrs.field(default=0, init=False)
    #: The highest id ever put in.
    top: int = attrs.field(default=0, init=False)
    #: Bumped whenever what the cache holds is invalidated (see the module header).
    generation: int = attrs.field(default=0, init=False)
    #: The bus's notifier is not hearing (its connection lost, until it is back and
    #: resyncs): a change made elsewhere meanwhile would go unseen, so the cache keeps
    #: and serves nothing (see chatbus._topic.Router.lost).
    deaf: bool = attrs.field(default=False, init=False)

    def put(self, messages: Iterable[Message], generation: int | None = None) -> None:
        """Remember committed ``messages``, evicting the lowest ids beyond capacity.

        Args:
            messages: Committed messages, in any order.
            generation: The :attr:`generation` when they were read or appended: if
                the cache was invalidated since, they may be stale and are ignored.
        """
        if self.deaf or (generation is not None and generation != self.generation):
            return
        by_id = self._by_id
        floor, top = self.floor, self.top
        for message in messages:
            if (id := message.id) > floor:
                by_id[id] = message
                if id > top:
                    top = id
        self.top = top
        new_floor = top - self.capacity
        if new_floor > floor:
            if new_floor - floor < len(by_id):
                for stale in range(floor + 1, new_floor + 1):
                    by_id.pop(stale, None)
            else:
                self._by_id = {i: m for i, m in by_id.items() if i > new_floor}
            self.floor = new_floor

    def forget_below(self, first_id: int) -> None:
        """The stream was trimmed: ids below ``first_id`` are history no more."""
        if first_id - 1 > self.floor:
            self._by_id = {i: m for i, m in self._by_id.items() if i >= first_id}
            self.floor = first_id - 1
            self.top = max(self.top, self.floor)
            self.generation += 1

    def forget(self, id: int) -> None:
        """Message ``id`` changed (redacted): the next lookup reaching it reads the store."""
        self._by_id.pop(id, None)
        self.generation += 1

    def clear(self) -> None:
        """Forget everything (the stream was deleted, or changes may have been missed).

        In place: subscriptions hold on to this object.
        """
        self._by_id = {}
        self.floor = self.top = 0
        self.generation += 1

    def run_after(self, cursor: int, limit: int) -> list[Message]:
        """Return the messages cursor+1, cursor+2, … up to ``limit``, stopping at a hole.

        An empty list means "cannot prove anything": read the store.
        """
        if self.deaf:
            return []
        by_id = self._by_id
        run: list[Message] = []
        next_id = cursor + 1
        while len(run) < limit:
            message = by_id.get(next_id)
            if message is None:
                break
            run.append(message)
            next_id += 1
        return run

    def __len__(self) -> int:
        return len(self._by_id)
