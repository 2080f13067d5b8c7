"""Server-Sent Events for chatbus subscriptions, for any ASGI (or other) framework.

Owns: the resume cursor of an SSE request (:func:`parse_cursor`), the SSE wire format
(:func:`format_frame`, :func:`message_frame`, :func:`event_frame`), the JSON shape of
a message and an event (:func:`message_json`, :func:`event_json`) and the generator
that turns a subscription into a stream of frames (:func:`sse_stream`, or
:func:`sse_bytes` for chunks already UTF-8). Imports trio and the public chatbus API
only; no web framework. The frames, their JSON and the per-process frame cache live in
the private ``_sse_frames``, the store's health in ``_sse_health``; their public names
are exported and documented here.

A framework takes the generator as a streaming body::

    cursor = chatbus.sse.parse_cursor(
        last_event_id=request.headers.get("last-event-id"),
        after=request.query_params.get("after"),
        last=request.query_params.get("last"),
    )  # InvalidCursor (a ValueError): answer 400
    frames = chatbus.sse.sse_stream(bus, room, cursor)  # InvalidStream: answer 400
    return StreamingResponse(frames, headers=chatbus.sse.SSE_HEADERS)

What goes on the wire:

- first, once the subscription is open: a ``: chatbus`` comment, the ``retry:``
  hint and ``id: <cursor>:<epoch>``, the id of the last message before the stream's
  start (``last=N`` resolved) and the stream's epoch, with no data, so no event
  fires; it sets the browser's ``Last-Event-ID``, so a page that reconnects before
  any message came resumes where it started, not at a newer tail;
- a message is ``id: <message id>:<epoch>``, ``event: message`` and its JSON
  (:func:`message_json`) as ``data``; so the browser's ``Last-Event-ID`` always names
  the last durable message it got and the history (epoch) it belongs to, and its
  ``EventSource`` resumes right after it, in that history only;
- an event (``events=True``) is ``event: event`` with its JSON (:func:`event_json`)
  and no ``id:`` line, so it never moves the resume point (a page that reconnects
  gets the retained parts of a reply in progress again: ``emitter`` and ``seq`` tell
  it which it has shown);
- ``event: status`` with ``{"state": "reconnecting"}`` when the store stops
  answering, and ``{"state": "ok"}`` once when it answers again (see below);
- ``event: end`` with ``{"reason": ..., "error": ..., "detail": ...}`` when the
  stream cannot go on (history trimmed or reset under the cursor, the cursor past the
  head or in another epoch, the stream deleted, the bus closed), then the response
  ends; a page should close its ``EventSource`` on it rather than let it reconnect;
- ``: ping`` comments every ``heartbeat`` seconds of silence, so proxies keep the
  connection open.

How it writes: every frame ready goes into one chunk (one write for the server). A
message into a quiet room goes out at once; while the room is busy (the last chunk
carried messages) a stream first waits up to ``flush`` seconds (default
:data:`DEFAULT_FLUSH`, 40 ms) and sends what came meanwhile in one chunk, on a clock
shared by all the streams of the trio run: 1,000 clients of a room with 200 messages
a second get about 25 writes a second each, not 200, and wake once per interval,
a batch of streams per pass of trio's scheduler (so the app's other tasks, a POST
being answered, run between the batches, not after all 1,000 wrote; the room's hub
wakes the streams waiting for it the same way). Each message's frame is encoded once
per process, as text and as UTF-8, however many clients get it.

The room's hub (``_sse_hub``): a stream starts on a subscription of its own (its
cursor, the history, the epoch check, the events retained for joiners), and once it
has nothing left to catch up on it closes it and follows the room's one shared
subscription instead: one per (bus, stream, ``events``, text or bytes) per process,
feeding a bounded ring of encoded frames. Each flush, a caught-up stream takes the
frames after its position as one joined chunk (streams at the same position share
the join): no subscription, merge task or per-message work per client. It switches
at an exact id (the ring holds every message after its start, in order), so nothing
is lost or doubled; events after its cursor that came before the switch are left
out (an event arrives in its place or not at all). A stream that falls behind the
ring (a slow client) goes back to a subscription of its own at its cursor, as a
slow subscriber always did, and switches again once caught up; when the hub's
subscription ends (the bus closed, the stream deleted or reset), each stream takes
what the ring holds and ends as its own subscription would have. The last stream
to leave closes the hub's subscription before it returns. ``Bus.statistics()``'s
``subscribers`` counts the hub's subscription once for all the streams on it.

Resume ids: ``<message id>:<epoch>`` (the epoch is ``Subscriber.epoch``, which
changes when the stream is deleted and created again, or when an in-memory server
restarts and starts its history anew); ``<message id>`` alone when the store has no
epochs. :func:`parse_cursor` reads both forms from ``Last-Event-ID`` and ``?after=``:
with the epoch, a cursor from another history ends the stream with ``end``
``history_reset`` instead of resuming after the same number in the new history (and
splicing it onto what the page showed); a plain id (an older client, a hand-made
``?after=5``) is checked only against the head, as before.

Store health: one probe per bus (a trio system task, while any SSE stream of the bus
is open) calls the store's ``heads`` every :data:`PROBE_INTERVAL` seconds. A probe
that fails, or has not answered within :data:`PROBE_DEADLINE` seconds (a frozen
store, a TCP black hole, whose calls never return), makes every stream of the bus say
``reconnecting``; only an answer to a call begun after the last failure makes it say
``ok``, once (an attempt in flight is no answer; a failure of a call begun before a
later answer is stale). A stream opened while the store is down sends the ``: chatbus``
comment and ``retry:`` with the ``reconnecting`` status as soon as the probe knows (a
first try to open is given up then, not waited out to a pool timeout), retries opening
its subscription (pings between tries), and sends its ``id:`` start once it opens:
never an aborted response.

Why the generator is safe to hand to a framework: the subscription's merge task runs
in the bus's nursery, so the generator opens no cancel scope or nursery across a
``yield``. A client that disconnects gets its response task cancelled (or the
generator closed, or dropped and finalised by trio); each ends the ``async with``
around the subscription, which closes it at once. A slow client is bounded like any
subscription: while the framework does not pull the next frame, the subscription
fetches at most one read batch ahead and drops events beyond its buffer, never
messages; on the hub, the ring is bounded, and a client it left behind catches up
on a subscription of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Final, TypeAlias

import trio

import chatbus
from chatbus._flush_clock import flush_clock as _flush_clock

from ._sse_cursor import MAX_LAST as MAX_LAST
from ._sse_cursor import Cursor as Cursor
from ._sse_cursor import InvalidCursor as InvalidCursor
from ._sse_cursor import parse_cursor as parse_cursor
from ._sse_frames import _BYTES, _TEXT, _Chunk, _Encoding, end_frame, status_frame
from ._sse_frames import event_frame as event_frame
from ._sse_frames import event_json as event_json
from ._sse_frames import format_frame as format_frame
from ._sse_frames import message_frame as message_frame
from ._sse_frames import message_json as message_json
from ._sse_frames import resume_id as resume_id
from ._sse_health import PROBE_DEADLINE, PROBE_INTERVAL, _HealthProbe, _probe_for, _StoreHealth
from ._sse_hub import _Hub, hub_for
from ._util import fixup_module_metadata as _fixup_module_metadata

__all__ = [
    "DEFAULT_FLUSH",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_RETRY_MS",
    "PROBE_DEADLINE",
    "PROBE_INTERVAL",
    "SSE_HEADERS",
    "Cursor",
    "InvalidCursor",
    "event_frame",
    "event_json",
    "format_frame",
    "message_frame",
    "message_json",
    "parse_cursor",
    "resume_id",
    "sse_bytes",
    "sse_stream",
]
# For the tests: the health of the store, in its own module.
_TESTED: Final = (_HealthProbe, _StoreHealth)

#: Seconds of silence after which a ``: ping`` comment is sent.
DEFAULT_HEARTBEAT: Final = 5.0
#: Seconds a stream gathers the messages of a busy room before it writes them. With
#: 1,000 clients of one room at 200 msgs/s on one process, publish -> client p99 was
#: lowest about here (a sweep of 10 to 60 ms): a shorter window costs more rounds of
#: writes than the waiting it saves, a longer one waits longer than it saves.
DEFAULT_FLUSH: Final = 0.04
#: The reconnect delay suggested to the browser, in milliseconds.
DEFAULT_RETRY_MS: Final = 2000
#: Response headers for an SSE stream (no caching, no proxy buffering).
SSE_HEADERS: Final[Mapping[str, str]] = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}

# How often the generator looks at the store's health while idle.
_STATUS_POLL: Final = 0.5
# Longest wait for a subscription to open before trying again (a frozen connection).
_OPEN_DEADLINE: Final = 10.0
# Pause between attempts to open a subscription while the store is unreachable.
_REOPEN_PAUSE: Final = 1.0
# How often an opening stream not yet told of an outage asks the probe.
_DOWN_POLL: Final = 0.25
# Most frames joined into one chunk when the subscription has more ready.
_MAX_COALESCE: Final = 64
# Caught-up streams take the room's shared ring (``_sse_hub``); False: each keeps a
# subscription of its own (for comparisons).
_HUB = True
# Where a stream left the hub: (the id of its last message, that message's epoch).
_Resume: TypeAlias = tuple[int, int | None]


# Errors that end a stream, by the reason the page is told, the first that matches
# (so a subclass before its base: StreamDeleted is a HistoryReset). Looked up on
# chatbus by name, so a chatbus without one of them still works.
_ENDING_ERRORS: Final = (
    ("HistoryTruncated", "history_truncated"),
    ("StreamDeleted", "stream_deleted"),
    ("HistoryReset", "history_reset"),
    ("CursorAhead", "cursor_ahead"),
    ("UndecodableMessage", "undecodable_message"),
    ("BusClosed", "bus_closed"),
)


def _ending_reason(exc: BaseException) -> str | None:
    for name, reason in _ENDING_ERRORS:
        cls = getattr(chatbus, name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return reason
    return None


_AnySubscriber: TypeAlias = (
    chatbus.Subscriber[chatbus.Message | chatbus.Event] | chatbus.Subscriber[chatbus.Message]
)


def sse_stream(
    bus: chatbus.Bus,
    stream: str,
    cursor: Cursor | None = None,
    *,
    events: bool = True,
    heartbeat: float = DEFAULT_HEARTBEAT,
    retry_ms: int | None = DEFAULT_RETRY_MS,
    flush: float = DEFAULT_FLUSH,
) -> AsyncGenerator[str, None]:
    """Follow ``stream`` as SSE frames: a generator for a streaming response body.

    The arguments are checked at once, before any response is started, so a bad
    stream name or option raises here (answer 400). Errors that only entering or
    following the subscription can find (the cursor past the head or in another
    epoch, history trimmed, the stream deleted) become an ``end`` frame, and the
    generator stops. A store that cannot be reached, also while the subscription
    opens, is a ``status`` frame, and the stream goes on (it retries).

    Each chunk holds every frame ready when it is made. While the room is busy (the
    last chunk carried messages), the generator first waits up to ``flush`` seconds
    so that the messages arriving meanwhile go out in one write: a client of a room
    with 200 messages a second gets about ``1 / flush`` writes a second, not 200.
    That wait is a clock shared by every stream of the trio run with the same
    ``flush``, so 1,000 streams wake once per interval (in batches), not each on a
    timer of its own. A message into a quiet room goes out at once.

    Args:
        bus: The bus to subscribe on.
        stream: The stream (room) to follow.
        cursor: Where to start (:func:`parse_cursor`); default: all history.
        events: Also send the stream's events (typing, status of a bot, …).
        heartbeat: Seconds of silence before a ``: ping`` comment (> 0).
        retry_ms: The ``retry:`` hint sent first (None: none).
        flush: Seconds a busy stream gathers messages before a write (>= 0; 0: write
            whatever is ready at once). Adds at most that much to a message's
            latency, only while messages keep coming.

    Returns:
        An async generator of frame texts (encode them as UTF-8).

    Raises:
        InvalidStream: ``stream`` is not a valid stream name.
        ValueError: ``heartbeat`` is not positive, ``retry_ms`` or ``flush`` is
            negative, or the cursor is out of range.
    """
    opener = _subscriber(bus, stream, cursor, events, heartbeat, retry_ms, flush)
    return _frames(bus, stream, opener, heartbeat, retry_ms, flush, _TEXT, events)


def sse_bytes(
    bus: chatbus.Bus,
    stream: str,
    cursor: Cursor | None = None,
    *,
    events: bool = True,
    heartbeat: float = DEFAULT_HEARTBEAT,
    retry_ms: int | None = DEFAULT_RETRY_MS,
    flush: float = DEFAULT_FLUSH,
) -> AsyncGenerator[bytes, None]:
    """:func:`sse_stream`, as UTF-8 chunks ready for the wire.

    For a raw ASGI ``http.response.body``: each message's frame is encoded once for
    every client of the process, and a chunk is one join of those bytes.
    Same arguments and errors as :func:`sse_stream`.
    """
    opener = _subscriber(bus, stream, cursor, events, heartbeat, retry_ms, flush)
    return _frames(bus, stream, opener, heartbeat, retry_ms, flush, _BYTES, events)


def _subscriber(
    bus: chatbus.Bus,
    stream: str,
    cursor: Cursor | None,
    events: bool,
    heartbeat: float,
    retry_ms: int | None,
    flush: float,
) -> Callable[[_Resume | None], _AnySubscriber]:
    if not heartbeat > 0:
        raise ValueError(f"heartbeat must be > 0, got {heartbeat}")
    if retry_ms is not None and retry_ms < 0:
        raise ValueError(f"retry_ms must be >= 0, got {retry_ms}")
    if not flush >= 0:
        raise ValueError(f"flush must be >= 0, got {flush}")
    start = cursor if cursor is not None else Cursor(after=0)

    def open_subscriber(resume: _Resume | None) -> _AnySubscriber:
        # At the request's cursor, or (``resume``) where the stream left the room's
        # hub: after its last message, in that message's epoch.
        after, last, epoch = (
            (start.after, start.last, start.epoch)
            if resume is None
            else (resume[0], None, resume[1])
        )
        if not events:
            return bus.open_subscriber(stream, after, last=last, epoch=epoch)
        subscriber = bus.open_subscriber(stream, after, last=last, epoch=epoch, events=True)
        if resume is not None:
            # The stream goes on: not a joiner's retained events in its middle.
            subscriber._continue_stream()
        return subscriber

    open_subscriber(None)  # checks the arguments now (an unentered one holds nothing)
    return open_subscriber


async def _frames(
    bus: chatbus.Bus,
    stream: str,
    open_subscriber: Callable[[_Resume | None], _AnySubscriber],
    heartbeat: float,
    retry_ms: int | None,
    flush: float,
    encoding: _Encoding[_Chunk],
    events: bool,
) -> AsyncGenerator[_Chunk, None]:
    probe = _probe_for(bus)
    probe.join(stream)
    health = _StoreHealth()
    clock = _flush_clock(flush) if flush > 0 else None
    subscriber: _AnySubscriber | None = None
    # The ``: chatbus`` comment and the ``retry:`` hint, until they went out.
    preamble = format_frame(retry=retry_ms, comment="chatbus")
    last_sent = trio.current_time()
    ending: str | None = None
    started = False  # the ``id:`` of the start went out
    # Where to open the next subscription of our own (None: the request's cursor).
    resume: _Resume | None = None
    # The room's hub, once joined (see ``_sse_hub``): caught up, the stream takes its
    # frames from there and closes its own subscription.
    hub: _Hub[_Chunk] | None = None
    try:
        while ending is None:
            # Open the subscription. While the store cannot be reached (the probe
            # says so, or opening failed or hung), tell the client once and try
            # again: never an aborted response.
            began = trio.current_time()
            change = health.observe(probe.down(began), probe.answered)
            if change is not None or (preamble and health.reconnecting):
                yield encoding.other(preamble + (status_frame(change) if change else ""))
                preamble, last_sent = "", began
            opened = False
            switch = False
            try:
                if subscriber is None:
                    subscriber = open_subscriber(resume)
                async with contextlib.AsyncExitStack() as stack:
                    with trio.move_on_after(_OPEN_DEADLINE) as opening:
                        if health.reconnecting:  # told: it may take as long as it takes
                            sub = await stack.enter_async_context(subscriber)
                        else:
                            # Not told yet: give up this try once the probe says the
                            # store is down (a pool timeout, a frozen store take far
                            # longer), so the client hears of it as soon as the probe.
                            refused: Exception | None = None
                            async with trio.open_nursery() as watch:
                                watch.start_soon(_cancel_when_down, probe, opening)
                                try:
                                    sub = await stack.enter_async_context(subscriber)
                                except Exception as exc:  # raised as is, not in a group
                                    refused = exc
                                watch.cancel_scope.cancel()
                            if refused is not None:
                                raise refused
                        opened = True
                    subscriber = None  # entered (or given up): the next try opens anew
                    if not opened:
                        raise chatbus.StoreError(
                            f"opening the subscription took over {_OPEN_DEADLINE} s"
                        )
                    if not started:
                        # The first chunk goes out once the subscription is open (so a
                        # client that has it misses nothing published from then on,
                        # even with last=0). Its id is where the stream starts
                        # (``last=N`` resolved): a browser that reconnects before any
                        # message came resumes there, not at a new tail.
                        start_id = resume_id(sub.cursor, sub.epoch)
                        if preamble:
                            first = format_frame(retry=retry_ms, comment="chatbus", id=start_id)
                        else:  # sent with the news that the store was unreachable
                            first = format_frame(id=start_id)
                        yield encoding.other(first)
                        preamble, started = "", True
                    last_sent = trio.current_time()
                    last_poll = last_sent
                    busy = False
                    while True:
                        chunk: list[_Chunk] = []
                        if busy and clock is not None:
                            # The last chunk carried messages and took all there were:
                            # more are likely on their way. Gather them for the flush
                            # interval rather than wake and write for each one.
                            await clock.wait()
                        # Messages already buffered come from receive() at once, each
                        # with only a cancellation check before it takes one: take them
                        # (and the events due among them) into one chunk with no cancel
                        # scope, so a busy stream costs no scope per chunk. Only when
                        # none is buffered wait, in a fresh scope around one receive()
                        # alone, which can only time out while waiting, with nothing
                        # taken. No cancel scope spans a yield.
                        if _HUB:
                            # Switch to the room's hub once it holds our place (what our
                            # subscription buffered is in it too, after the cursor).
                            if hub is not None and hub.ended:  # (it failed to open, say)
                                old, hub = hub, None
                                await old.leave()
                            if hub is None:
                                hub = hub_for(bus, stream, events, encoding)
                                hub.join()
                            if _may_switch(sub, events) and (
                                hub.position(sub.cursor, sub.epoch) is not None
                            ):
                                resume, switch = (sub.cursor, sub.epoch), True
                                break
                        ready = _buffered(sub)
                        if not ready:
                            with trio.move_on_after(_STATUS_POLL):
                                chunk.append(_frame_of(await sub.receive(), sub, encoding))
                            ready = _buffered(sub) if chunk else 0
                        taken = min(ready, _MAX_COALESCE)
                        for _ in range(taken):
                            chunk.append(_frame_of(await sub.receive(), sub, encoding))
                        # Busy: messages came, and none is left over (a backlog is
                        # sent on at once, a chunk of _MAX_COALESCE after another).
                        busy = bool(chunk) and taken == ready
                        now = trio.current_time()
                        if now - last_poll >= _STATUS_POLL or not chunk:
                            last_poll = now
                            # The bus's probe of the store: an idle subscription reads
                            # nothing, so its own calls cannot tell the store went away.
                            change = health.observe(probe.down(now), probe.answered)
                            if change is not None:
                                chunk.append(encoding.other(status_frame(change)))
                        if not chunk and now - last_sent >= heartbeat:
                            chunk.append(encoding.other(": ping\n\n"))
                        if chunk:
                            last_sent = now
                            yield encoding.join(chunk)
            except trio.EndOfChannel:
                ending = end_frame("bus_closed")
            except chatbus.StoreError:
                if opened:
                    raise
                # Opening failed: the store did not answer (handled below).
            except Exception as exc:
                reason = _ending_reason(exc)
                if reason is None:
                    raise
                ending = end_frame(reason, exc)
            if switch:
                assert hub is not None
                assert resume is not None
                # Follow the room's hub from our cursor until it ends or we fall
                # behind its ring; then (unless it ended the stream) a subscription of
                # our own again, at the cursor.
                cursor, epoch = resume
                position = hub.position(cursor, epoch)
                busy = False
                last_poll = trio.current_time()
                while position is not None and position >= hub.base:
                    if busy and clock is not None:
                        await clock.wait()
                        if position < hub.base:
                            break  # fell behind the ring (a slow client)
                    data, after = hub.take(position)
                    if data is None and not hub.ended:
                        # Nothing new: wait for the hub, in a scope around the wait alone.
                        with trio.move_on_after(_STATUS_POLL):
                            await hub.wait()
                        if position < hub.base:
                            break
                        data, after = hub.take(position)
                    chunk = []
                    if data is not None:
                        position, cursor, epoch = after, hub.cursor_at(after), hub.epoch
                        chunk.append(data)
                    elif hub.ended:
                        # It took all the hub had: end as its own subscription would
                        # have, or (an error no stream ends with) open one again.
                        error = hub.error
                        if isinstance(error, trio.EndOfChannel):
                            ending = end_frame("bus_closed")
                        elif error is not None and _ending_reason(error) is not None:
                            ending = end_frame(_ending_reason(error) or "", error)
                        old, hub = hub, None
                        await old.leave()
                        break
                    # Busy: frames came and none is left over (see above).
                    busy = data is not None and position == hub.end
                    now = trio.current_time()
                    if now - last_poll >= _STATUS_POLL or not chunk:
                        last_poll = now
                        change = health.observe(probe.down(now), probe.answered)
                        if change is not None:
                            chunk.append(encoding.other(status_frame(change)))
                    if not chunk and now - last_sent >= heartbeat:
                        chunk.append(encoding.other(": ping\n\n"))
                    if chunk:
                        last_sent = now
                        yield encoding.join(chunk)
                resume = (cursor, epoch)
                continue
            if ending is None:
                # The subscription did not open: say so (once), pause, try again.
                subscriber = None
                change = health.failed(began)
                now = trio.current_time()
                if change is not None or preamble or now - last_sent >= heartbeat:
                    text = status_frame(change) if change else ": ping\n\n"
                    yield encoding.other(preamble + text)
                    preamble, last_sent = "", now
                with trio.move_on_after(_REOPEN_PAUSE):
                    # Sooner if the probe gets an answer from the store meanwhile.
                    while probe.answered <= began:  # noqa: ASYNC110 (no event to wait on)
                        await trio.sleep(_REOPEN_PAUSE / 10)
    finally:
        probe.leave(stream)
        if hub is not None:
            old, hub = hub, None
            await old.leave()
    yield encoding.other(ending)  # the loop ends only with one


def _may_switch(sub: _AnySubscriber, events: bool) -> bool:
    # No event buffered for the consumer and, with events, the retained ones for
    # joiners already in: leaving now loses no event it owes (the messages it
    # buffered after its cursor are in the hub's ring).
    if sub.statistics().events_buffered:
        return False
    return not events or sub._event_queue.retained_fetched


async def _cancel_when_down(probe: _HealthProbe, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` (a subscription opening) once ``probe`` says the store is down."""
    while not probe.down(trio.current_time()):  # noqa: ASYNC110 (no event to wait on)
        await trio.sleep(_DOWN_POLL)
    scope.cancel()


def _buffered(sub: chatbus.Subscriber[Any]) -> int:
    # Messages fetched for the consumer: that many receive() calls return at once
    # (an event due among them comes first; an event ahead waits for its message,
    # which is there). Events alone promise nothing: one may wait for a message
    # not fetched yet.
    return sub.statistics().buffered


def _frame_of(
    item: chatbus.Message | chatbus.Event, sub: _AnySubscriber, encoding: _Encoding[_Chunk]
) -> _Chunk:
    if isinstance(item, chatbus.Message):
        return encoding.message(item, sub.epoch)
    return encoding.other(event_frame(item))


_fixup_module_metadata(__name__, globals())
del _fixup_module_metadata
