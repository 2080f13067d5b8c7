"""Fault injectors: a notifier that mistreats notices and events, a store that lags.

Owns :class:`FaultyNotifier` (drop, duplicate, delay, reorder, reproducibly from a
seed) and :class:`LaggingStore` (reads behind appends, like a replica). Public through
:mod:`chatbus.testing`. Imports chatbus's lower layers only.
"""

from __future__ import annotations

import functools
import heapq
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, final

import attrs
import trio

from ._codec import CommittedNotice
from ._event import Event
from ._message import Draft, Message
from ._options import check_int_range, check_range
from ._protocols import NoticeHandler, Notifier, Store


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

    async def notify_reset(self, stream: str, first_id: int | None = None) -> None:
        """Pass a history change (delete, trim) to the wrapped notifier, if it carries any."""
        reset = getattr(self.inner, "notify_reset", None)
        if reset is not None:
            await reset(stream, first_id)
        else:
            await trio.lowlevel.checkpoint()

    async def notify_redacted(self, stream: str, id: int) -> None:
        """Pass a redaction to the wrapped notifier, if it carries any."""
        tell = getattr(self.inner, "notify_redacted", None)
        if tell is not None:
            await tell(stream, id)
        else:
            await trio.lowlevel.checkpoint()

    async def watch(self, stream: str) -> None:
        """Pass a watch to the wrapped notifier, if it takes them."""
        watch = getattr(self.inner, "watch", None)
        if watch is not None:
            await watch(stream)
        else:
            await trio.lowlevel.checkpoint()

    def unwatch(self, stream: str) -> None:
        """Pass an unwatch to the wrapped notifier, if it takes them."""
        unwatch = getattr(self.inner, "unwatch", None)
        if unwatch is not None:
            unwatch(stream)

    async def notify_events(self, events: Sequence[Event], encoded: Sequence[str]) -> None:
        """Pass events to the wrapped notifier, if it carries any (faults apply on the
        listening side, as for notices: each batch is dropped, duplicated, delayed or
        reordered as a notice would be)."""
        carry = getattr(self.inner, "notify_events", None)
        if carry is not None:
            await carry(events, encoded)
        else:
            await trio.lowlevel.checkpoint()

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
    """Mistreats what one listener is told: notices, and batches of events alike."""

    config: FaultyNotifier
    target: NoticeHandler
    rng: random.Random
    #: (due time, order, delivery) of what is delayed; deliveries held for a reorder.
    _due: list[tuple[float, int, Callable[[], None]]] = attrs.field(factory=list, init=False)
    _held: deque[Callable[[], None]] = attrs.field(factory=deque, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    received: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0
    delivered: int = 0

    def notice(self, stream: str, last_id: int) -> None:
        self._mistreat(functools.partial(self.target.notice, stream, last_id))

    def committed(self, notice: CommittedNotice) -> None:
        target = getattr(self.target, "committed", None)
        if target is None:
            self.notice(notice.stream, notice.last_id)
        else:
            self._mistreat(functools.partial(target, notice))

    def events(self, events: Sequence[Event]) -> None:
        target = getattr(self.target, "events", None)
        if target is not None:
            self._mistreat(functools.partial(target, list(events)))

    def resync(self) -> None:
        self.target.resync()

    def lost(self) -> None:
        if (lost := getattr(self.target, "lost", None)) is not None:
            lost()

    def reset(self, stream: str) -> None:
        # History changes pass straight through, like resyncs (they are rare, and a
        # lost one is found by the poll or the next resync anyway).
        reset = getattr(self.target, "reset", None)
        if reset is not None:
            reset(stream)

    def trimmed(self, stream: str, first_id: int) -> None:
        trimmed = getattr(self.target, "trimmed", None)
        if trimmed is not None:
            trimmed(stream, first_id)

    def redacted(self, stream: str, id: int) -> None:
        redacted = getattr(self.target, "redacted", None)
        if redacted is not None:
            redacted(stream, id)

    def _mistreat(self, delivery: Callable[[], None]) -> None:
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
                self._held.append(delivery)
            elif config.max_delay > 0:
                self.delayed += 1
                due = trio.current_time() + rng.uniform(0, config.max_delay)
                self._seq += 1
                heapq.heappush(self._due, (due, self._seq, delivery))
                self._wakeup.set()
            else:
                self._deliver(delivery)

    def _deliver(self, delivery: Callable[[], None]) -> None:
        self.delivered += 1
        delivery()
        while self._held:
            self.delivered += 1
            self._held.popleft()()

    async def release_due(self) -> None:
        while True:
            if not self._due:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            due, _, delivery = self._due[0]
            if trio.current_time() < due:
                self._wakeup = trio.Event()
                with trio.move_on_at(due):
                    await self._wakeup.wait()
                continue
            heapq.heappop(self._due)
            self._deliver(delivery)


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

    async def retain_events(
        self, events: Sequence[Event], encoded: Sequence[str], *, retention: Any = None
    ) -> None:
        """Retain events in the wrapped store, if it keeps any (events do not lag)."""
        retain = getattr(self.inner, "retain_events", None)
        if retain is not None:
            await retain(events, encoded, retention=retention)
        else:
            await trio.lowlevel.checkpoint()

    def __getattr__(self, name: str) -> Any:
        # The stream lifecycle (stream_info, trim, delete_stream, redact,
        # over_retention) goes straight to the wrapped store, if it has one.
        if name in ("stream_info", "trim", "delete_stream", "redact", "over_retention"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    async def retained_events(self, stream: str, head: int) -> list[Event]:
        """The wrapped store's retained events, if it keeps any."""
        retained = getattr(self.inner, "retained_events", None)
        if retained is None:
            await trio.lowlevel.checkpoint()
            return []
        found: list[Event] = await retained(stream, head)
        return found

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


# --- Scratch backends: a fresh, isolated world per test -------------------------------

#: The backends :func:`open_scratch_backend` knows, by name.
