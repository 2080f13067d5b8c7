"""The bus: owns the store, the notifier, the listener, the topics and their caches."""

from __future__ import annotations

import functools
import random
from typing import Literal, cast, final, overload

import attrs
import trio

from . import _lifecycle
from ._emit import Emitter
from ._event import Event, EventDraft
from ._exceptions import BusClosed
from ._message import (
    Message,
    StreamInfo,
    check_after,
    check_stream,
    make_draft,
)
from ._options import (
    MAX_READ_LIMIT,
    BusOptions,
    check_int_range,
)
from ._outbox import Outbox
from ._protocols import LifecycleStore, Notifier, Store
from ._publisher import Producer, Publisher
from ._retention import Retention, sweep
from ._subscriber import Subscriber
from ._topic import Router, Topic, Topics
from ._util import NoPublicConstructor

#: How long :meth:`Bus.publish`'s shared per-stream producer idles before it retires.
_SHARED_PRODUCER_IDLE_SECONDS = 5.0


@attrs.frozen(kw_only=True)
class BusStatistics:
    """A snapshot of a bus.

    Attributes:
        streams: Streams with an open publisher or subscription here.
        subscribers: Open subscriptions.
        publishers: Running producers (publishers plus ``Bus.publish``'s shared ones).
        notices: Notices received from the notifier.
        resyncs: Resync signals received from the notifier (reconnects, overflows).
        polls: Safety-net polls of the store's stream heads.
        poll_errors: Polls that failed (retried at the next interval).
        events_emitted: Events emitted by this bus.
        events_received: Events received from other buses (through the notifier).
        event_flushes: Batches of events handed to the store and notifier.
        events_dropped: Emitted events dropped before a flush (the outbox is
            bounded) — the emitter outran its store.
        event_errors: Flushes that failed (those events reached local subscribers
            only).
        retention_sweeps: Retention sweeps over the store's streams completed.
        retention_trims: Trims made by those sweeps.
        retention_errors: Store errors met by retention (each skipped; retried at the
            next sweep).
    """

    streams: int
    subscribers: int
    publishers: int
    notices: int
    resyncs: int
    polls: int
    poll_errors: int
    events_emitted: int
    events_received: int
    event_flushes: int
    events_dropped: int
    event_errors: int
    retention_sweeps: int = 0
    retention_trims: int = 0
    retention_errors: int = 0


