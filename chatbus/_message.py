"""Values: committed messages, drafts waiting to be appended, and their validation.

Owns: :class:`Message`, :class:`Draft`, and the checks of stream names, cursors,
keys and bodies. Imports only :mod:`chatbus._exceptions` and :mod:`chatbus._options`.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
from collections.abc import Callable
from typing import Any, Final

import attrs

from ._exceptions import (
    CursorAhead,
    HistoryReset,
    HistoryTruncated,
    InvalidMessage,
    InvalidStream,
    MessageTooLarge,
)

#: Longest accepted stream name, in characters.
MAX_STREAM_LENGTH = 256
#: Longest accepted idempotency key, in characters.
MAX_KEY_LENGTH = 256
#: Deepest accepted nesting of arrays and objects in a body. Decoding is recursive:
#: a body that encodes in the caller's stack must decode in any reader's, too.
MAX_BODY_DEPTH = 100
#: Largest id a store can hold (PostgreSQL bigint).
MAX_ID = 2**63 - 1
#: Most digits of an integer in a body: Python's default int-to-str limit, so that a
#: body one process can write every process can read, whatever its own limit.
MAX_INT_DIGITS = 4300

#: One encoder for every body (``json.dumps`` with options builds a new one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_LONG_NUMBER = re.compile(r"\d{" + str(MAX_INT_DIGITS + 1) + ",}")


def _make_fast_encoder() -> Any:
    """:data:`_ENCODER` without the layers :meth:`json.JSONEncoder.encode` adds on every
    call (it builds a new C encoder each time); None where there is no C encoder.

    It checks no circular references (``markers`` None): a circular body raises
    RecursionError here, and the exact path (:data:`_ENCODER`) then names it.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has it
        return None
    default = _ENCODER.default
    return make(None, default, json.encoder.encode_basestring, None, ":", ",", False, False, False)


_FAST_ENCODER: Final = _make_fast_encoder()


@attrs.frozen(kw_only=True)
class Message:
    """A committed message.

    Attributes:
        stream: The stream (chat, room) the message belongs to.
        id: Its position in the stream: 1, 2, 3, … with no holes.
        body: The decoded JSON value that was published. Treat it as read-only: the
            same object may be handed to every local subscriber.
        key: The idempotency key it was published with, if any.
        created_at: When the store committed it (UTC). Never earlier than the
            ``created_at`` of a lower id of the same stream.
        replay: True only on what :meth:`~chatbus.Publisher.publish` returns when the
            key had been used already: nothing new was stored and this is the
            original message (as a JetStream ack says ``duplicate``). Messages read
            or received are never replays. Not part of equality.
        redacted: The message was redacted: its body is now None (a tombstone);
            id, key and created_at are kept.
    """

    stream: str
    id: int
    body: Any
    key: str | None
    created_at: datetime.datetime
    replay: bool = attrs.field(default=False, eq=False)
    redacted: bool = False

    @classmethod
    def from_row(
        cls,
        stream: str,
        id: int,
        body: Any,
        key: str | None,
        created_at: datetime.datetime,
    ) -> Message:
        """Build a message from a store row (``body`` already decoded; not a replay,
        not redacted). The same value as ``Message(...)``, made quicker: see
        :data:`make_message`."""
        if cls is not Message:  # a subclass: its own __init__
            return cls(stream=stream, id=id, body=body, key=key, created_at=created_at)
        return make_message(stream, id, body, key, created_at)


def _message_maker() -> Callable[[str, int, Any, str | None, datetime.datetime], Message]:
    """A positional maker of committed messages (not replays, not redacted), for the
    append and read paths (once per message): the same value as ``Message(...)``, made
    about twice as fast by setting its slots directly rather than through attrs'
    frozen ``__init__`` (a named ``object.__setattr__`` per field)."""
    names = tuple(field.name for field in attrs.fields(Message))
    assert names == ("stream", "id", "body", "key", "created_at", "replay", "redacted"), names
    new = object.__new__
    s0, s1, s2, s3, s4, s5, s6 = (Message.__dict__[name].__set__ for name in names)

    def make(
        stream: str, id: int, body: Any, key: str | None, created_at: datetime.datetime
    ) -> Message:
        message: Message = new(Message)
        s0(message, stream)
        s1(message, id)
        s2(message, body)
        s3(message, key)
        s4(message, created_at)
        s5(message, False)
        s6(message, False)
        return message

    return make


#: ``Message(stream=…, id=…, body=…, key=…, created_at=…)`` with positional
#: arguments, quicker (see _message_maker).
make_message: Final = _message_maker()


