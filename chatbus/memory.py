"""The embedded in-memory backend: :class:`MemoryStore` and :class:`MemoryNotifier`.

Both live in one process. Several buses may share one store and one notifier, which
is how the test suite plays "several processes" without a database.
"""

from __future__ import annotations

import bisect
import collections
import datetime
import json
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from ._event import EncodedEvents, Event, RetainedEvents
from ._message import Draft, Message, StreamInfo
from ._options import EventRetention
from ._protocols import NoticeHandler
from ._retention import RetentionPage

__all__ = ["MemoryNotifier", "MemoryStore", "open_backend"]

_EARLIEST = datetime.datetime.min.replace(tzinfo=datetime.UTC)
_DEFAULT_RETENTION = EventRetention()


@final
@attrs.define(eq=False)
class _Log:
    #: The retained messages: ids first_id, first_id + 1, …, head.
    messages: list[Message] = attrs.Factory(list)
    by_key: dict[str, Message] = attrs.Factory(dict)
    #: Trimmed messages whose keys still answer retries, in id order (see trim).
    trimmed_keys: collections.deque[Message] = attrs.Factory(collections.deque)
    last_at: datetime.datetime = _EARLIEST
    head: int = 0
    first_id: int = 1
    epoch: int = attrs.Factory(lambda: random.getrandbits(62) + 1)