@final
@attrs.define(eq=False)
class Bus(metaclass=NoPublicConstructor):
    """A message bus over one store and one notifier. Made by :func:`open_bus`."""

    _store: Store
    _notifier: Notifier
    _options: BusOptions
    _nursery: trio.Nursery
    _topics: Topics = attrs.field(init=False)
    _router: Router = attrs.field(init=False)
    _shared: dict[str, Producer] = attrs.field(factory=dict, init=False)
    _producers: set[Producer] = attrs.field(factory=set, init=False)
    #: Scopes of the bus's own tasks (listener, poll): closing the bus cancels these,
    #: never the nursery's scope, which also encloses the caller's ``async with`` body.
    _service_scopes: list[trio.CancelScope] = attrs.field(factory=list, init=False)
    _polls: int = attrs.field(default=0, init=False)
    _poll_errors: int = attrs.field(default=0, init=False)
    _outbox: Outbox = attrs.field(init=False)
    #: The emit path (see _emit).
    _emitter: Emitter = attrs.field(init=False)
    _retention_sweeps: int = attrs.field(default=0, init=False)
    _retention_trims: int = attrs.field(default=0, init=False)
    _retention_errors: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._topics = Topics(
            self._options.cache_size, trio.CapacityLimiter(self._options.max_concurrent_reads)
        )
        watch = getattr(self._notifier, "watch", None)
        unwatch = getattr(self._notifier, "unwatch", None)
        if watch is not None and unwatch is not None:
            self._topics.watcher = (watch, unwatch)
        self._outbox = Outbox(self._options.outbox_size)
        self._emitter = Emitter(
            self._topics,
            self._store,
            self._outbox,
            self._nursery,
            self._service_scopes,
            self._options.max_event_bytes,
        )
        self._router = Router(
            self._topics.by_name, self._emitter.id, deafened=self._topics.set_deaf
        )

    @property
    def store(self) -> Store:
        """The store this bus appends to and reads from."""
        return self._store

    @property
    def notifier(self) -> Notifier:
        """The notifier this bus listens to."""
        return self._notifier

    def open_publisher(self, stream: str, *, max_batch: int | None = None) -> Publisher:
        """Open a publisher for ``stream`` with its own producer task.

        Use the result as ``async with bus.open_publisher(stream) as pub:``. Leaving
        the block stops new publishes, waits (up to 10 s) for the queued ones to
        commit, then stops the producer.

        Args:
            stream: The stream to append to.
            max_batch: Most messages per group commit (default: the bus's).

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            BusClosed: the bus is closed (on entry).
        """
        check_stream(stream)
        if max_batch is None:
            max_batch = self._options.max_batch
        check_int_range("max_batch", max_batch, 1, 100_000)
        return Publisher._create(
            stream,
            self._options.max_body_bytes,
            functools.partial(self._start_producer, stream, max_batch),
            self._stop_producer,
            self._emitter.emit_or_draft,
            self._emitter.emit_at_head,
        )

    def _start_producer(self, stream: str, max_batch: int) -> Producer:
        producer = self._new_producer(self._topics.acquire(stream), max_batch)
        self._producers.add(producer)
        return producer

    def _stop_producer(self, producer: Producer) -> None:
        self._producers.discard(producer)
        self._topics.release(producer.topic)

    @overload
    def open_subscriber(
        self,
        stream: str,
        after: int | None = None,
        *,
        last: int | None = None,
        epoch: int | None = None,
        events: Literal[False] = False,
    ) -> Subscriber[Message]: ...

    @overload
    def open_subscriber(
        self,
        stream: str,
        after: int | None = None,
        *,
        last: int | None = None,
        epoch: int | None = None,
        events: Literal[True],
    ) -> Subscriber[Message | Event]: ...

    @overload
    def open_subscriber(
        self, stream: str, after: int | None = None, *, last: int | None = None, events: bool
    ) -> Subscriber[Message] | Subscriber[Message | Event]: ...

    def open_subscriber(
        self,
        stream: str,
        after: int | None = None,
        *,
        last: int | None = None,
        epoch: int | None = None,
        events: bool = False,
    ) -> Subscriber[Message] | Subscriber[Message | Event]:
        """Subscribe to ``stream``: its messages after ``after``, then live ones.

        Use the result as ``async with bus.open_subscriber(stream) as sub:``. On entry
        the subscription registers for wake-ups and then reads the store, so nothing
        committed while it starts is missed; it yields ``after + 1``, ``after + 2``, …
        exactly once and in order until the block ends or the bus closes.

        Args:
            stream: The stream to follow.
            after: The cursor: the id of the last message already seen (0 for all,
                the default).
            last: Instead of ``after``: start at the stream's last ``last`` messages
                (0: only new ones), as the head stands when the subscription opens.
            epoch: The epoch ``after`` belongs to (from :meth:`stream_info` or
                :attr:`Subscriber.epoch`); if the stream's is another one now, entering
                raises :class:`~chatbus.HistoryReset`.
            events: Also yield the stream's events (:class:`~chatbus.Event`), each in
                its place among the messages; right after catching up to the head
                message, first the events the stream retained for joiners.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            ValueError: ``after`` is negative.
            TypeError: ``after`` is not an int.
            BusClosed: the bus is closed (on entry).
            CursorAhead: (on entry) ``after`` is past the stream's head.
            HistoryTruncated: (on entry, or later while iterating) the messages after
                the cursor were trimmed away.
            HistoryReset: (on entry) ``epoch`` is stale; StreamDeleted (while
                iterating) the stream was deleted.
        """
        check_stream(stream)
        if epoch is not None:
            check_int_range("epoch", epoch, 0, 2**63 - 1)
        if last is not None:
            if after is not None:
                raise ValueError("pass after or last, not both")
            check_int_range("last", last, 0, MAX_READ_LIMIT * 100)
        elif after is None:
            after = 0
        if after is not None:
            check_after(after)
        if not isinstance(events, bool):
            raise TypeError(f"events must be a bool, not {type(events).__name__}")
        subscriber = Subscriber._create(
            self._topics,
            stream,
            self._store,
            after if after is not None else -(last or 0) - 1,
            self._options.read_batch,
            self._nursery,
            events,
            self._options.event_buffer,
            epoch,
            functools.partial(self._outbox.flushed, stream),
            self._options.event_retention.max_events,
        )
        return cast("Subscriber[Message] | Subscriber[Message | Event]", subscriber)

    async def emit(
        self, stream: str, body: object, *, key: str | None = None, ttl: float | None = None
    ) -> Event:
        """Emit an ephemeral event on ``stream``: delivered, never stored as a message.

        It is positioned after the stream's last message as this bus knows it (the
        returned event's ``after``), reaches this bus's event subscriptions at once
        and other processes' through the notifier, at most once. ``emit`` never waits
        for a subscriber.

        Args:
            stream: The stream the event belongs to.
            body: Any JSON-serialisable value (at most ``max_event_bytes`` as JSON).
            key: Latest-value state: a later event with the same key replaces this
                one for joiners (``"status"``, ``"typing:al"``). None for a plain
                event (a streamed part), retained for joiners until the next message.
            ttl: Seconds the event stays retained for joiners at most (None: a keyed
                one until replaced, a plain one until the next message).

        Returns:
            The event, as subscribers get it.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            InvalidMessage: ``body`` is not JSON-serialisable, ``key`` is not valid
                or ``ttl`` is not a number (it is a ValueError, too).
            MessageTooLarge: ``body`` encodes to more than ``max_event_bytes``.
            ValueError: ``ttl`` is not a positive number of seconds (up to a day).
            BusClosed: the bus is closed.
        """
        # See Emitter.emit_or_draft: one coroutine per event, this one.
        await trio.lowlevel.checkpoint_if_cancelled()
        event = self._emitter.emit_or_draft(stream, body, key, ttl)
        if isinstance(event, EventDraft):
            return await self._emitter.emit_at_head(stream, body, event)
        return event

    async def publish(self, stream: str, body: object, *, key: str | None = None) -> Message:
        """Publish one message to ``stream`` without opening a publisher.

        Concurrent calls for one stream share a producer task owned by the bus (it
        retires after a few idle seconds), so they are group-committed too. See
        :meth:`Publisher.publish` for arguments and errors.
        """
        check_stream(stream)
        draft = make_draft(body, key, max_body_bytes=self._options.max_body_bytes)
        while True:
            producer = self._shared.get(stream)
            if producer is None:
                topic = self._topics.acquire(stream)
                producer = self._new_producer(topic, self._options.max_batch)
                self._shared[stream] = producer
                self._nursery.start_soon(
                    functools.partial(producer.run, idle_timeout=_SHARED_PRODUCER_IDLE_SECONDS)
                )
            try:
                return await producer.submit(draft)
            except BusClosed:
                if producer.closed_because == "idle" and not self._topics.closed:
                    continue  # it retired just now; start a fresh one
                raise

    async def read(
        self,
        stream: str,
        after: int | None = None,
        limit: int = 100,
        *,
        before: int | None = None,
        epoch: int | None = None,
    ) -> list[Message]:
        """Return up to ``limit`` committed messages of ``stream``, in id order.

        Page forward with ``after`` (the last id you got; default 0: from the first
        retained one), or back with ``before`` (the lowest id you have, for
        scroll-back): the retained messages among the ``limit`` ids just below it,
        never an id at or above it. Fewer than ``limit`` then means the page reached
        the first retained id (:meth:`stream_info` names it); a read before that id
        raises :class:`~chatbus.HistoryTruncated` naming it (there is nothing below
        id 1: ``before=1`` returns ``[]``). Not both.

        Args:
            stream: The stream to read.
            after: The cursor: return messages with ids above it.
            limit: Most messages to return (1..10000).
            before: Instead of ``after``: return messages with ids below it.
            epoch: The epoch the cursor belongs to (from :meth:`stream_info` or
                :attr:`Subscriber.epoch`): if the stream's is another one now, raise
                :class:`~chatbus.HistoryReset` rather than return another history.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            ValueError: ``after`` or ``before`` is out of range, both are given, or
                ``limit`` is not in 1..10000.
            CursorAhead: ``after`` is past the head, or ``before`` past head + 1.
            HistoryTruncated: the messages after ``after``, or all those before
                ``before``, were trimmed away (naming the first retained id).
            HistoryReset: ``epoch`` is not the stream's epoch.
            BusClosed: the bus is closed.
            StoreError: the store failed.
            UndecodableMessage: a message cannot be decoded here (those before it
                are returned by the previous page).
        """
        check_stream(stream)
        check_int_range("limit", limit, 1, MAX_READ_LIMIT)
        if epoch is not None:
            check_int_range("epoch", epoch, 0, 2**63 - 1)
        if before is not None:
            if after is not None:
                raise ValueError("pass after or before, not both")
            check_after(before, "before")
            if before < 1:
                raise ValueError(f"before must be >= 1, got {before}")
            return await _lifecycle.read_before(
                self._topics, self._store, stream, before, limit, epoch
            )
        if after is None:
            after = 0
        check_after(after)
        return await _lifecycle.read_after(self._topics, self._store, stream, after, limit, epoch)

    async def stream_info(self, stream: str) -> StreamInfo:
        """Where ``stream`` stands: head, first retained id, epoch.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            BusError: the store has no stream lifecycle.
            StoreError: the store failed.
        """
        check_stream(stream)
        return await _lifecycle.stream_info(self._topics, self._store, stream)

    async def delete_stream(self, stream: str) -> None:
        """Delete ``stream``: its history, idempotency keys and retained events.

        Live subscriptions end with :class:`~chatbus.StreamDeleted`; the next publish
        starts a new epoch at id 1 (a cursor of the old one then fails with
        :class:`~chatbus.HistoryReset` or :class:`~chatbus.CursorAhead`).

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            BusError: the store has no stream lifecycle.
            StoreError: the store failed (part of the history may be gone already:
                call it again).
        """
        check_stream(stream)
        await _lifecycle.delete_stream(
            self._topics, self._store, self._notifier, self._outbox, stream
        )

    async def trim(self, stream: str, before: int) -> int:
        """Drop the messages of ``stream`` with ids below ``before`` (ids are never reused).

        A subscription or read whose cursor falls below the new first id gets
        :class:`~chatbus.HistoryTruncated`, never a jump. The idempotency keys of
        trimmed messages keep answering a retried publish with the original message
        for ``trimmed_keys_for`` seconds from its creation (see :func:`open_bus`).

        Returns:
            The stream's first retained id now.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            ValueError: ``before`` is not an id (an int >= 1).
            BusError: the store has no stream lifecycle.
            StoreError: the store failed.
        """
        check_stream(stream)
        check_after(before)
        if before < 1:
            raise ValueError(f"before must be >= 1, got {before}")
        return await _lifecycle.trim(
            self._topics,
            self._store,
            stream,
            before,
            self._options.trimmed_keys_for,
            self._trimmed,
        )

    async def _trimmed(self, stream: str, first_id: int) -> None:
        """Tell this bus's subscriptions, and (through the notifier) other buses'."""
        await _lifecycle.trimmed(self._router, self._notifier, stream, first_id)

    async def redact(self, stream: str, id: int) -> Message:
        """Replace message ``id``'s body by a tombstone (``body=None``, ``redacted=True``).

        The id, key and created_at stay. Reads return the tombstone; live
        subscriptions opened with ``events=True`` get an event ``{"redacted": id}``
        (keyed ``"chatbus.redacted:<id>"``, so joiners get it too, for an hour).

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            ValueError: ``id`` is not a retained message of ``stream``.
            BusError: the store has no stream lifecycle.
            StoreError: the store failed.
        """
        check_stream(stream)
        check_after(id)
        return await _lifecycle.redact(
            self._topics, self._store, self._notifier, self._router, self.emit, stream, id
        )

    def statistics(self) -> BusStatistics:
        """Return a snapshot of this bus's counters."""
        return BusStatistics(
            streams=len(self._topics.by_name),
            subscribers=len(self._topics.subscriptions),
            publishers=len(self._producers) + len(self._shared),
            notices=self._router.notices,
            resyncs=self._router.resyncs,
            polls=self._polls,
            poll_errors=self._poll_errors,
            events_emitted=self._emitter.emitted,
            events_received=self._router.events_received,
            event_flushes=self._outbox.flushes,
            events_dropped=self._outbox.dropped,
            event_errors=self._outbox.errors,
            retention_sweeps=self._retention_sweeps,
            retention_trims=self._retention_trims,
            retention_errors=self._retention_errors,
        )

    async def aclose(self) -> None:
        """Close the bus (idempotent).

        Open subscriptions end (their iteration stops after what is buffered);
        publishes not yet committed raise :class:`BusClosed`; later calls raise it too.
        """
        self._close()
        await trio.lowlevel.checkpoint()

    def _close(self) -> None:
        if self._topics.closed:
            return
        self._topics.closed = True
        for subscription in list(self._topics.subscriptions):
            subscription._stop()
        for producer in [*self._producers, *self._shared.values()]:
            producer.cancel("bus closed")
        for scope in self._service_scopes:
            scope.cancel()

    def _new_producer(self, topic: Topic, max_batch: int) -> Producer:
        return Producer(
            topic,
            self._store,
            self._notifier,
            max_batch,
            self._options.max_pending,
            on_retire=self._producer_retired,
            events_mark=functools.partial(self._outbox.mark, topic.name),
            append=functools.partial(self._outbox.append, self._store),
        )

    def _producer_retired(self, producer: Producer) -> None:
        if self._shared.get(producer.topic.name) is producer:
            del self._shared[producer.topic.name]
            self._topics.release(producer.topic)

    async def _serve(
        self,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the listener until the bus closes; ready once the notifier is."""
        with trio.CancelScope() as scope:
            self._service_scopes.append(scope)
            await self._notifier.listen(self._router, task_status=task_status)

    async def _flush_events(self) -> None:
        with trio.CancelScope() as scope:
            self._service_scopes.append(scope)
            await self._outbox.run(self._store, self._notifier, self._options.event_retention)

    async def _poll(self, interval: float) -> None:
        with trio.CancelScope() as scope:
            self._service_scopes.append(scope)
            await self._poll_forever(interval)

    async def _retain(self, policy: Retention) -> None:
        """Apply ``policy`` every interval (jittered by up to a tenth, so the buses of
        one cluster drift apart rather than sweeping in step)."""
        with trio.CancelScope() as scope:
            self._service_scopes.append(scope)
            while True:
                await trio.sleep(policy.interval * random.uniform(0.9, 1.0))
                done = await sweep(
                    cast("LifecycleStore", self._store),
                    policy,
                    self._options.trimmed_keys_for,
                    self._trimmed,
                )
                self._retention_sweeps += 1
                self._retention_trims += done.trims
                self._retention_errors += done.errors

    async def _poll_forever(self, interval: float) -> None:
        """Safety net for lost notices: compare stream heads with what we know."""
        while True:
            await trio.sleep(interval)
            topics = self._topics.by_name
            streams = [name for name, topic in topics.items() if topic.subscribers]
            if not streams:
                continue
            self._polls += 1
            try:
                heads = await self._store.heads(streams)
            except Exception:
                self._poll_errors += 1
                continue
            for name, head in heads.items():
                topic = topics.get(name)
                if topic is None:
                    continue
                if head < topic.high_water and topic.head_known:
                    topic.reset()  # the head went back: deleted (a reset notice lost?)
                topic.advance(head)