@attrs.frozen(kw_only=True)
class StreamInfo:
    """Where a stream stands (see :meth:`chatbus.Bus.stream_info`).

    Attributes:
        stream: The stream.
        head: Its highest id (0 if it has no messages).
        first_id: Its first retained id: ``head + 1`` when everything was trimmed,
            1 when nothing was.
        epoch: Identifies this history of the stream: it changes when the stream is
            deleted and created again. 0 for a stream that does not exist. Keep it
            with a cursor: ``open_subscriber(..., after=k, epoch=e)``.
        exists: Whether the stream exists (has or had messages since it was made).
        reset_by_store: The store itself started this epoch, without a delete: it
            found the stream on another server process than before (a Redis
            restart, failover or slot migration in fast mode), so messages a reader
            saw in the epoch before may be gone.
    """

    stream: str
    head: int
    first_id: int
    epoch: int
    exists: bool
    reset_by_store: bool = False


class Appended(list[Message]):
    """What this package's stores return from an append: the messages, and the epoch
    of the history they were stored in (None: not known), so that a bus never puts
    them in a cache of another history (see :meth:`chatbus._topic.Topic.committed`):
    a delete and a new history by another process can come before their notice. A
    store that returns a plain list is trusted as before."""

    __slots__ = ("epoch",)

    def __init__(self, messages: list[Message], epoch: int | None) -> None:
        super().__init__(messages)
        self.epoch = epoch


@attrs.frozen(kw_only=True)
class Draft:
    """A validated message waiting to be appended: JSON text plus idempotency key."""

    body_json: str
    key: str | None


def _draft_maker() -> Callable[[str, str | None], Draft]:
    """``Draft(body_json=…, key=…)`` made quicker, as :func:`_message_maker` does it (one
    per publish)."""
    names = tuple(field.name for field in attrs.fields(Draft))
    assert names == ("body_json", "key"), names
    new = object.__new__
    s0, s1 = (Draft.__dict__[name].__set__ for name in names)

    def make(body_json: str, key: str | None) -> Draft:
        draft: Draft = new(Draft)
        s0(draft, body_json)
        s1(draft, key)
        return draft

    return make


_make_draft_value: Final = _draft_maker()


def check_stream(stream: object) -> str:
    """Return ``stream`` if it is a valid stream name, else raise :class:`InvalidStream`."""
    if not isinstance(stream, str):
        raise InvalidStream(f"stream name must be a str, not {type(stream).__name__}")
    if not stream:
        raise InvalidStream("stream name must not be empty")
    if len(stream) > MAX_STREAM_LENGTH:
        raise InvalidStream(
            f"stream name is {len(stream)} characters long; the limit is {MAX_STREAM_LENGTH}"
        )
    _check_text(stream, "stream name", InvalidStream)
    return stream


def check_after(after: object, name: str = "after") -> int:
    """Return ``after`` if it is a valid cursor (an int >= 0); errors call it ``name``."""
    if isinstance(after, bool) or not isinstance(after, int):
        raise TypeError(f"{name} must be an int, not {type(after).__name__}")
    if not 0 <= after <= MAX_ID:
        raise ValueError(f"{name} must be >= 0 and <= {MAX_ID}, got {after}")
    return after


def check_read(stream: object, after: object, limit: object) -> None:
    """Check a store read's arguments (:meth:`chatbus.Store.read`): a valid stream name,
    cursor, and ``limit`` an int >= 0."""
    check_stream(stream)
    check_after(after)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an int >= 0, got {limit!r}")


def check_epoch(info: StreamInfo, epoch: int | None, after: int) -> None:
    """Raise :class:`HistoryReset` unless ``epoch`` (if given) is ``info``'s epoch.

    Epoch 0 (the stream did not exist) with cursor 0 (nothing seen) fits any history:
    a client that stored them before the first message has missed nothing.
    """
    if epoch is not None and info.epoch != epoch and not (epoch == 0 and after == 0):
        raise HistoryReset(
            f"stream {info.stream!r} is at epoch {info.epoch}, not {epoch}: its history"
            f" was replaced ({_why_reset(info)}); start again from stream_info",
            info.stream,
            info.epoch,
        )


def _why_reset(info: StreamInfo) -> str:
    """Why ``info``'s epoch is not an earlier one (for error messages)."""
    if not info.exists:
        return "deleted"
    if info.reset_by_store:
        return (
            "the store found it on another server process, after a restart, failover"
            " or slot migration, and may have lost messages acknowledged before"
        )
    return "deleted and created again"


def check_cursor(info: StreamInfo, after: int) -> None:
    """Raise unless ``after`` is a cursor of ``info``'s stream as it stands.

    Raises:
        CursorAhead: ``after`` is past the head.
        HistoryTruncated: the messages after ``after`` were trimmed away (a cursor of
            0 means "from the start" and is always fine).
    """
    if after > info.head:
        raise CursorAhead(
            f"cursor {after} is past the head of stream {info.stream!r}, which is"
            f" {info.head}: it belongs to another history (a restored database, a"
            " recreated stream?)",
            info.stream,
            info.head,
        )
    if 0 < after < info.first_id - 1:
        raise HistoryTruncated(
            f"the messages of stream {info.stream!r} after {after} were trimmed; the"
            f" first retained one is {info.first_id}",
            info.stream,
            info.first_id,
        )


