"""The bus's outbox of emitted events: bounded, never waited on, flushed in batches.

Owns: what happens to an event between :meth:`chatbus.Bus.emit` returning and the
store (retention for joiners) and the notifier (other processes) having it, and the
rule that a publish goes out after the events its bus emitted on its stream before
it. One flush carries everything waiting, so events that arrive together cost one
store round trip and one notification (Postgres: NOTIFY takes a cluster-wide lock at
commit; one per event would throttle every writer). A store that can carry events in
an append's own transaction (``append_carrying``) gets a stream's waiting events with
that stream's next append instead: no second transaction, and the publish waits for
no flush. Imports :mod:`chatbus._event`, :mod:`chatbus._message` and
:mod:`chatbus._protocols`.
"""

from __future__ import annotations

import collections
import functools
import operator
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, final

import attrs
import trio

from ._event import EncodedEvents, Event, Outgoing
from ._message import Draft, Message
from ._options import EventRetention
from ._protocols import Store

#: Most events in one flush: bounds the statement, and how long encoding it keeps the
#: loop, when the store fell behind a burst.
_MAX_FLUSH: Final = 4000
#: A stream's events wait this long (seconds) after a publish to the stream was
#: called, or an append of it ended, before a flush takes them: that publish's
#: append (or a busy publisher's next one) is about to go and carries them (see
#: Outbox.append). Only with a store that carries events.
_LINGER: Final = 0.005

_EVENT: Final = operator.itemgetter(1)

#: ``store.append_carrying(stream, drafts, events, encoded)``: see Outbox.append.
Carry = Callable[[str, Sequence[Draft], Sequence[Event], Sequence[str]], Awaitable[list[Message]]]