@final
@attrs.define(eq=False)
class MemoryStore:
    """A :class:`~chatbus.Store` that keeps every stream in a Python list.

    Appends are atomic (no await between assigning ids and making them visible), so ids
    are dense and commit-ordered. Bodies are decoded from their JSON text, so a
    subscriber sees exactly what a Postgres store would return.

    Args:
        now: The store's clock for messages: their ``created_at``, and what
            retention and the key window measure ages against (a test under trio's
            ``autojump_clock`` passes one that follows ``trio.current_time()``).
            Events keep the wall clock.
    """

    now: Callable[[], datetime.datetime] = attrs.field(
        default=lambda: datetime.datetime.now(datetime.UTC), kw_only=True
    )
    _logs: dict[str, _Log] = attrs.field(factory=dict, init=False)
    _events: dict[str, RetainedEvents] = attrs.field(factory=dict, init=False)

    async def append(self, stream: str, drafts: Sequence[Draft]) -> list[Message]:
        """Append ``drafts`` to ``stream``; see :meth:`chatbus.Store.append`."""
        await trio.lowlevel.checkpoint()
        log = self._logs.get(stream)
        if log is None:
            log = self._logs[stream] = _Log()
        # Never earlier than the stream's last batch, whatever the wall clock does.
        now = max(self.now(), log.last_at)
        result = []
        for draft in drafts:
            if draft.key is not None and (existing := log.by_key.get(draft.key)) is not None:
                result.append(attrs.evolve(existing, replay=True))
                continue
            log.head += 1
            message = Message(
                stream=stream,
                id=log.head,
                body=json.loads(draft.body_json),
                key=draft.key,
                created_at=now,
            )
            log.messages.append(message)
            if draft.key is not None:
                log.by_key[draft.key] = message
            result.append(message)
        log.last_at = now
        return result

    async def read(self, stream: str, after: int, limit: int) -> list[Message]:
        """Return up to ``limit`` messages after ``after``; see :meth:`chatbus.Store.read`."""
        await trio.lowlevel.checkpoint()
        log = self._logs.get(stream)
        if log is None:
            return []
        start = max(after + 1, log.first_id) - log.first_id
        return log.messages[start : start + limit]

    async def stream_info(self, stream: str) -> StreamInfo:
        """Where ``stream`` stands; see :meth:`chatbus.Bus.stream_info`."""
        await trio.lowlevel.checkpoint()
        log = self._logs.get(stream)
        if log is None:
            return StreamInfo(stream=stream, head=0, first_id=1, epoch=0, exists=False)
        return StreamInfo(
            stream=stream, head=log.head, first_id=log.first_id, epoch=log.epoch, exists=True
        )

    async def delete_stream(self, stream: str) -> None:
        """Forget ``stream``: messages, keys, retained events; the next append starts a
        new epoch at id 1."""
        await trio.lowlevel.checkpoint()
        self._logs.pop(stream, None)
        self._events.pop(stream, None)

    async def trim(
        self,
        stream: str,
        before: int,
        *,
        keys_for: float | None = None,
        epoch: int | None = None,
    ) -> int:
        """Drop the messages of ``stream`` below ``before``; return the first id kept.

        Their idempotency keys keep answering a retried publish with the original
        message until it is ``keys_for`` seconds old (None: as long as the stream
        lives); see :meth:`chatbus._protocols.LifecycleStore.trim`.
        """
        await trio.lowlevel.checkpoint()
        log = self._logs.get(stream)
        if log is None:
            return 1
        if epoch is not None and epoch != log.epoch:
            return log.first_id  # another history than the caller examined
        before = min(before, log.head + 1)
        if before > log.first_id:
            cut = before - log.first_id
            log.trimmed_keys.extend(m for m in log.messages[:cut] if m.key is not None)
            del log.messages[:cut]
            log.first_id = before
        if keys_for is not None:
            cutoff = self.now() - datetime.timedelta(seconds=keys_for)
            while log.trimmed_keys and log.trimmed_keys[0].created_at < cutoff:
                expired = log.trimmed_keys.popleft()
                assert expired.key is not None
                if log.by_key.get(expired.key) is expired:
                    del log.by_key[expired.key]
        return log.first_id

    async def over_retention(
        self,
        after: str,
        limit: int,
        *,
        max_messages: int | None,
        max_age: float | None,
        keys_for: float | None,
    ) -> RetentionPage:
        """Which streams hold messages beyond a retention policy; see
        :meth:`chatbus._protocols.LifecycleStore.over_retention` (streams in code
        point order)."""
        await trio.lowlevel.checkpoint()
        now = self.now()
        names = sorted(name for name in self._logs if name > after)
        trims = []
        for name in names[:limit]:
            log = self._logs[name]
            before = log.first_id
            if max_messages is not None:
                before = max(before, log.head - max_messages + 1)
            if max_age is not None:
                cutoff = now - datetime.timedelta(seconds=max_age)
                # created_at never decreases in id order: the first young one, by bisection.
                young = bisect.bisect_left(log.messages, cutoff, key=lambda m: m.created_at)
                before = max(before, log.first_id + young)
            stale_keys = (
                keys_for is not None
                and bool(log.trimmed_keys)
                and log.trimmed_keys[0].created_at < now - datetime.timedelta(seconds=keys_for)
            )
            if before > log.first_id or stale_keys:
                trims.append((name, before, log.epoch))
        next_after = names[limit - 1] if len(names) > limit else None
        return RetentionPage(trims=trims, next_after=next_after)

    async def redact(self, stream: str, id: int) -> Message | None:
        """Replace message ``id``'s body by a tombstone; return it (None if not retained)."""
        await trio.lowlevel.checkpoint()
        log = self._logs.get(stream)
        if log is None or not log.first_id <= id <= log.head:
            return None
        index = id - log.first_id
        tombstone = attrs.evolve(log.messages[index], body=None, redacted=True)
        log.messages[index] = tombstone
        if tombstone.key is not None:
            log.by_key[tombstone.key] = tombstone
        return tombstone

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        """Return each stream's highest id; see :meth:`chatbus.Store.heads`."""
        await trio.lowlevel.checkpoint()
        return {stream: self.last_id(stream) for stream in streams}

    async def retain_events(
        self,
        events: Sequence[Event],
        encoded: Sequence[str],
        *,
        retention: EventRetention | None = None,
    ) -> None:
        """Keep ``events`` for joiners; see :meth:`chatbus.EventStore.retain_events`."""
        await trio.lowlevel.checkpoint()
        if retention is None:
            retention = _DEFAULT_RETENTION
        # The bound is in UTF-8 bytes, as on the wire: a bus's flush knows the sizes
        # (and never makes the text, which this store does not keep).
        if type(encoded) is EncodedEvents:
            sizes = encoded.sizes()
        else:  # str.isascii is O(1)
            sizes = [len(t) if t.isascii() else len(t.encode("utf-8")) for t in encoded]
        by_stream: dict[str, list[tuple[Event, int]]] = {}
        if len({event.stream for event in events}) == 1:  # the usual flush: no sorting
            by_stream[events[0].stream] = list(zip(events, sizes, strict=True))
        else:
            for event, size in zip(events, sizes, strict=True):
                sized = by_stream.get(event.stream)
                if sized is None:
                    sized = by_stream[event.stream] = []
                sized.append((event, size))
        for stream, sized in by_stream.items():
            retained = self._events.get(stream)
            if retained is None:
                retained = self._events[stream] = RetainedEvents(
                    retention.max_events, retention.max_bytes
                )
            else:  # this flush's bus's bounds, from now on
                retained.max_events = retention.max_events
                retained.max_bytes = retention.max_bytes
            retained.add(sized)

    async def retained_events(self, stream: str, head: int) -> list[Event]:
        """Events a joiner at ``head`` gets; see :meth:`chatbus.EventStore.retained_events`."""
        await trio.lowlevel.checkpoint()
        retained = self._events.get(stream)
        if retained is None:
            return []
        return retained.retained(head, datetime.datetime.now(datetime.UTC))

    def last_id(self, stream: str) -> int:
        """The highest committed id of ``stream`` (0 if it is empty), synchronously."""
        log = self._logs.get(stream)
        return 0 if log is None else log.head

    #: The former name of :meth:`last_id` (it never raised ``trio.WouldBlock``).
    head_nowait = last_id


