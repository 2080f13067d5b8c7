"""Subscriber: one merge task per subscription, delivering exactly once and in order."""

from __future__ import annotations

import collections
from typing import final

import attrs
import trio

from ._exceptions import StoreError
from ._merge import MergeState
from ._message import Message
from ._protocols import Store
from ._tasks import Backoff
from ._topic import Topic


@attrs.frozen(kw_only=True)
class SubscriberStatistics:
    """A snapshot of one subscription.

    Attributes:
        stream: The stream subscribed to.
        cursor: Id of the last message the consumer received.
        fetched: Id of the last message fetched for the consumer (>= cursor).
        high_water: Highest id the bus knows to be committed in the stream.
        delivered: Messages the consumer has received.
        buffered: Messages fetched but not yet received by the consumer (bounded).
        duplicates_skipped: Messages dropped because their id was at or below the cursor.
        gaps: Store reads forced by an id known to exist but missing from the cache.
        rescans: Full rescans from the cursor requested by a notifier resync.
        store_reads: Reads from the store (start-up, gaps, rescans, retries).
        cache_hits: Messages served from the bus's durable cache.
        store_errors: Failed store reads (each retried with backoff).
    """

    stream: str
    cursor: int
    fetched: int
    high_water: int
    delivered: int
    buffered: int
    duplicates_skipped: int
    gaps: int
    rescans: int
    store_reads: int
    cache_hits: int
    store_errors: int


@final
@attrs.define(eq=False)
class Subscriber:
    """A live subscription: iterate it to get each message once, in id order.

    Made by :meth:`chatbus.Bus.open_subscriber`. ``async for message in subscriber``
    yields the stream's messages after the cursor it was opened with, then every new
    one as it commits; the loop ends when the bus closes. Messages are fetched in
    bounded batches ahead of the consumer, so a consumer that stops reading costs a
    bounded amount of memory and slows nobody else.
    """

    _topic: Topic
    _store: Store
    _state: MergeState
    _read_limit: int
    _send: trio.MemorySendChannel[list[Message]] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[list[Message]] = attrs.field(init=False)
    _pending: collections.deque[Message] = attrs.field(factory=collections.deque, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _seen_resyncs: int = attrs.field(init=False)
    _received: int = attrs.field(default=0, init=False)
    _store_errors: int = attrs.field(default=0, init=False)
    _last_id: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # One batch in the channel plus one in the merge task's hands: bounded.
        self._send, self._receive = trio.open_memory_channel[list[Message]](1)
        self._seen_resyncs = self._topic.resyncs
        self._last_id = self._state.cursor

    @property
    def stream(self) -> str:
        """The stream this subscription follows."""
        return self._topic.name

    @property
    def cursor(self) -> int:
        """Id of the last message the consumer has received: where to resume from."""
        return self._last_id

    async def receive(self) -> Message:
        """Return the next message, waiting for it if need be.

        Raises:
            trio.EndOfChannel: the bus was closed.
            trio.ClosedResourceError: this subscription was closed.
            StoreError: the store broke an invariant (ids not dense).
        """
        if self._pending:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            try:
                batch = await self._receive.receive()
            except trio.EndOfChannel:
                if self._error is not None:
                    raise self._error from None
                raise
            self._pending.extend(batch)
        message = self._pending.popleft()
        self._received += 1
        self._last_id = message.id
        return message

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def statistics(self) -> SubscriberStatistics:
        """Return a snapshot of this subscription's counters."""
        state = self._state
        return SubscriberStatistics(
            stream=self._topic.name,
            cursor=self._last_id,
            fetched=state.cursor,
            high_water=self._topic.high_water,
            delivered=self._received,
            buffered=state.delivered - self._received,
            duplicates_skipped=state.duplicates_skipped,
            gaps=state.gaps,
            rescans=state.rescans,
            store_reads=state.store_reads,
            cache_hits=state.cache_hits,
            store_errors=self._store_errors,
        )

    def _stop(self) -> None:
        """End the merge task: the consumer drains what is buffered, then the loop ends."""
        self._cancel_scope.cancel()

    def _close(self) -> None:
        self._stop()
        self._receive.close()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._cancel_scope:
            task_status.started()
            try:
                await self._merge()
            except Exception as exc:
                self._error = exc
            finally:
                self._send.close()

    async def _merge(self) -> None:
        topic, state, cache, limit = self._topic, self._state, self._topic.cache, self._read_limit
        backoff = Backoff()
        while True:
            # Take the event before looking, so a wake-up after the look is not lost.
            changed = topic.changed
            if topic.resyncs != self._seen_resyncs:
                self._seen_resyncs = topic.resyncs
                state.request_rescan()
            run: list[Message] | None = state.from_cache(cache, limit)
            if not run and state.wants_store(topic.high_water):
                run = await self._read(backoff)
                if run is None:
                    continue
                if not run and topic.high_water > state.cursor:
                    # Told of ids the store does not show yet (a lagging replica,
                    # a notice racing its commit): retry until it catches up.
                    await backoff.sleep()
                    continue
            if run:
                backoff.reset()
                await self._send.send(run)
            else:
                await changed.wait()

    async def _read(self, backoff: Backoff) -> list[Message] | None:
        """Read the store after the cursor; None after a failed read (already slept)."""
        state = self._state
        state.begin_read(self._topic.high_water)
        try:
            page = await self._store.read(self._topic.name, state.cursor, self._read_limit)
        except StoreError:
            self._store_errors += 1
            await backoff.sleep()
            return None
        self._topic.cache.put(page)
        return state.take(page, self._read_limit)
