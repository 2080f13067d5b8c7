"""Server-Sent Events for chatbus subscriptions, for any ASGI (or other) framework.

Owns: the resume cursor of an SSE request (:func:`parse_cursor`), the SSE wire format
(:func:`format_frame`, :func:`message_frame`, :func:`event_frame`), the JSON shape of
a message and an event (:func:`message_json`, :func:`event_json`) and the generator
that turns a subscription into a stream of frames (:func:`sse_stream`, or
:func:`sse_bytes` for chunks already UTF-8). Imports trio and the public chatbus API
only; no web framework.

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
  hint and ``id: <cursor>``, the id of the last message before the stream's start
  (``last=N`` resolved), with no data, so no event fires; it sets the browser's
  ``Last-Event-ID``, so a page that reconnects before any message came resumes
  where it started, not at a newer tail;
- a message is ``id: <message id>``, ``event: message`` and its JSON
  (:func:`message_json`) as ``data``; so the browser's ``Last-Event-ID`` always names
  the last durable message it got, and its ``EventSource`` resumes right after it;
- an event (``events=True``) is ``event: event`` with its JSON (:func:`event_json`)
  and no ``id:`` line, so it never moves the resume point;
- ``event: status`` with ``{"state": "reconnecting"}`` when the store stops
  answering (the subscription's reads fail, or the bus's safety-net polls of the
  stream heads, which run every ``poll_interval`` even while the room is quiet), and
  ``{"state": "ok"}`` when it answers again;
- ``event: end`` with ``{"reason": ..., "error": ..., "detail": ...}`` when the
  stream cannot go on (history trimmed or reset under the cursor, the cursor past the
  head, the stream deleted, the bus closed), then the response ends; a page should
  close its ``EventSource`` on it rather than let it reconnect;
- ``: ping`` comments every ``heartbeat`` seconds of silence, so proxies keep the
  connection open.

How it writes: every frame ready goes into one chunk (one write for the server). A
message into a quiet room goes out at once; while the room is busy (the last chunk
carried messages) a stream first waits up to ``flush`` seconds (default
:data:`DEFAULT_FLUSH`, 20 ms) and sends what came meanwhile in one chunk, on a clock
shared by all the streams of the trio run: 1,000 clients of a room with 200 messages
a second get about 50 writes a second each, not 200, and wake together once per
interval. Each message's frame is encoded once per process, as text and as UTF-8,
however many clients get it.

Why the generator is safe to hand to a framework: the subscription's merge task runs
in the bus's nursery, so the generator opens no cancel scope or nursery across a
``yield``. A client that disconnects gets its response task cancelled (or the
generator closed, or dropped and finalised by trio); each ends the ``async with``
around the subscription, which closes it at once. A slow client is bounded like any
subscription: while the framework does not pull the next frame, the subscription
fetches at most one read batch ahead and drops events beyond its buffer, never
messages.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Final, Generic, TypeVar, final

import attrs
import trio

import chatbus
from chatbus._flush_clock import flush_clock as _flush_clock

__all__ = [
    "DEFAULT_FLUSH",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_RETRY_MS",
    "SSE_HEADERS",
    "Cursor",
    "InvalidCursor",
    "event_frame",
    "event_json",
    "format_frame",
    "message_frame",
    "message_json",
    "parse_cursor",
    "sse_bytes",
    "sse_stream",
]

#: Seconds of silence after which a ``: ping`` comment is sent.
DEFAULT_HEARTBEAT: Final = 5.0
#: Seconds a stream gathers the messages of a busy room before it writes them.
DEFAULT_FLUSH: Final = 0.02
#: The reconnect delay suggested to the browser, in milliseconds.
DEFAULT_RETRY_MS: Final = 2000
#: Largest ``last`` accepted from a request (a page opens at its last few dozen).
MAX_LAST: Final = 10_000
#: Response headers for an SSE stream (no caching, no proxy buffering).
SSE_HEADERS: Final[Mapping[str, str]] = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}

_MAX_ID: Final = 2**63 - 1
_DIGITS: Final = re.compile(r"[0-9]{1,19}")
# How often the generator looks at the subscription's counters while idle.
_STATUS_POLL: Final = 0.5
# Store errors quiet for this long after a read attempt: the store is back. Longer
# than the subscription's largest retry pause (1 s), so a pause is not taken for it.
_RECOVERY_QUIET: Final = 2.5
# Most frames joined into one chunk when the subscription has more ready.
_MAX_COALESCE: Final = 64


class InvalidCursor(ValueError):
    """The resume cursor of a request is not valid (answer it with 400)."""


@attrs.frozen(kw_only=True)
class Cursor:
    """Where an SSE stream starts: after a message id, or at the last N messages.

    Attributes:
        after: Start after this message id (exclusive with ``last``).
        last: Start at the stream's last ``last`` messages (0: only new ones).
        source: Where it came from: ``"last-event-id"``, ``"after"``, ``"last"`` or
            ``"default"``.
    """

    after: int | None = None
    last: int | None = None
    source: str = "default"


def _parse_count(name: str, value: str, *, low: int, high: int) -> int:
    text = value.strip()
    if not _DIGITS.fullmatch(text):
        raise InvalidCursor(
            f"{name} must be a whole number from {low} to {high}, got {value[:40]!r}"
        )
    number = int(text)
    if not low <= number <= high:
        raise InvalidCursor(f"{name} must be from {low} to {high}, got {number}")
    return number


def parse_cursor(
    *,
    last_event_id: str | None = None,
    after: str | None = None,
    last: str | None = None,
    default: Cursor | None = None,
) -> Cursor:
    """Work out a request's resume cursor; the ``Last-Event-ID`` header wins.

    A browser's ``EventSource`` reconnects to the URL it was opened with (say
    ``?last=50``) and adds the ``Last-Event-ID`` header, the id of the last message it
    got: so the header, when present and not empty, is the cursor and the query
    values are ignored. Otherwise ``after`` or ``last`` from the query (not both).

    Args:
        last_event_id: The ``Last-Event-ID`` header value, or None.
        after: The ``after`` query value: the last message id already seen.
        last: The ``last`` query value: start at the stream's last N messages.
        default: The cursor when none is given (default: after 0, all history).

    Returns:
        The cursor.

    Raises:
        InvalidCursor: a value is not a whole number in range, or both ``after`` and
            ``last`` are given (without the header).
    """
    if last_event_id is not None and last_event_id.strip():
        return Cursor(
            after=_parse_count("Last-Event-ID", last_event_id, low=0, high=_MAX_ID),
            source="last-event-id",
        )
    if after is not None and last is not None:
        raise InvalidCursor("pass after or last, not both")
    if after is not None:
        return Cursor(after=_parse_count("after", after, low=0, high=_MAX_ID), source="after")
    if last is not None:
        return Cursor(last=_parse_count("last", last, low=0, high=MAX_LAST), source="last")
    return default if default is not None else Cursor(after=0)


def format_frame(
    data: str | None = None,
    *,
    event: str | None = None,
    id: int | str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> str:
    """Encode one SSE frame (ends with the blank line that dispatches it).

    Args:
        data: The payload; each of its lines becomes a ``data:`` line.
        event: The event name (``event:`` line), if not the default ``message``.
        id: The event id (``id:`` line): becomes the browser's ``Last-Event-ID``.
        retry: Reconnect delay hint in milliseconds (``retry:`` line).
        comment: A comment line (``: comment``), ignored by browsers.

    Returns:
        The frame's text.

    Raises:
        ValueError: ``event``, ``id`` or ``comment`` holds a line break (or ``id`` a
            NUL), or ``retry`` is negative.
    """
    lines: list[str] = []
    if comment is not None:
        _check_line("comment", comment)
        lines.append(f": {comment}")
    if retry is not None:
        if retry < 0:
            raise ValueError(f"retry must be >= 0, got {retry}")
        lines.append(f"retry: {int(retry)}")
    if id is not None:
        text = str(id)
        _check_line("id", text)
        if "\0" in text:
            raise ValueError("id must not contain NUL")
        lines.append(f"id: {text}")
    if event is not None:
        _check_line("event", event)
        lines.append(f"event: {event}")
    if data is not None:
        lines.extend(f"data: {line}" for line in data.replace("\r\n", "\n").split("\n"))
    return "\n".join(lines) + "\n\n"


def _check_line(name: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"{name} must be one line")


def _time(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def message_json(message: chatbus.Message) -> dict[str, Any]:
    """The JSON shape of a message on the wire (and in a history page).

    Returns:
        ``{"stream", "id", "body", "key", "created_at", "redacted"}``, with
        ``created_at`` in ISO 8601 UTC.
    """
    return {
        "stream": message.stream,
        "id": message.id,
        "body": message.body,
        "key": message.key,
        "created_at": _time(message.created_at),
        "redacted": message.redacted,
    }


def event_json(event: chatbus.Event) -> dict[str, Any]:
    """The JSON shape of an event on the wire.

    Returns:
        ``{"stream", "after", "body", "key", "ttl", "created_at"}``.
    """
    return {
        "stream": event.stream,
        "after": event.after,
        "body": event.body,
        "key": event.key,
        "ttl": event.ttl,
        "created_at": _time(event.created_at),
    }


def _dumps(value: object) -> str:
    # Compact, and never a raw line break (json escapes them inside strings).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def message_frame(message: chatbus.Message) -> str:
    """The SSE frame of a message: ``id:``, ``event: message`` and its JSON."""
    return format_frame(_dumps(message_json(message)), event="message", id=message.id)


@final
@attrs.define(eq=False)
class _FrameCache:
    """The frames of recent messages, as text and as UTF-8: a message reaching 1,000
    local subscribers is encoded once (a bus hands every local subscriber the same
    Message object), and its bytes are shared by every response that writes it."""

    size: int = 1024
    _frames: dict[tuple[str, int], tuple[chatbus.Message, str, bytes]] = attrs.field(factory=dict)

    def _entry(self, message: chatbus.Message) -> tuple[chatbus.Message, str, bytes]:
        key = (message.stream, message.id)
        hit = self._frames.get(key)
        if hit is not None and hit[0] is message:
            return hit
        text = message_frame(message)
        entry = self._frames[key] = (message, text, text.encode())
        if len(self._frames) > self.size:
            del self._frames[next(iter(self._frames))]
        return entry

    def frame(self, message: chatbus.Message) -> str:
        return self._entry(message)[1]

    def frame_bytes(self, message: chatbus.Message) -> bytes:
        return self._entry(message)[2]


_FRAMES: Final = _FrameCache()


def event_frame(event: chatbus.Event) -> str:
    """The SSE frame of an event: ``event: event`` and its JSON, no ``id:`` line."""
    return format_frame(_dumps(event_json(event)), event="event")


def status_frame(state: str, **details: object) -> str:
    """The SSE ``status`` frame: ``{"state": state, ...details}``."""
    return format_frame(_dumps({"state": state, **details}), event="status")


def end_frame(reason: str, exc: BaseException | None = None) -> str:
    """The SSE ``end`` frame: why the stream stops (the page should not reconnect)."""
    body: dict[str, object] = {"reason": reason}
    if exc is not None:
        body["error"] = type(exc).__name__
        body["detail"] = str(exc)
    return format_frame(_dumps(body), event="end")


# Errors that end a stream, by the reason the page is told. Looked up on chatbus by
# name, so a chatbus without one of them still works.
_ENDING_ERRORS: Final = (
    ("HistoryTruncated", "history_truncated"),
    ("HistoryReset", "history_reset"),
    ("CursorAhead", "cursor_ahead"),
    ("StreamDeleted", "stream_deleted"),
    ("UndecodableMessage", "undecodable_message"),
    ("BusClosed", "bus_closed"),
)


def _ending_reason(exc: BaseException) -> str | None:
    for name, reason in _ENDING_ERRORS:
        cls = getattr(chatbus, name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return reason
    return None


@final
@attrs.define(eq=False)
class _StoreHealth:
    """Pure: turns store counters (failed and attempted store calls, of the subscription
    and of the bus's polls) into reconnecting / ok transitions."""

    quiet: float = _RECOVERY_QUIET
    reconnecting: bool = False
    _errors: int = 0
    _reads_at_error: int = 0
    _error_time: float = 0.0

    def observe(self, store_errors: int, store_reads: int, now: float) -> str | None:
        """Feed the counters; return ``"reconnecting"`` or ``"ok"`` on a change."""
        if store_errors > self._errors:
            self._errors = store_errors
            self._reads_at_error = store_reads
            self._error_time = now
            if not self.reconnecting:
                self.reconnecting = True
                return "reconnecting"
            return None
        if (
            self.reconnecting
            and store_reads > self._reads_at_error
            and now - self._error_time >= self.quiet
        ):
            self.reconnecting = False
            return "ok"
        return None

    def delivered(self) -> str | None:
        """A message came through: the store works."""
        if self.reconnecting:
            self.reconnecting = False
            return "ok"
        return None


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
    following the subscription can find (the cursor past the head, history trimmed,
    the stream deleted) become an ``end`` frame, and the generator stops.

    Each chunk holds every frame ready when it is made. While the room is busy (the
    last chunk carried messages), the generator first waits up to ``flush`` seconds
    so that the messages arriving meanwhile go out in one write: a client of a room
    with 200 messages a second gets about ``1 / flush`` writes a second, not 200.
    That wait is a clock shared by every stream of the trio run with the same
    ``flush``, so 1,000 streams wake once per interval together, not each on a timer
    of its own. A message into a quiet room goes out at once.

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
    subscriber = _subscriber(bus, stream, cursor, events, heartbeat, retry_ms, flush)
    return _frames(bus, subscriber, heartbeat, retry_ms, flush, _TEXT)


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
    subscriber = _subscriber(bus, stream, cursor, events, heartbeat, retry_ms, flush)
    return _frames(bus, subscriber, heartbeat, retry_ms, flush, _BYTES)


def _subscriber(
    bus: chatbus.Bus,
    stream: str,
    cursor: Cursor | None,
    events: bool,
    heartbeat: float,
    retry_ms: int | None,
    flush: float,
) -> chatbus.Subscriber[chatbus.Message | chatbus.Event] | chatbus.Subscriber[chatbus.Message]:
    if not heartbeat > 0:
        raise ValueError(f"heartbeat must be > 0, got {heartbeat}")
    if retry_ms is not None and retry_ms < 0:
        raise ValueError(f"retry_ms must be >= 0, got {retry_ms}")
    if not flush >= 0:
        raise ValueError(f"flush must be >= 0, got {flush}")
    cursor = cursor if cursor is not None else Cursor(after=0)
    return bus.open_subscriber(stream, cursor.after, last=cursor.last, events=events)


_Chunk = TypeVar("_Chunk", str, bytes)


@final
@attrs.frozen
class _Encoding(Generic[_Chunk]):
    """How the generator's chunks are made: text, or UTF-8 bytes."""

    message: Callable[[chatbus.Message], _Chunk]
    other: Callable[[str], _Chunk]
    join: Callable[[list[_Chunk]], _Chunk]


_TEXT: Final = _Encoding[str](_FRAMES.frame, str, "".join)
_BYTES: Final = _Encoding[bytes](_FRAMES.frame_bytes, str.encode, b"".join)


async def _frames(
    bus: chatbus.Bus,
    subscriber: chatbus.Subscriber[chatbus.Message | chatbus.Event]
    | chatbus.Subscriber[chatbus.Message],
    heartbeat: float,
    retry_ms: int | None,
    flush: float,
    encoding: _Encoding[_Chunk],
) -> AsyncGenerator[_Chunk, None]:
    # Poll errors from before this stream (an outage long over) are not news to it.
    health = _StoreHealth(errors=bus.statistics().poll_errors)
    clock = _flush_clock(flush) if flush > 0 else None
    ending: str | None = None
    try:
        async with subscriber as sub:
            # The first chunk goes out once the subscription is open (so a client that
            # has it misses nothing published from then on, even with last=0). Its
            # id is where the stream starts (``last=N`` resolved): a browser that
            # reconnects before any message came resumes there, not at a new tail.
            yield encoding.other(format_frame(retry=retry_ms, comment="chatbus", id=sub.cursor))
            last_sent = trio.current_time()
            last_poll = last_sent
            busy = False
            while True:
                chunk: list[_Chunk] = []
                if busy and clock is not None:
                    # The last chunk carried messages and took all there were: more
                    # are likely on their way. Gather them for the flush interval
                    # rather than wake and write for each one.
                    await clock.wait()
                # Messages already buffered come from receive() at once, each with
                # only a cancellation check before it takes one: take them (and the
                # events due among them) into one chunk with no cancel scope, so a
                # busy stream costs no scope per chunk. Only when none is buffered
                # wait, in a fresh scope around one receive() alone, which can only
                # time out while waiting, with nothing taken. No cancel scope spans
                # a yield.
                ready = _buffered(sub)
                if not ready:
                    with trio.move_on_after(_STATUS_POLL):
                        chunk.append(_frame_of(await sub.receive(), health, chunk, encoding))
                    ready = _buffered(sub) if chunk else 0
                taken = min(ready, _MAX_COALESCE)
                for _ in range(taken):
                    chunk.append(_frame_of(await sub.receive(), health, chunk, encoding))
                # Busy: messages came, and none is left over (a backlog is sent on at
                # once, a chunk of _MAX_COALESCE after another).
                busy = bool(chunk) and taken == ready
                now = trio.current_time()
                if now - last_poll >= _STATUS_POLL or not chunk:
                    last_poll = now
                    # An idle subscription reads nothing, so its own counters cannot
                    # tell that the store went away: the bus's safety-net polls of
                    # the stream heads (every second) can.
                    stats, polls = sub.statistics(), bus.statistics()
                    change = health.observe(
                        stats.store_errors + polls.poll_errors,
                        stats.store_reads + polls.polls,
                        now,
                    )
                    if change is not None:
                        chunk.append(encoding.other(status_frame(change)))
                if not chunk and now - last_sent >= heartbeat:
                    chunk.append(encoding.other(": ping\n\n"))
                if chunk:
                    last_sent = now
                    yield encoding.join(chunk)
    except trio.EndOfChannel:
        ending = end_frame("bus_closed")
    except Exception as exc:
        reason = _ending_reason(exc)
        if reason is None:
            raise
        ending = end_frame(reason, exc)
    if ending is not None:
        yield encoding.other(ending)


def _buffered(sub: chatbus.Subscriber[Any]) -> int:
    # Messages fetched for the consumer: that many receive() calls return at once
    # (an event due among them comes first; an event ahead waits for its message,
    # which is there). Events alone promise nothing: one may wait for a message
    # not fetched yet.
    return sub.statistics().buffered


def _frame_of(
    item: chatbus.Message | chatbus.Event,
    health: _StoreHealth,
    chunk: list[_Chunk],
    encoding: _Encoding[_Chunk],
) -> _Chunk:
    if isinstance(item, chatbus.Message):
        change = health.delivered()
        if change is not None:
            chunk.append(encoding.other(status_frame(change)))
        return encoding.message(item)
    return encoding.other(event_frame(item))
