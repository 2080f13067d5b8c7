"""Subscriber: one merge task per subscription, delivering exactly once and in order."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, Generic, TypeVar, cast, final

import attrs
import trio

from ._event import RETAINED_EVENTS, Event
from ._exceptions import (
    HistoryReset,
    StoreError,
    StreamDeleted,
    UndecodableMessage,
)
from ._merge import MergeState
from ._message import Message, StreamInfo, check_cursor, check_epoch
from ._protocols import Store
from ._subscriber_events import EventQueue
from ._subscriber_statistics import SubscriberStatistics
from ._tasks import Backoff, shielded_cleanup
from ._topic import Topic, Topics
from ._util import NoPublicConstructor

#: What a subscription yields: :class:`Message`, or ``Message | Event`` with events.
Item = TypeVar("Item", covariant=True)


#: Tries of a subscription's retained-events fetch before it goes on without them
#: (with the merge task's backoff: about five seconds of a store failing).
_RETAINED_ATTEMPTS: Final = 16


@final
@attrs.define(eq=False)
class Subscriber(Generic[Item], metaclass=NoPublicConstructor):
    """A live subscription: iterate it to get each message once, in id order.

    Made by :meth:`chatbus.Bus.open_subscriber` and used as an async context manager.
    ``async for message in subscriber`` yields the stream's messages after the cursor
    it was opened with, then every new one as it commits; the loop ends when the bus
    closes. One merge task per subscription fetches in bounded batches ahead of the
    consumer, so a consumer that stops reading costs a bounded amount of memory and
    slows nobody else.

    Opened with ``events=True`` it also yields the stream's :class:`~chatbus.Event`
    values, each in its place: an unkeyed event with ``after == n`` comes after
    message ``n`` and before message ``n + 1``, or not at all (counted as stale).

    The merge task runs in the bus's nursery, so entering a subscription opens no
    cancel scope in the caller's task: yielding inside ``async with`` (an async
    generator handed to a web framework) is safe.
    """

    _topics: Topics
    _stream: str
    _store: Store
    _after: int
    _read_limit: int
    #: Where the merge task runs (the bus's nursery).
    _nursery: trio.Nursery
    _with_events: bool = False
    #: Most events buffered for the consumer; beyond it the oldest are dropped.
    _event_limit: int = 256
    #: The epoch the caller's cursor belongs to (None: whatever the stream's is now).
    _epoch: int | None = None
    #: Awaited before reading the retained events: this bus's own are flushed.
    _events_flushed: Callable[[], Awaitable[None]] | None = None
    #: Most events a stream retains for joiners (the bus's EventRetention.max_events).
    _retained_limit: int = RETAINED_EVENTS
    _state: MergeState = attrs.field(init=False)
    _topic: Topic | None = attrs.field(default=None, init=False)
    _entered: bool = attrs.field(default=False, init=False)
    #: The merge task's own scope: closing the bus stops the task, not the body.
    _merge_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _merge_done: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: Events not yet received (with ``events=True``); bounded.
    _event_queue: EventQueue = attrs.field(init=False)
    #: The queue's buffer, for the hot checks.
    _events: collections.deque[Event] = attrs.field(init=False)
    #: Fetched, not yet received. The merge task adds a run only while it holds fewer
    #: than ``_read_limit``, so it never holds more than twice that.
    _buffer: collections.deque[Message] = attrs.field(factory=collections.deque, init=False)
    #: Set when the consumer waits for messages / the merge task waits for room.
    _messages_ready: trio.Event | None = attrs.field(default=None, init=False)
    _room_ready: trio.Event | None = attrs.field(default=None, init=False)
    #: The merge task has ended (bus closed, or _error); the consumer drains, then ends.
    _finished: bool = attrs.field(default=False, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _seen_resyncs: int = attrs.field(default=0, init=False)
    #: The topic's ``resyncs`` after the last look at the stream's info, if none came
    #: while it was asked (see _stream_info); else None.
    _looked_at_resyncs: int | None = attrs.field(default=None, init=False)
    _received: int = attrs.field(default=0, init=False)
    _store_errors: int = attrs.field(default=0, init=False)
    _last_id: int = attrs.field(init=False)
    #: The store failed at open: the merge task places an ``after=0`` cursor instead.
    _place_at_start: bool = attrs.field(default=False, init=False)

    def _continue_stream(self) -> None:
        """(Before entering.) This subscription continues a consumer's stream that
        another source fed up to its cursor (``chatbus.sse`` leaving its room's hub),
        so it is no joiner: it fetches no retained events, whose block would land in
        the middle of that stream, out of place, with copies of what came before.
        Live events are taken as usual."""
        assert not self._entered
        self._event_queue.no_retained()

    def __attrs_post_init__(self) -> None:
        # A negative cursor -(n + 1) means "the last n messages": resolved on entry.
        self._state = MergeState(cursor=max(0, self._after))
        self._last_id = max(0, self._after)
        self._event_queue = EventQueue(self._event_limit, self._retained_limit)
        self._events = self._event_queue.buffer

    async def __aenter__(self) -> Subscriber[Item]:
        if self._entered:
            raise RuntimeError("a subscription can be entered only once")
        self._entered = True
        # Register for wake-ups (and events) first; the merge task then reads the store.
        topic = self._topic = self._topics.acquire(self._stream, self)
        if self._with_events:
            topic.event_sinks.add(self)
        self._seen_resyncs = topic.resyncs
        try:
            # The notifier receives this stream's notices before anything is read.
            await self._topics.watch(topic)
            await self._place_cursor(topic)
            await self._nursery.start(self._run)
        except BaseException:
            self._merge_done.set()
            self._release()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        self._wake_consumer()
        self._merge_scope.cancel()
        try:
            with shielded_cleanup():
                await self._merge_done.wait()
        finally:
            self._release()

    def _release(self) -> None:
        assert self._topic is not None
        self._topic.event_sinks.discard(self)
        self._topics.release(self._topic, self)

    @property
    def stream(self) -> str:
        """The stream this subscription follows."""
        return self._stream

    @property
    def epoch(self) -> int | None:
        """The epoch of the history this subscription follows (keep it with the cursor;
        None until known: the store has no epochs, or it was not asked yet)."""
        return self._epoch

    async def _place_cursor(self, topic: Topic) -> None:
        """At open, registered already: put the cursor in the stream's current history,
        or say why it is not there."""
        try:
            info = await self._stream_info()
        except StoreError:
            if self._after != 0 or self._epoch is not None:
                raise  # a cursor to check: the caller must know it could not be
            # From the start, nothing to check: the merge task places it (retrying).
            self._place_at_start = True
            return
        if info is None:  # a store without a lifecycle: no trims, no epochs
            if self._after < 0:
                heads = await self._store.heads([self._stream])
                head = heads.get(self._stream, 0)
                topic.advance(head)
                self._set_cursor(max(0, head - (-self._after - 1)))
            return
        check_epoch(info, self._epoch, self._after)
        self._epoch = info.epoch
        if self._looked_at_resyncs is not None:
            # Checked: events are taken from now on, not only once the merge task
            # has run (until then those emitted right after the open were refused).
            self._seen_resyncs = self._looked_at_resyncs
        topic.advance(info.head)
        if self._after < 0:  # last=n, of what is retained
            self._set_cursor(max(info.first_id - 1, info.head - (-self._after - 1)))
        elif self._after == 0:
            # "From the start" is the start as it stands now: a trim before the first
            # read is then a gap this subscription is told of, not a silent new start.
            self._set_cursor(info.first_id - 1)
        else:
            check_cursor(info, self._after)

    def _set_cursor(self, cursor: int) -> None:
        self._after = self._state.cursor = self._last_id = cursor

    async def _stream_info(self) -> StreamInfo | None:
        ask = getattr(self._store, "stream_info", None)
        if ask is None:
            return None
        topic = self._topic
        resyncs = 0 if topic is None else topic.resyncs
        async with self._topics.read_limiter:
            info: StreamInfo = await ask(self._stream)
        if topic is not None:
            current = topic.resyncs == resyncs
            topic.validate(info, current=current)  # may reset: a resync this look covers
            # Asked after every resync so far: the look covers them all, its own too.
            self._looked_at_resyncs = topic.resyncs if current else None
        return info

    async def _check_epoch(self) -> StreamInfo | None:
        """After a reset or resync: still the same history? Else end with an error."""
        info = await self._stream_info()
        if info is None:
            return None
        if self._place_at_start:  # from the start, as the stream stands now
            self._place_at_start = False
            self._set_cursor(info.first_id - 1)
        if self._epoch is None or self._epoch == 0:
            self._epoch = info.epoch
        elif info.epoch != self._epoch:
            if info.exists and info.reset_by_store:
                # Not a delete: the history may have lost what this subscription saw.
                raise HistoryReset(
                    f"stream {self._stream!r} started a new epoch ({info.epoch}) while this"
                    f" subscription followed it at id {self._last_id}: the store found it"
                    " on another server process (a restart, failover or slot migration)"
                    " and may have lost messages acknowledged before; start again from"
                    " stream_info",
                    self._stream,
                    info.epoch,
                )
            raise StreamDeleted(
                f"stream {self._stream!r} was deleted"
                + (f" and created again (epoch {info.epoch})" if info.exists else "")
                + f" while this subscription followed it at id {self._last_id}",
                self._stream,
                info.epoch,
            )
        return info

    @property
    def cursor(self) -> int:
        """Id of the last message the consumer has received: where to resume from.

        Before the first one, the cursor it opened at (for ``after=0`` or ``last=n``,
        resolved on entry: the id just before the first message it will get).
        Keep it with :attr:`epoch`."""
        return self._last_id

    async def receive(self) -> Item:
        """Return the next message (or event, with ``events=True``), waiting if need be.

        Raises:
            trio.EndOfChannel: the bus was closed (after what was buffered).
            trio.ClosedResourceError: this subscription was closed.
            trio.BusyResourceError: another task is already waiting in ``receive``.
            StoreError: the store broke an invariant (ids not dense).
            UndecodableMessage: the next message cannot be decoded here (the
                ones before it were delivered).
        """
        if (self._buffer or self._events) and not self._closed:
            # Before taking anything: a cancelled receive must leave the item here.
            await trio.lowlevel.checkpoint_if_cancelled()
        item = self._next_item()
        while item is None or self._closed:
            if self._closed or not self._entered:
                raise trio.ClosedResourceError("this subscription is not open")
            if self._finished:
                if self._error is not None:
                    raise self._error
                raise trio.EndOfChannel
            if self._messages_ready is not None:
                raise trio.BusyResourceError(
                    "another task is already waiting on this subscription; "
                    "a subscription has one consumer (open one per task)"
                )
            ready = self._messages_ready = trio.Event()
            try:
                await ready.wait()
            finally:
                if self._messages_ready is ready:  # cancelled: no longer waiting
                    self._messages_ready = None
            item = self._next_item()
        return cast("Item", item)

    def _next_item(self) -> Message | Event | None:
        """Take what the consumer gets next, if it is here: an event due at the cursor
        goes before the next message; an event ahead of it waits for its message."""
        if self._events and (event := self._event_queue.take(self._last_id)) is not None:
            return event
        buffer = self._buffer
        if not buffer:
            return None
        message = buffer.popleft()
        if self._room_ready is not None and len(buffer) < self._read_limit:
            self._room_ready.set()
            self._room_ready = None
        self._received += 1
        self._last_id = message.id
        return message

    def push_events(self, events: list[Event], *, retained: bool = False) -> None:
        """(Called by the topic, never blocking.) Buffer events for the consumer
        (see :meth:`EventQueue.push`)."""
        if self._closed:
            return
        if self._in_doubt():
            self._event_queue.refuse(events)
            return
        self._event_queue.push(events, self._last_id, retained=retained)
        self._wake_consumer()

    def push_emitted(self, event: Event) -> None:
        """(Called by the topic, never blocking.) Buffer an event this bus has just
        emitted (see :meth:`EventQueue.push_emitted`)."""
        if self._closed:
            return
        if self._in_doubt():
            self._event_queue.refuse((event,))
            return
        self._event_queue.push_emitted(event, self._last_id)
        if self._messages_ready is not None:
            self._wake_consumer()

    def _in_doubt(self) -> bool:
        """Whether events are refused now: the stream's history was reset or notices
        lost, and the epoch not checked since (the events may be of a new history),
        or the merge task ended (a deleted stream's new history goes on)."""
        topic = self._topic
        return self._finished or (topic is not None and topic.resyncs != self._seen_resyncs)

    def __aiter__(self) -> Subscriber[Item]:
        return self

    async def __anext__(self) -> Item:
        if (self._buffer or self._events) and not self._closed:
            # receive()'s first step, without its frame: what is here already.
            await trio.lowlevel.checkpoint_if_cancelled()
            # _next_item's first step, inline: once per event.
            if self._events and (event := self._event_queue.take(self._last_id)) is not None:
                return cast("Item", event)
            item = self._next_item()
            if item is not None:
                return cast("Item", item)
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def statistics(self) -> SubscriberStatistics:
        """Return a snapshot of this subscription's counters."""
        state = self._state
        return SubscriberStatistics(
            stream=self._stream,
            cursor=self._last_id,
            fetched=state.cursor,
            high_water=0 if self._topic is None else self._topic.high_water,
            delivered=self._received,
            buffered=len(self._buffer),
            duplicates_skipped=state.duplicates_skipped,
            gaps=state.gaps,
            rescans=state.rescans,
            store_reads=state.store_reads,
            cache_hits=state.cache_hits,
            store_errors=self._store_errors,
            events_delivered=self._event_queue.delivered,
            events_stale=self._event_queue.stale,
            events_dropped=self._event_queue.dropped,
            events_refused=self._event_queue.refused,
            events_buffered=len(self._events),
        )

    def _stop(self) -> None:
        """End the merge task: the consumer drains what is buffered, then the loop ends."""
        self._merge_scope.cancel()

    def _wake_consumer(self) -> None:
        if self._messages_ready is not None:
            self._messages_ready.set()
            self._messages_ready = None

    async def _deliver(self, run: list[Message]) -> None:
        while len(self._buffer) >= self._read_limit:
            self._room_ready = trio.Event()
            await self._room_ready.wait()
        self._buffer.extend(run)
        self._wake_consumer()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._merge_scope:
                task_status.started()
                try:
                    await self._merge()
                except Exception as exc:
                    self._error = exc
                finally:
                    self._finished = True
                    self._wake_consumer()
        finally:
            self._merge_done.set()

    async def _merge(self) -> None:
        assert self._topic is not None
        topic, state, cache, limit = self._topic, self._state, self._topic.cache, self._read_limit
        backoff = Backoff()
        if self._epoch is None:
            await self._check_epoch_retrying(backoff)
        while True:
            # Take the event before looking, so a wake-up after the look is not lost.
            changed = topic.changed
            if topic.resyncs != self._seen_resyncs:
                # Seen only once checked: until then (and for good if the check ends
                # this subscription) events are refused, maybe of a new history.
                resyncs = topic.resyncs
                await self._check_epoch_retrying(backoff)
                self._seen_resyncs = resyncs
                state.request_rescan()
            if self._with_events and not self._event_queue.retained_fetched:
                # Before any message: a message handed on first could pass live events
                # held for the retained ones, or come before an emitter's retained
                # event whose later ones were then shown (it would arrive late).
                await self._fetch_retained_events(backoff)
                continue
            cursor = state.cursor
            run: list[Message] | None = state.from_cache(cache, limit)
            if not run and state.wants_store(topic.high_water):
                if topic.appending and not state.rescan and cache.top <= state.cursor:
                    # Nothing missing below what the cache holds, and a local append
                    # is in flight: the news is most likely its own, and its commit
                    # will wake us with a fuller cache. A hole found then is read.
                    await changed.wait()
                    continue
                run = await self._read(topic, backoff)
                if run is None:
                    continue
                if not run and topic.high_water > state.cursor:
                    # Told of ids the store does not show: a lagging replica or a
                    # notice racing its commit (retry until it catches up), or a trim
                    # that took every message after the cursor (say so, at once).
                    info = await self._check_epoch_retrying(backoff)
                    if info is not None:
                        state.check_first(self._stream, info.first_id)
                    await backoff.sleep()
                    continue
            if run and topic.resyncs != self._seen_resyncs:
                # The history was reset while the run was gathered (a store reading its
                # epoch before a Redis reset, the cache filled after it): check the
                # epoch first, then gather again from the same cursor.
                state.cursor = cursor
                state.delivered -= len(run)
                continue
            if run:
                backoff.reset()
                if self._epoch == 0:  # the stream did not exist at open; it does now
                    await self._check_epoch_retrying(backoff)
                await self._deliver(run)
            else:
                await changed.wait()

    async def _check_epoch_retrying(self, backoff: Backoff) -> StreamInfo | None:
        while True:
            try:
                return await self._check_epoch()
            except StoreError:
                self._store_errors += 1
                await backoff.sleep()

    async def _fetch_retained_events(self, backoff: Backoff) -> None:
        """Hand the consumer what the stream retained for joiners at its head (as this
        bus knows it), before any message: those positioned ahead of the consumer
        wait in the buffer for their message.

        Live events that arrived meanwhile are already buffered; copies are dropped.
        """
        retained = getattr(self._store, "retained_events", None)
        if retained is None:
            self._event_queue.no_retained()  # nothing retained: nothing to tell apart
            self._wake_consumer()
            return
        for attempt in range(_RETAINED_ATTEMPTS):
            try:
                if self._events_flushed is not None:
                    await self._events_flushed()  # this bus's own emits are retained too
                async with self._topics.read_limiter:
                    topic = self._topic
                    head = max(self._state.cursor, 0 if topic is None else topic.high_water)
                    events = await retained(self._stream, head)
                break
            except StoreError:
                self._store_errors += 1
                if attempt == _RETAINED_ATTEMPTS - 1:
                    # Best effort: events are hints for the eye, messages are not, and
                    # they wait for this.
                    events = []
                    break
                await backoff.sleep()  # a store down a moment: the joiner's state
        if self._in_doubt():
            return  # maybe of a new history: the merge checks first, then asks again
        self._event_queue.retained_fetched = True
        self.push_events(events, retained=True)

    async def _read(self, topic: Topic, backoff: Backoff) -> list[Message] | None:
        """Read the store after the cursor; None means "look again".

        Subscriptions at the same cursor share one read: the others wait for it and
        then find its page in the cache. After a failed read, this sleeps first.
        """
        state = self._state
        cursor = state.cursor
        shared = topic.reads.get(cursor)
        if shared is not None:
            await shared.wait()
            return None
        done = topic.reads[cursor] = trio.Event()
        state.begin_read(topic.high_water)
        generation = topic.cache.generation
        read_with_epoch = getattr(self._store, "read_with_epoch", None)
        epoch: int | None = None
        try:
            async with self._topics.read_limiter:
                if read_with_epoch is not None:
                    epoch, page = await read_with_epoch(self._stream, cursor, self._read_limit)
                else:
                    page = await self._store.read(self._stream, cursor, self._read_limit)
        except UndecodableMessage:
            raise  # no retry can help: the consumer learns which message it is
        except StoreError:
            self._store_errors += 1
            await backoff.sleep()
            return None
        finally:
            del topic.reads[cursor]
            done.set()
        if epoch is not None and page:
            if not self._epoch:
                # The stream did not exist at open (or was not asked): the history
                # this page is of is the one followed from now on.
                self._epoch = epoch
            elif epoch != self._epoch:
                # Another history (a restart or failover's new epoch, a delete): its
                # notice is on its way; say so now (HistoryReset, StreamDeleted).
                await self._check_epoch_retrying(backoff)
                await backoff.sleep()  # the same epoch after all: look again, paced
                return None
            # Not for the other subscriptions if another history's (the generation
            # moves then: the page is not cached).
            topic.met_epoch(epoch)
        topic.cache.put(page, generation)  # not if the history changed meanwhile
        return state.take(page, self._read_limit)
