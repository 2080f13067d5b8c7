"""The bus's outbox of emitted events: bounded, never waited on, flushed in batches.

Owns: what happens to an event between :meth:`chatbus.Bus.emit` returning and the
store (retention for joiners) and the notifier (other processes) having it. One
flush carries everything waiting, so events that arrive together cost one store
round trip and one notification (Postgres: NOTIFY takes a cluster-wide lock at
commit; one per event would throttle every writer). Imports :mod:`chatbus._event`
and :mod:`chatbus._protocols`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Final, final

import attrs
import trio

from ._event import Event
from ._options import EventRetention

#: Most events in one flush: bounds the statement, and how long encoding it keeps the
#: loop, when the store fell behind a burst.
_MAX_FLUSH: Final = 1000


@final
@attrs.define(eq=False)
class Outbox:
    """Events waiting to be flushed; the oldest are dropped past ``capacity``."""

    capacity: int
    #: The events waiting, and their encodings (two deques: no pair made per event).
    _waiting: collections.deque[Event] = attrs.field(init=False)
    _encoded: collections.deque[str] = attrs.field(init=False)
    _ready: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: ``_ready`` is set (a put then need not call it: one put per event).
    _signalled: bool = attrs.field(default=False, init=False)
    flushes: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)
    errors: int = attrs.field(default=0, init=False)
    #: Events put so far, and how many of them are flushed (or dropped, or failed).
    _put: int = attrs.field(default=0, init=False)
    _done: int = attrs.field(default=0, init=False)
    _progress: trio.Event = attrs.field(factory=trio.Event, init=False)
    _running: bool = attrs.field(default=False, init=False)
    #: Per stream, the number (in put order) of the last event put for it that is
    #: not known flushed yet: what a publish to that stream waits for.
    _last_put: dict[str, int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._waiting = collections.deque()
        self._encoded = collections.deque()

    def put(self, event: Event, encoded: str) -> None:
        """Queue ``event`` (never blocks)."""
        waiting = self._waiting
        if len(waiting) >= self.capacity:
            waiting.popleft()
            self._encoded.popleft()
            self.dropped += 1
        waiting.append(event)
        self._encoded.append(encoded)
        self._put += 1
        self._last_put[event.stream] = self._put
        if not self._signalled:
            self._signalled = True
            self._ready.set()

    def mark(self, stream: str) -> int:
        """Where the events put so far for ``stream`` end (0: all flushed already)."""
        return self._last_put.get(stream, 0)

    async def flushed(self, stream: str | None = None) -> None:
        """Wait until the events put so far for ``stream`` (None: for every stream) are
        flushed (or given up on)."""
        await self.flushed_upto(self._put if stream is None else self.mark(stream))

    async def flushed_upto(self, mark: int) -> None:
        """Wait until the events put up to ``mark`` (see :meth:`mark`) are flushed.

        A publish waits for this first, with the mark of its stream taken when it was
        called, so the events a bus emitted on a stream before a publish reach other
        processes before its message (NOTIFYs arrive in commit order). Returns at
        once, without a checkpoint, when they are: a publish waits for no flush of
        another stream's events, nor of events emitted after it was called.
        """
        target = mark
        if not self._running or self._done >= target:
            return
        while self._done < target:
            progress = self._progress
            await progress.wait()

    async def run(self, store: Any, notifier: Any, retention: EventRetention) -> None:
        """Flush until cancelled: to ``store.retain_events`` (bounded by ``retention``)
        and ``notifier.notify_events`` (each optional), everything waiting at once."""
        retain = getattr(store, "retain_events", None)
        carry = getattr(notifier, "notify_events", None)
        if retain is None and carry is None:
            await trio.sleep_forever()
        self._running = True
        try:
            while True:
                await self._ready.wait()
                self._ready = trio.Event()
                self._signalled = False
                waiting, waiting_encoded = self._waiting, self._encoded
                if len(waiting) <= _MAX_FLUSH:
                    events, encoded = list(waiting), list(waiting_encoded)
                    waiting.clear()
                    waiting_encoded.clear()
                else:  # the rest in the next flush, at once
                    events = [waiting.popleft() for _ in range(_MAX_FLUSH)]
                    encoded = [waiting_encoded.popleft() for _ in range(_MAX_FLUSH)]
                    self._signalled = True
                    self._ready.set()
                self.flushes += 1
                for flush in (
                    None if retain is None else functools.partial(retain, retention=retention),
                    carry,
                ):
                    if flush is None:
                        continue
                    try:
                        await flush(events, encoded)
                    except Exception:
                        self.errors += 1  # best effort: events are at most once
                self._advance(self._put - len(self._waiting))
                last_put, done = self._last_put, self._done
                for stream in {event.stream for event in events}:
                    # Forget what is flushed: bounded by the streams.
                    if last_put.get(stream, done + 1) <= done:
                        del last_put[stream]
        finally:
            self._running = False
            self._last_put.clear()
            self._advance(self._put)  # nobody waits for a flusher that is gone

    def _advance(self, done: int) -> None:
        self._done = done
        self._progress.set()
        self._progress = trio.Event()
