"""Tools for testing code built on chatbus, and chatbus itself, under adversity.

* :class:`FaultyNotifier` wraps any notifier and drops, duplicates, delays and reorders
  its notices, reproducibly from a seed.
* :class:`LaggingStore` wraps any store so its reads lag its appends, like a read
  replica behind the primary.
* A pytest plugin (installed with chatbus, loaded automatically) provides the
  ``chatbus_bus`` fixture: a fresh in-memory bus for a pytest-trio test.

The contract chatbus keeps under all of these: a subscription still yields every
message exactly once and in id order; faults only change latency.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Sequence
from typing import final

import attrs
import trio

from ._message import Draft, Message
from ._options import check_int_range, check_range
from ._protocols import NoticeHandler, Notifier, Store

__all__ = ["FaultStatistics", "FaultyNotifier", "LaggingStore"]


@attrs.frozen(kw_only=True)
class FaultStatistics:
    """What a :class:`FaultyNotifier` did to the notices passing through it."""

    received: int
    dropped: int
    duplicated: int
    delayed: int
    reordered: int
    delivered: int


@final
@attrs.define(eq=False)
class FaultyNotifier:
    """A notifier wrapper that mistreats notices, reproducibly.

    Each notice from ``inner`` is dropped with probability ``drop``; otherwise it is
    delivered twice with probability ``duplicate``; each copy is held back for a
    random delay up to ``max_delay`` seconds, and with probability ``reorder`` it is
    held until the next notice has been delivered (so they arrive swapped). At most
    ``capacity`` notices are held at once; beyond that, new ones are dropped (as a
    real transport's overflow would). Resync signals pass straight through.

    Args:
        inner: The notifier to wrap; ``notify`` goes straight to it.
        drop: Probability of dropping a notice (0..1).
        duplicate: Probability of delivering a notice twice (0..1).
        reorder: Probability of swapping a notice with the next one (0..1).
        max_delay: Upper bound of the random delay, in seconds (0 for none).
        seed: Seeds the random choices, so a failing run can be replayed.
        capacity: Most notices held back at once.
    """

    inner: Notifier
    drop: float = attrs.field(default=0.0, kw_only=True)
    duplicate: float = attrs.field(default=0.0, kw_only=True)
    reorder: float = attrs.field(default=0.0, kw_only=True)
    max_delay: float = attrs.field(default=0.0, kw_only=True)
    seed: int = attrs.field(default=0, kw_only=True)
    capacity: int = attrs.field(default=1024, kw_only=True)
    _handlers: list[_FaultyHandler] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_range("max_delay", self.max_delay, 0.0, 3600.0)
        check_int_range("capacity", self.capacity, 1, 10_000_000)

    async def notify(self, stream: str, last_id: int) -> None:
        """Pass the notice to the wrapped notifier (faults apply on the listening side)."""
        await self.inner.notify(stream, last_id)

    async def listen(
        self,
        handler: NoticeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen through the wrapped notifier, mistreating what it reports."""
        faulty = _FaultyHandler(self, handler, random.Random(self.seed + len(self._handlers)))
        self._handlers.append(faulty)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(faulty.release_due)
            await nursery.start(self.inner.listen, faulty)
            task_status.started()

    def statistics(self) -> FaultStatistics:
        """Totals over every listener of this notifier."""
        handlers = self._handlers
        return FaultStatistics(
            received=sum(h.received for h in handlers),
            dropped=sum(h.dropped for h in handlers),
            duplicated=sum(h.duplicated for h in handlers),
            delayed=sum(h.delayed for h in handlers),
            reordered=sum(h.reordered for h in handlers),
            delivered=sum(h.delivered for h in handlers),
        )


@final
@attrs.define(eq=False)
class _FaultyHandler:
    config: FaultyNotifier
    target: NoticeHandler
    rng: random.Random
    _due: list[tuple[float, int, str, int]] = attrs.field(factory=list, init=False)
    _held: deque[tuple[str, int]] = attrs.field(factory=deque, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    received: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0
    delivered: int = 0

    def notice(self, stream: str, last_id: int) -> None:
        self.received += 1
        config, rng = self.config, self.rng
        if rng.random() < config.drop:
            self.dropped += 1
            return
        copies = 1
        if rng.random() < config.duplicate:
            copies = 2
            self.duplicated += 1
        for _ in range(copies):
            if len(self._due) + len(self._held) >= config.capacity:
                self.dropped += 1
            elif rng.random() < config.reorder:
                self.reordered += 1
                self._held.append((stream, last_id))
            elif config.max_delay > 0:
                self.delayed += 1
                due = trio.current_time() + rng.uniform(0, config.max_delay)
                self._seq += 1
                heapq.heappush(self._due, (due, self._seq, stream, last_id))
                self._wakeup.set()
            else:
                self._deliver(stream, last_id)

    def resync(self) -> None:
        self.target.resync()

    def _deliver(self, stream: str, last_id: int) -> None:
        self.delivered += 1
        self.target.notice(stream, last_id)
        while self._held:
            held_stream, held_id = self._held.popleft()
            self.delivered += 1
            self.target.notice(held_stream, held_id)

    async def release_due(self) -> None:
        while True:
            if not self._due:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            due, _, stream, last_id = self._due[0]
            if trio.current_time() < due:
                self._wakeup = trio.Event()
                with trio.move_on_at(due):
                    await self._wakeup.wait()
                continue
            heapq.heappop(self._due)
            self._deliver(stream, last_id)


@final
@attrs.define(eq=False)
class LaggingStore:
    """A store wrapper whose reads lag its appends by ``lag`` seconds.

    Like a read replica: an append commits (and returns) at once, but :meth:`read` and
    :meth:`heads` show each batch only ``lag`` seconds later. Ids appended to the
    wrapped store by other means are visible at once.

    Args:
        inner: The store to wrap.
        lag: Seconds between an append and its visibility to reads.
    """

    inner: Store
    lag: float = attrs.field(kw_only=True)
    #: Per stream: (visible_at, first new id) of each batch still hidden from reads.
    _hidden: dict[str, deque[tuple[float, int]]] = attrs.field(factory=dict, init=False)
    _top: dict[str, int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        check_range("lag", self.lag, 0.0, 3600.0)

    async def append(self, stream: str, drafts: Sequence[Draft]) -> list[Message]:
        """Append through the wrapped store; the batch becomes readable ``lag`` s later."""
        messages = await self.inner.append(stream, drafts)
        top = self._top.get(stream, 0)
        new_ids = [m.id for m in messages if m.id > top]
        if new_ids:
            self._top[stream] = max(new_ids)
            self._hidden.setdefault(stream, deque()).append(
                (trio.current_time() + self.lag, min(new_ids))
            )
        return messages

    async def read(self, stream: str, after: int, limit: int) -> list[Message]:
        """Read what is visible so far."""
        messages = await self.inner.read(stream, after, limit)
        visible = self._visible_head(stream)
        if visible is None:
            return messages
        return [m for m in messages if m.id <= visible]

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        """Heads as visible so far."""
        heads = await self.inner.heads(streams)
        for stream in streams:
            visible = self._visible_head(stream)
            if visible is not None and stream in heads:
                heads[stream] = min(heads[stream], visible)
        return heads

    def _visible_head(self, stream: str) -> int | None:
        """The highest readable id while a batch of ``stream`` is hidden, else None."""
        hidden = self._hidden.get(stream)
        now = trio.current_time()
        while hidden and hidden[0][0] <= now:
            hidden.popleft()
        if not hidden:
            self._hidden.pop(stream, None)
            return None
        return min(first for _, first in hidden) - 1
