"""Publisher: one producer task per publisher, group-committing what is waiting."""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, final

import attrs
import trio

from ._event import Event, EventDraft
from ._exceptions import (
    BusClosed,
    BusError,
    IdempotencyConflict,
    OutcomeUnknown,
    StoreError,
    store_error,
)
from ._message import Draft, Message, encode_body, make_draft
from ._protocols import Notifier, Store
from ._tasks import ServiceNursery
from ._topic import Topic
from ._util import NoPublicConstructor

#: How long closing a publisher waits for its queued messages to commit.
_DRAIN_SECONDS: Final = 10.0


class _Phase(enum.Enum):
    QUEUED = enum.auto()
    ABANDONED = enum.auto()  # the caller was cancelled before the producer took it
    TAKEN = enum.auto()


@final
class _Request:
    """One publish call, from the caller's queueing to its outcome.

    The caller parks its own task (``wait_task_rescheduled``) and the producer
    reschedules it directly: no Event or parking lot per message, and exactly one
    trip through the scheduler per publish.
    """

    __slots__ = ("_waiter", "draft", "error", "events_mark", "finished", "message", "phase")

    def __init__(self, draft: Draft, events_mark: int) -> None:
        self.draft = draft
        #: The bus's events on this stream emitted before this publish (see Outbox.mark).
        self.events_mark = events_mark
        self.phase = _Phase.QUEUED
        self.message: Message | None = None
        self.error: BusError | None = None
        #: The outcome (message or error) is in.
        self.finished = False
        #: The caller's task while it is parked waiting for the outcome.
        self._waiter: trio.lowlevel.Task | None = None

    def resolve(self, message: Message) -> None:
        self.message = message
        self._finish()

    def fail(self, error: BusError) -> None:
        if not self.finished:
            self.error = error
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        if (task := self._waiter) is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Park until the outcome is in; a cancelled wait abandons a queued request."""
        if self.finished:
            # The outcome came in while the caller was blocked sending (it has been
            # through the scheduler then): only honour a cancellation.
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        self._waiter = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._waiter = None
            if self.phase is _Phase.QUEUED:
                self.phase = _Phase.ABANDONED
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


@attrs.frozen(kw_only=True)
class PublisherStatistics:
    """A snapshot of one publisher's producer.

    Attributes:
        stream: The stream published to.
        published: Messages confirmed to callers (including idempotent repeats).
        batches: Store appends made (one per group commit).
        mean_batch_size: ``published / batches`` (0.0 before the first batch).
        largest_batch: The biggest group commit so far.
        queued: Publish requests waiting for the producer now.
        failed: Publish requests that raised.
        notify_errors: Committed batches whose notice could not be sent (their
            publishes still succeeded; the bus's poll finds them).
    """

    stream: str
    published: int
    batches: int
    mean_batch_size: float
    largest_batch: int
    queued: int
    failed: int
    notify_errors: int


@final
@attrs.define(eq=False)
class Producer:
    """The task that turns waiting publish requests into group-committed appends."""

    topic: Topic
    store: Store
    notifier: Notifier
    max_batch: int
    max_pending: int
    #: Called once when the producer stops taking requests.
    on_retire: Callable[[Producer], None]
    #: The mark of the bus's events on this stream emitted so far (Outbox.mark) ...
    events_mark: Callable[[], int]
    #: ... and the append that goes after them (Outbox.append: stream, drafts, mark,
    #: and what to call just before the store is).
    append: Callable[[str, list[Draft], int, Callable[[], object]], Awaitable[list[Message]]]
    _send: trio.MemorySendChannel[_Request] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[_Request] = attrs.field(init=False)
    _cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    closed_because: str | None = attrs.field(default=None, init=False)
    published: int = attrs.field(default=0, init=False)
    batches: int = attrs.field(default=0, init=False)
    largest_batch: int = attrs.field(default=0, init=False)
    failed: int = attrs.field(default=0, init=False)
    #: Set once the producer has stopped and failed whatever it had not committed.
    finished: trio.Event = attrs.field(factory=trio.Event, init=False)
    notify_errors: int = attrs.field(default=0, init=False)
    #: Whether to call ``notifier.notify`` after each commit: not for a notifier whose
    #: store notifies inside the append transaction (``notifies_at_commit``), whose
    #: notify is a bare checkpoint (a trip through the scheduler per batch).
    _notify_after_commit: bool = attrs.field(default=True, init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[_Request](self.max_pending)
        self._notify_after_commit = getattr(self.notifier, "notifies_at_commit", False) is not True

    async def submit(self, draft: Draft) -> Message:
        """Queue ``draft`` and wait until it is committed.

        Raises:
            BusClosed: the producer stopped before the draft was committed.
            StoreError: the store failed; nothing of this batch was stored.
        """
        # A cancel point before queueing (a cancelled caller stores nothing); the
        # wait below is the schedule point. No extra trip through the scheduler
        # while the channel has room.
        await trio.lowlevel.checkpoint_if_cancelled()
        request = _Request(draft, self.events_mark())
        try:
            try:
                self._send.send_nowait(request)
            except trio.WouldBlock:
                await self._send.send(request)  # full: back-pressure, cancellable
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise BusClosed(self._closed_message()) from None
        await request.wait()
        if request.error is not None:
            self.failed += 1
            raise request.error
        assert request.message is not None
        return request.message

    def stop_accepting(self, reason: str) -> None:
        """Refuse new requests; the producer still commits the ones already queued."""
        if self.closed_because is None:
            self.closed_because = reason
        self._send.close()

    def cancel(self, reason: str) -> None:
        """Stop now: requests not yet committed fail with :class:`BusClosed`."""
        self.stop_accepting(reason)
        self._cancel_scope.cancel()

    def statistics(self) -> PublisherStatistics:
        """Return a snapshot of this producer's counters."""
        return PublisherStatistics(
            stream=self.topic.name,
            published=self.published,
            batches=self.batches,
            mean_batch_size=self.published / self.batches if self.batches else 0.0,
            largest_batch=self.largest_batch,
            queued=self._receive.statistics().current_buffer_used,
            failed=self.failed,
            notify_errors=self.notify_errors,
        )

    def _closed_message(self) -> str:
        return f"publisher for stream {self.topic.name!r} is closed ({self.closed_because})"

    async def run(
        self,
        *,
        idle_timeout: float = math.inf,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Commit batches until the channel ends, the task is cancelled or it idles out."""
        batch: list[_Request] = []
        with self._cancel_scope:
            task_status.started()
            try:
                while True:
                    try:
                        if math.isinf(idle_timeout):
                            batch.append(await self._receive.receive())
                        else:
                            with trio.move_on_after(idle_timeout):
                                batch.append(await self._receive.receive())
                    except trio.EndOfChannel:
                        return
                    if not batch:
                        # Idle: retire. No await between the timeout and closing, so no
                        # request can slip in unseen; later senders get BusClosed.
                        self.closed_because = "idle"
                        return
                    while len(batch) < self.max_batch:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await self._commit(batch)
                    batch = []
            finally:
                self._retire(batch)

    def _retire(self, in_flight: list[_Request]) -> None:
        if self.closed_because is None:
            self.closed_because = "cancelled"
        leftovers = list(in_flight)
        while True:
            try:
                leftovers.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        # No await since the drain: nothing can slip in before senders see the close.
        self._receive.close()
        for request in leftovers:
            maybe = ". It may have been committed." if request.phase is _Phase.TAKEN else "."
            request.fail(BusClosed(self._closed_message() + maybe))
        self.finished.set()
        self.on_retire(self)

    async def _commit(self, batch: list[_Request]) -> None:
        live: list[_Request] = []
        drafts: list[Draft] = []
        mark = 0
        queued, taken = _Phase.QUEUED, _Phase.TAKEN
        for request in batch:  # one pass: this runs once per batch of up to max_batch
            if request.phase is queued:
                request.phase = taken
                live.append(request)
                drafts.append(request.draft)
                if request.events_mark > mark:
                    mark = request.events_mark
        if not live:
            return
        stream = self.topic.name
        self.topic.appending += 1
        try:
            generation = self.topic.cache.generation

            def sending() -> None:  # after any wait for events: as the append goes
                nonlocal generation
                generation = self.topic.cache.generation

            messages = await self.append(stream, drafts, mark, sending)
            if len(messages) != len(live):
                raise StoreError(f"store returned {len(messages)} messages for {len(live)} drafts")
        except BaseException as exc:
            self.topic.append_failed()
            if not isinstance(exc, Exception):
                raise  # cancelled: _retire fails the requests
            for request in live:
                request.fail(_own_copy(exc, stream))
            return
        finally:
            self.topic.appending -= 1
        # The bus's cache (what subscriptions receive) takes only what this batch
        # stored: a replay or a conflict's original is the caller's answer, not the
        # stored message (replay=True, or a body that could not be read back).
        stored = [message for message in messages if not message.replay]
        epoch = getattr(messages, "epoch", None)  # see chatbus._message.Appended
        last_id = self.topic.committed(stored, generation, epoch) if stored else 0
        for request, message in zip(live, messages, strict=True):
            if message.replay and (conflict := _conflict(request.draft, message)) is not None:
                request.fail(conflict)
            else:
                request.resolve(message)
        self.batches += 1
        self.published += len(live)
        self.largest_batch = max(self.largest_batch, len(live))
        if not self._notify_after_commit or not stored:
            return  # the loop's next receive is the checkpoint
        try:
            await self.notifier.notify(stream, last_id)
        except Exception:
            # Committed is committed: a lost hint costs latency (the bus's poll
            # finds it), never content, so the publish still succeeds.
            self.notify_errors += 1


def _own_copy(exc: Exception, stream: str) -> BusError:
    """The error one caller of a failed batch sees: the store's, worded once.

    Each caller raises its own object (one exception raised in many tasks would
    share, and tangle, its traceback), chained from the same cause. The store's own
    errors keep their class (:class:`StoreError`, :class:`OutcomeUnknown`).
    """
    if isinstance(exc, StoreError | OutcomeUnknown) and type(exc).__init__ is BusError.__init__:
        error = type(exc)(*exc.args)
        error.__cause__ = exc.__cause__
        return error
    return store_error("append", exc, stream=stream)


def _conflict(draft: Draft, message: Message) -> IdempotencyConflict | None:
    """A replay whose body differs from the draft's: the key was reused for another message.

    A redacted original has no body left to compare: the retry gets its tombstone, as
    a replay (its id is what a client that saw the message knows it by).
    """
    if not message.replay or message.redacted or encode_body(message.body) == draft.body_json:
        return None
    return IdempotencyConflict(
        f"key {message.key!r} was used in stream {message.stream!r} for message"
        f" {message.id} with a different body; nothing new was stored",
        original=message,
    )


@final
@attrs.define(eq=False)
class Publisher(metaclass=NoPublicConstructor):
    """Publishes to one stream through its own producer task.

    Made by :meth:`chatbus.Bus.open_publisher` and used as an async context manager.
    Concurrent :meth:`publish` calls are group-committed: whatever is waiting when the
    producer is free goes into one store append, up to the batch limit.
    """

    _stream: str
    _max_body_bytes: int
    _start: Callable[[], Producer]
    _stop: Callable[[Producer], None]
    #: The bus's Emitter.emit_or_draft and emit_at_head (see emit).
    _emit_or_draft: Callable[[str, object, str | None, float | None], Event | EventDraft]
    _emit_at_head: Callable[[str, object, EventDraft], Awaitable[Event]]
    _producer: Producer | None = attrs.field(default=None, init=False)
    _service: ServiceNursery | None = attrs.field(default=None, init=False)

    async def __aenter__(self) -> Publisher:
        if self._service is not None:
            raise RuntimeError("a publisher can be entered only once")
        producer = self._producer = self._start()
        service = self._service = ServiceNursery()
        try:
            nursery = await service.__aenter__()
        except BaseException:
            self._stop(producer)
            raise
        try:
            await nursery.start(producer.run)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._service is not None
        assert self._producer is not None
        producer = self._producer
        try:
            producer.stop_accepting("publisher closed")
            with trio.move_on_after(_DRAIN_SECONDS, shield=True):
                await producer.finished.wait()
            return await self._service.__aexit__(exc_type, exc, tb)
        finally:
            self._stop(producer)

    @property
    def stream(self) -> str:
        """The stream this publisher appends to."""
        return self._stream

    async def publish(self, body: object, *, key: str | None = None) -> Message:
        """Append one message and return it once it is committed.

        Args:
            body: Any JSON-serialisable value.
            key: An idempotency key. Publishing again with a key already used in this
                stream stores nothing new and returns the original message, so a
                retry after an error or a lost reply is safe.

        Returns:
            The committed message, with its id.

        Raises:
            InvalidMessage: ``body`` is not JSON-serialisable or ``key`` is not valid.
            MessageTooLarge: ``body`` encodes to more than the bus's ``max_body_bytes``.
            BusClosed: the publisher or bus closed first. If the message says it may
                have been committed, retry with the same key to find out.
            StoreError: the store failed; nothing of this message was stored.
        """
        draft = make_draft(body, key, max_body_bytes=self._max_body_bytes)
        return await self._entered().submit(draft)

    async def emit(
        self, body: object, *, key: str | None = None, ttl: float | None = None
    ) -> Event:
        """Emit an ephemeral event on this publisher's stream; see :meth:`chatbus.Bus.emit`.

        Its ``after`` counts this publisher's own commits at once: an event emitted
        right after ``await publish(...)`` returned comes after that message.
        """
        if self._producer is None:
            self._entered()  # raises
        # See Emitter.emit_or_draft: one coroutine per event, this one.
        await trio.lowlevel.checkpoint_if_cancelled()
        event = self._emit_or_draft(self._stream, body, key, ttl)
        if isinstance(event, EventDraft):
            return await self._emit_at_head(self._stream, body, event)
        return event

    def statistics(self) -> PublisherStatistics:
        """Return a snapshot of this publisher's counters."""
        return self._entered().statistics()

    def _entered(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("use the publisher as `async with bus.open_publisher(...)`")
        return self._producer