@final
@attrs.define(eq=False)
class Outbox:
    """Events waiting to be flushed; the oldest are dropped past ``capacity``.

    Events of one stream leave in emit order: a flush and an append carrying a
    stream's events never run at once for that stream (``_busy``), each takes the
    oldest of its waiting events, and a flush leaves alone the events of a stream
    an append is about to carry.
    """

    capacity: int
    #: In put order.
    _waiting: collections.deque[Outgoing] = attrs.field(init=False)
    _ready: trio.Event = attrs.field(factory=trio.Event, init=False)
    flushes: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)
    errors: int = attrs.field(default=0, init=False)
    #: Events put so far.
    _put: int = attrs.field(default=0, init=False)
    #: Per stream, the numbers of its events not flushed (nor dropped) yet, waiting or
    #: in flight, in order: what a publish to that stream waits for. Bounded by
    #: ``capacity`` plus one flush.
    _pending: dict[str, collections.deque[int]] = attrs.field(factory=dict, init=False)
    #: Streams whose events a flush or a carrying append has in flight now.
    _busy: dict[str, int] = attrs.field(factory=dict, init=False)
    #: Streams with an append under way (its events are left for it), and when a
    #: publish to a stream was last called or an append of it ended (see _LINGER).
    _appending: dict[str, int] = attrs.field(factory=dict, init=False)
    _expected_at: dict[str, float] = attrs.field(factory=dict, init=False)
    _progress: trio.Event = attrs.field(factory=trio.Event, init=False)
    _running: bool = attrs.field(default=False, init=False)
    _carry: Carry | None = attrs.field(default=None, init=False)
    #: The scope the flusher waits in for ``_ready`` (None while it flushes): its
    #: deadline is when it looks again for events left lingering.
    _timer: trio.CancelScope | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._waiting = collections.deque()

    def put(self, event: Event, body_json: str, micros: int, size: int) -> None:
        """Queue ``event`` (never blocks): its body's JSON text, ``created_at`` in µs
        and encoded size, from which a flush encodes it if its store needs the text
        (see EncodedEvents)."""
        waiting = self._waiting
        if len(waiting) >= self.capacity:
            number, old = waiting.popleft()[:2]
            self.dropped += 1
            pending = self._pending[old.stream]
            front = pending[0] == number
            pending.remove(number)
            if not pending:
                del self._pending[old.stream]
            if front:
                self._advance()
        number = self._put = self._put + 1
        waiting.append((number, event, body_json, micros, size))
        stream = event.stream
        queued = self._pending.get(stream)
        if queued is None:
            self._pending[stream] = queued = collections.deque()
        queued.append(number)
        if self._carry is None or not self._left_for_append(stream):
            self._ready.set()

    def _left_for_append(self, stream: str) -> bool:
        """Whether a new event of ``stream`` needs no wake-up of the flusher: an append
        of the stream is under way (its end wakes the flusher if it left any), or
        coming (the flusher's timer is set for the end of its linger). The flusher,
        woken per event, would only find the stream lingering: at 2,000 events/s on
        streams being published to, that cost more than the events themselves."""
        timer = self._timer
        if timer is None:  # flushing: it looks again when done only if told to
            return False
        if stream in self._appending:
            return True
        expected = self._expected_at.get(stream)
        if expected is None:
            return False
        at = expected + _LINGER
        if at <= trio.current_time():
            return False
        if timer.deadline > at:
            timer.deadline = at
        return True

    def mark(self, stream: str) -> int:
        """Where the events put so far for ``stream`` end (0: all flushed already).

        Called when a publish is: its append is coming, so a flush leaves the
        stream's events to it for a moment (see _LINGER).
        """
        if self._carry is not None:
            self._expect(stream)
        pending = self._pending.get(stream)
        return pending[-1] if pending else 0

    def _expect(self, stream: str) -> None:
        """An append of ``stream`` is coming (see _LINGER). Entries expire; pruned here
        too, so a bus publishing to many streams and emitting none keeps few."""
        expected = self._expected_at
        now = trio.current_time()
        if len(expected) >= 1024 and stream not in expected:
            for name, at in list(expected.items()):
                if now - at >= _LINGER:
                    del expected[name]
        expected[stream] = now

    def _flushed_upto(self, stream: str, mark: int) -> bool:
        pending = self._pending.get(stream)
        return not pending or pending[0] > mark

    async def flushed(self, stream: str | None = None) -> None:
        """Wait until the events put so far for ``stream`` (None: for every stream) are
        flushed (or given up on). Returns at once, without a checkpoint, when they are."""
        if stream is not None:
            pending = self._pending.get(stream)
            mark = pending[-1] if pending else 0
            while self._running and not self._flushed_upto(stream, mark):
                await self._progress.wait()
            return
        target = self._put
        while self._running and any(p[0] <= target for p in self._pending.values()):
            await self._progress.wait()

    async def append(
        self,
        store: Store,
        stream: str,
        drafts: Sequence[Draft],
        mark: int,
        sending: Callable[[], object],
    ) -> list[Message]:
        """``store.append(stream, drafts)``, after this bus's events on ``stream`` up to
        ``mark`` (see :meth:`mark`, taken when the publish was called); ``sending()``
        is called just before the store is.

        So the events a bus emitted on a stream before a publish reach other
        processes before its message (notifications arrive in commit order). With a
        store that can, the stream's waiting events go in the append's own
        transaction, ahead of its notice (``store.append_carrying``); else, or when
        some are in a flush already, the append waits until they are flushed. It
        waits for nothing when they are: not for another stream's events, nor for
        those emitted after the publish was called.
        """
        appending = self._appending
        appending[stream] = appending.get(stream, 0) + 1
        try:
            while True:
                carry = self._carry
                if carry is not None and not self._busy.get(stream):
                    taken = self._take(stream)
                    if taken:
                        sending()
                        return await self._append_carrying(carry, stream, drafts, taken)
                    break  # none waiting nor in flight
                if not self._running or self._flushed_upto(stream, mark):
                    break
                await self._progress.wait()
            sending()
            return await store.append(stream, drafts)
        finally:
            appending[stream] -= 1
            if not appending[stream]:
                del appending[stream]
                if self._carry is not None:
                    self._expect(stream)
                if stream in self._pending and (
                    self._carry is None or not self._left_for_append(stream)
                ):
                    self._ready.set()  # the flusher takes what this append left

    def _take(self, stream: str) -> list[Outgoing]:
        """Remove and return the waiting events of ``stream`` (none of it is in flight)."""
        pending = self._pending.get(stream)
        if not pending:
            return []
        waiting = self._waiting
        if len(pending) == len(waiting):
            taken = list(waiting)
            waiting.clear()
            return taken
        taken, kept = [], collections.deque[Outgoing]()
        for item in waiting:
            (taken if item[1].stream == stream else kept).append(item)
        self._waiting = kept
        return taken

    async def _append_carrying(
        self,
        carry: Carry,
        stream: str,
        drafts: Sequence[Draft],
        taken: list[Outgoing],
    ) -> list[Message]:
        self._busy[stream] = self._busy.get(stream, 0) + 1
        self.flushes += 1
        try:
            return await carry(stream, drafts, [item[1] for item in taken], EncodedEvents(taken))
        except Exception:
            self.errors += 1  # the publish fails; the events are lost (at most once)
            raise
        finally:
            self._done({stream: len(taken)})
            self._advance()

    def _done(self, counts: dict[str, int]) -> None:
        """The oldest ``counts[stream]`` pending events of each stream are done (they
        were in flight, so no drop took them)."""
        for stream, count in counts.items():
            busy = self._busy[stream] - 1
            if busy:
                self._busy[stream] = busy
            else:
                del self._busy[stream]
            pending = self._pending.get(stream)
            if pending is None:
                continue  # the flusher stopped meanwhile: nothing is pending
            if count >= len(pending):  # the usual flush: all of them
                del self._pending[stream]
                continue
            for _ in range(count):
                pending.popleft()

    def _next_batch(self) -> tuple[list[Outgoing], float]:
        """Take the next flush's events, and when to look again for events left
        lingering (inf: not before the next put or append end)."""
        waiting = self._waiting
        wake = float("inf")
        skip: set[str] = set(self._busy)
        if self._carry is not None:
            skip.update(self._appending)
            now = trio.current_time()
            for stream, expected in list(self._expected_at.items()):
                if now - expected >= _LINGER:
                    del self._expected_at[stream]
                elif stream in self._pending:
                    skip.add(stream)
                    wake = min(wake, expected + _LINGER)
        if not skip:
            if len(waiting) <= _MAX_FLUSH:
                batch = list(waiting)
                waiting.clear()
            else:  # the rest in the next flush, at once
                batch = [waiting.popleft() for _ in range(_MAX_FLUSH)]
                self._ready.set()
            return batch, wake
        batch, kept = [], collections.deque[Outgoing]()
        for item in waiting:
            if len(batch) < _MAX_FLUSH and item[1].stream not in skip:
                batch.append(item)
            else:
                if item[1].stream not in skip:
                    self._ready.set()  # over the cap: the rest in the next flush
                kept.append(item)
        self._waiting = kept
        return batch, wake

    async def run(self, store: Any, notifier: Any, retention: EventRetention) -> None:
        """Flush until cancelled: to ``store.retain_events`` (bounded by ``retention``)
        and ``notifier.notify_events`` (each optional), everything waiting at once."""
        retain = getattr(store, "retain_events", None)
        carry = getattr(notifier, "notify_events", None)
        if retain is None and carry is None:
            await trio.sleep_forever()
        if retain is not None:
            retain = functools.partial(retain, retention=retention)
        appends = getattr(store, "append_carrying", None) if retain is not None else None
        self._carry = None if appends is None else functools.partial(appends, retention=retention)
        self._running = True
        try:
            wake = float("inf")
            while True:
                if not self._ready.is_set():
                    if self._carry is None:
                        # Nothing is left lingering (wake is inf), and _left_for_append,
                        # the timer's only reader, is not asked: no scope to make, which
                        # is much of a small flush's fixed cost.
                        await self._ready.wait()
                    else:
                        with trio.CancelScope(deadline=wake) as self._timer:
                            await self._ready.wait()
                        self._timer = None
                else:
                    await trio.lowlevel.checkpoint()
                self._ready = trio.Event()
                batch, wake = self._next_batch()
                if not batch:
                    continue
                events = list(map(_EVENT, batch))
                encoded = EncodedEvents(batch)
                counts: dict[str, int] = {}
                for event in events:
                    counts[event.stream] = counts.get(event.stream, 0) + 1
                for stream in counts:
                    self._busy[stream] = self._busy.get(stream, 0) + 1
                self.flushes += 1
                try:
                    for flush in (retain, carry):
                        if flush is None:
                            continue
                        try:
                            await flush(events, encoded)
                        except Exception:
                            self.errors += 1  # best effort: events are at most once
                finally:
                    self._done(counts)
                    self._advance()
        finally:
            self._running = False
            self._timer = None
            self._carry = None
            self._pending.clear()
            self._advance()  # nobody waits for a flusher that is gone

    def _advance(self) -> None:
        self._progress.set()
        self._progress = trio.Event()
