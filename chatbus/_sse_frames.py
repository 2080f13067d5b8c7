"""SSE frames: the wire format, the JSON shapes and the per-process frame cache
(private; the public names are documented and exported by :mod:`chatbus.sse`).

Owns: :func:`format_frame` and the frames built on it (message, event, status, end),
the resume id of a frame (:func:`resume_id`), the JSON shape of a message and an
event, the per-process cache that encodes each message's frame once as text and as
UTF-8 (:class:`_FrameCache`), and the text or bytes encodings of the generator's
chunks (:class:`_Encoding`). Imports the public chatbus API only.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar, final

import attrs

import chatbus


def resume_id(after: int, epoch: int | None) -> str:
    """The SSE ``id:`` of a point in a stream: ``<after>:<epoch>`` (``<after>`` alone
    when the store has no epochs). :func:`parse_cursor` reads both forms back."""
    return str(after) if epoch is None else f"{after}:{epoch}"


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

    ``emitter`` and ``seq`` name the event once (:attr:`chatbus.Event.origin`): a page
    that reconnects is a joiner again, and gets the retained parts of a reply in
    progress once more; one that appends parts skips those it has shown.

    Returns:
        ``{"stream", "after", "body", "key", "ttl", "created_at", "emitter", "seq"}``.
    """
    return {
        "stream": event.stream,
        "after": event.after,
        "body": event.body,
        "key": event.key,
        "ttl": event.ttl,
        "created_at": _time(event.created_at),
        "emitter": event.emitter,
        "seq": event.seq,
    }


def _dumps(value: object) -> str:
    # Compact, and never a raw line break (json escapes them inside strings).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def message_frame(message: chatbus.Message, epoch: int | None = None) -> str:
    """The SSE frame of a message: ``id:``, ``event: message`` and its JSON.

    The id is :func:`resume_id` of the message's id and ``epoch``, the epoch of the
    history it belongs to (``Subscriber.epoch``; None: the id alone).
    """
    return format_frame(
        _dumps(message_json(message)), event="message", id=resume_id(message.id, epoch)
    )


@final
@attrs.define(eq=False)
class _FrameCache:
    """The frames of recent messages, as text and as UTF-8: a message reaching 1,000
    local subscribers is encoded once (a bus hands every local subscriber the same
    Message object), and its bytes are shared by every response that writes it."""

    size: int = 1024
    _frames: dict[tuple[str, int], tuple[chatbus.Message, int | None, str, bytes]] = attrs.field(
        factory=dict
    )

    def _entry(
        self, message: chatbus.Message, epoch: int | None
    ) -> tuple[chatbus.Message, int | None, str, bytes]:
        key = (message.stream, message.id)
        hit = self._frames.get(key)
        if hit is not None and hit[0] is message and hit[1] == epoch:
            return hit
        text = message_frame(message, epoch)
        entry = self._frames[key] = (message, epoch, text, text.encode())
        if len(self._frames) > self.size:
            del self._frames[next(iter(self._frames))]
        return entry

    def frame(self, message: chatbus.Message, epoch: int | None) -> str:
        return self._entry(message, epoch)[2]

    def frame_bytes(self, message: chatbus.Message, epoch: int | None) -> bytes:
        return self._entry(message, epoch)[3]


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


_Chunk = TypeVar("_Chunk", str, bytes)


@final
@attrs.frozen
class _Encoding(Generic[_Chunk]):
    """How the generator's chunks are made: text, or UTF-8 bytes."""

    message: Callable[[chatbus.Message, int | None], _Chunk]
    other: Callable[[str], _Chunk]
    join: Callable[[list[_Chunk]], _Chunk]


_TEXT: Final = _Encoding[str](_FRAMES.frame, str, "".join)
_BYTES: Final = _Encoding[bytes](_FRAMES.frame_bytes, str.encode, b"".join)
