"""The resume cursor of an SSE request: ``chatbus.sse``'s :class:`Cursor`,
:class:`InvalidCursor` and :func:`parse_cursor` (re-exported there; documented in
its module doc). Pure parsing: no I/O.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from ._message import MAX_ID

#: Largest ``last`` accepted from a request (a page opens at its last few dozen).
MAX_LAST: Final = 10_000

_DIGITS: Final = re.compile(r"[0-9]{1,19}")
# A resume id: ``<message id>`` or ``<message id>:<epoch>`` (see the module's doc).
_RESUME_ID: Final = re.compile(r"([0-9]{1,19})(?::([0-9]{1,19}))?")


class InvalidCursor(ValueError):
    """The resume cursor of a request is not valid (answer it with 400)."""


@attrs.frozen(kw_only=True)
class Cursor:
    """Where an SSE stream starts: after a message id, or at the last N messages.

    Attributes:
        after: Start after this message id (exclusive with ``last``).
        last: Start at the stream's last ``last`` messages (0: only new ones).
        epoch: The stream's epoch ``after`` belongs to (from an ``<id>:<epoch>``
            resume id), or None: then ``after`` is checked only against the head.
        source: Where it came from: ``"last-event-id"``, ``"after"``, ``"last"`` or
            ``"default"``.
    """

    after: int | None = None
    last: int | None = None
    epoch: int | None = None
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


def _parse_resume_id(name: str, value: str, source: str) -> Cursor:
    """``<message id>`` or ``<message id>:<epoch>`` (what :func:`sse_stream` sends)."""
    match = _RESUME_ID.fullmatch(value.strip())
    if match is None:
        raise InvalidCursor(
            f"{name} must be a message id, or a message id and an epoch as"
            f" '<id>:<epoch>' (whole numbers), got {value[:60]!r}"
        )
    after, epoch = int(match[1]), None if match[2] is None else int(match[2])
    for what, number in (("message id", after), ("epoch", epoch)):
        if number is not None and number > MAX_ID:
            raise InvalidCursor(f"{name}: the {what} must be from 0 to {MAX_ID}, got {number}")
    return Cursor(after=after, epoch=epoch, source=source)


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

    The header and ``after`` take either form of a resume id: ``<id>:<epoch>`` (what
    :func:`sse_stream` sends; the stream then resumes only in that epoch's history)
    or a plain ``<id>`` (an older client, or a hand-made ``?after=``: checked only
    against the head).

    Args:
        last_event_id: The ``Last-Event-ID`` header value, or None.
        after: The ``after`` query value: the last message id already seen (or
            ``<id>:<epoch>``).
        last: The ``last`` query value: start at the stream's last N messages.
        default: The cursor when none is given (default: after 0, all history).

    Returns:
        The cursor.

    Raises:
        InvalidCursor: a value is not a whole number in range, or both ``after`` and
            ``last`` are given (without the header).
    """
    if last_event_id is not None and last_event_id.strip():
        return _parse_resume_id("Last-Event-ID", last_event_id, "last-event-id")
    if after is not None and last is not None:
        raise InvalidCursor("pass after or last, not both")
    if after is not None:
        return _parse_resume_id("after", after, "after")
    if last is not None:
        return Cursor(last=_parse_count("last", last, low=0, high=MAX_LAST), source="last")
    return default if default is not None else Cursor(after=0)