@final
@attrs.define(eq=False)
class MemoryNotifier:
    """A :class:`~chatbus.Notifier` that calls every listening bus's handler directly.

    Delivery is synchronous and never queues, so it cannot lose, reorder or grow.
    """

    _handlers: set[NoticeHandler] = attrs.field(factory=set, init=False)

    async def notify(self, stream: str, last_id: int) -> None:
        """Report the notice to every listener now."""
        # No checkpoint: this is called on every commit, and delivery is synchronous.
        for handler in list(self._handlers):
            handler.notice(stream, last_id)

    async def notify_reset(self, stream: str, first_id: int | None = None) -> None:
        """Tell every listener that ``stream`` was deleted, or trimmed to ``first_id``."""
        for handler in list(self._handlers):
            if first_id is None:
                reset = getattr(handler, "reset", None)
                if reset is not None:
                    reset(stream)
            else:
                trimmed = getattr(handler, "trimmed", None)
                if trimmed is not None:
                    trimmed(stream, first_id)

    async def notify_redacted(self, stream: str, id: int) -> None:
        """Tell every listener that message ``id`` of ``stream`` was redacted."""
        for handler in list(self._handlers):
            redacted = getattr(handler, "redacted", None)
            if redacted is not None:
                redacted(stream, id)

    async def notify_events(self, events: Sequence[Event], encoded: Sequence[str]) -> None:
        """Report ``events`` to every listener now (the emitter's own bus ignores them)."""
        for handler in list(self._handlers):
            handler.events(events)

    async def listen(
        self,
        handler: NoticeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register ``handler`` until cancelled."""
        self._handlers.add(handler)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._handlers.discard(handler)


@asynccontextmanager
async def open_backend(url: str) -> AsyncIterator[tuple[MemoryStore, MemoryNotifier]]:
    """A fresh store and notifier for ``memory://`` (:func:`chatbus.open_bus`'s table)."""
    if url != "memory://":
        raise ValueError(f"a memory bus url is exactly 'memory://', got {url!r}")
    yield MemoryStore(), MemoryNotifier()