def check_before(info: StreamInfo, before: int) -> None:
    """Raise unless ``info``'s stream has messages below ``before`` to scroll back to
    (or ``before`` is where it starts).

    Raises:
        CursorAhead: ``before`` is past head + 1 (the id of the next message).
        HistoryTruncated: the messages below ``before`` were trimmed away (there is
            none below id 1, nor in a stream never trimmed: an empty page, no error).
    """
    if before > info.head + 1:
        raise CursorAhead(
            f"before={before} is past the next id of stream {info.stream!r}, whose head"
            f" is {info.head}: it belongs to another history (a restored database, a"
            " recreated stream?)",
            info.stream,
            info.head,
        )
    if 1 < before <= info.first_id:
        raise HistoryTruncated(
            f"the messages of stream {info.stream!r} before {before} were trimmed; the"
            f" first retained one is {info.first_id}",
            info.stream,
            info.first_id,
        )


def make_draft(body: object, key: object, *, max_body_bytes: int) -> Draft:
    """Validate and encode one message, raising before anything is stored."""
    if key is not None:
        if not isinstance(key, str):
            raise InvalidMessage(f"key must be a str or None, not {type(key).__name__}")
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidMessage(f"key must be 1 to {MAX_KEY_LENGTH} characters long")
        _check_text(key, "key", InvalidMessage)
    if (body_json := _fast_body_json(body, max_body_bytes)) is not None:
        return _make_draft_value(body_json, key)
    try:
        body_json = _ENCODER.encode(body)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"body is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidMessage(
            f"body is nested too deeply; the limit is {MAX_BODY_DEPTH} levels"
        ) from None
    if body_json.count("[") + body_json.count("{") > MAX_BODY_DEPTH:
        depth = _nesting_depth(body_json)
        if depth > MAX_BODY_DEPTH:
            raise InvalidMessage(
                f"body is nested {depth} levels deep; the limit is {MAX_BODY_DEPTH}"
            )
    if len(body_json) > MAX_INT_DIGITS and _LONG_NUMBER.search(_STRINGS.sub("", body_json)):
        raise InvalidMessage(
            f"body has an integer of more than {MAX_INT_DIGITS} digits, which Python"
            " processes with the default int_max_str_digits cannot read"
        )
    size = _check_text(body_json, "body", InvalidMessage)
    if size > max_body_bytes:
        raise MessageTooLarge(f"body is {size} bytes as JSON; the limit is {max_body_bytes} bytes")
    return Draft(body_json=body_json, key=key)


def _fast_body_json(body: object, max_body_bytes: int) -> str | None:
    """The common case of :func:`make_draft`'s body checks, or None when the exact
    checks must run (anything unusual: they raise, or agree).

    Fast only for ASCII JSON short enough that no integer in it can be too long and no
    limit is near, shallow enough that its depth needs no count. JSON text has no raw
    NUL (the encoder escapes control characters) and ASCII has no lone surrogate:
    then nothing else is left to check.
    """
    if _FAST_ENCODER is None:  # pragma: no cover - CPython has it
        return None
    try:
        body_json: str = "".join(_FAST_ENCODER(body, 0))
    except Exception:  # RecursionError included: the exact path says what is wrong
        return None
    if (
        len(body_json) > min(max_body_bytes, MAX_INT_DIGITS)
        or not body_json.isascii()
        or body_json.count("[") + body_json.count("{") > MAX_BODY_DEPTH
    ):
        return None
    return body_json


def encode_body(body: object) -> str:
    """``body`` as the JSON text chatbus stores (compact, UTF-8, dict order kept).

    Decoding a stored body and encoding it again gives back the stored text, so two
    bodies are the same message exactly when their encodings are equal (``true`` is
    not ``1``).
    """
    return _ENCODER.encode(body)


def _check_text(text: str, what: str, error: type[Exception]) -> int:
    """Raise ``error`` if ``text`` has a NUL or a lone surrogate; return its UTF-8 size."""
    if "\x00" in text:
        raise error(f"{what} must not contain NUL characters")
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise error(f"{what} is not valid Unicode (lone surrogate)") from None


def _nesting_depth(body_json: str) -> int:
    """Deepest nesting of arrays and objects in a JSON text (strings skipped)."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", body_json))
    steps = (1 if bracket in "[{" else -1 for bracket in brackets)
    return max(itertools.accumulate(steps, initial=0))
