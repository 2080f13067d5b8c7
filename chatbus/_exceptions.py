"""The exceptions chatbus raises, and the one wording of a store failure.

Channel semantics reuse trio's own exceptions (``trio.EndOfChannel``,
``trio.ClosedResourceError``); everything else is a :class:`BusError`. Imports
nothing from chatbus.
"""

from __future__ import annotations


class BusError(Exception):
    """Base class of every error chatbus raises on purpose."""


class BusClosed(BusError):
    """The bus, publisher or subscriber was closed before the operation could finish.

    A publish that fails with this error may or may not have been committed when the
    message says so; retry it with the same idempotency key to find out safely.
    """


class InvalidStream(BusError, ValueError):
    """A stream name is not a non-empty string of at most 256 characters without NULs."""


class InvalidMessage(BusError, ValueError, TypeError):
    """A message body or idempotency key cannot be stored.

    It is also a :class:`ValueError` and a :class:`TypeError`, so code written against
    :func:`json.dumps`'s own errors keeps working.
    """


class MessageTooLarge(BusError, ValueError):
    """A message body's JSON encoding is larger than the bus's ``max_body_bytes``."""


class StoreError(BusError):
    """The store failed: a database error, a lost connection, a broken invariant.

    The original exception is chained as ``__cause__``.
    """


class OutcomeUnknown(BusError):
    """A publish's outcome is unknown: it may or may not have been committed.

    Raised when the connection was lost after the append reached the server and the
    store could not find out whether it committed. Not a :class:`StoreError` (which
    means nothing was stored): retrying an unkeyed publish after this may store it
    twice. Retry with the same idempotency key to learn the outcome safely.
    """


class IdempotencyConflict(BusError, ValueError):
    """An idempotency key was reused with a different body.

    The key's original message stays as it was, and nothing new was stored. A retry
    must send the same body as the first attempt; a new message needs a new key.

    Attributes:
        original: The message stored under the key.
    """

    def __init__(self, message: str, original: object) -> None:
        super().__init__(message)
        self.original = original


class UndecodableMessage(StoreError):
    """A stored message's body cannot be decoded here (so it is never skipped silently).

    Attributes:
        stream: The stream holding it.
        id: Its id: the messages before it were delivered; it and those after were not.
    """

    def __init__(self, message: str, stream: str, id: int) -> None:
        super().__init__(message)
        self.stream = stream
        self.id = id


class HistoryTruncated(BusError):
    """Messages a cursor needs were trimmed away: the history starts later now.

    Raised by reads and subscriptions instead of jumping silently over the gap. The
    caller decides: reload from ``first_id`` (``after=first_id - 1``) or show a gap.

    Attributes:
        stream: The stream.
        first_id: The first message still retained.
    """

    def __init__(self, message: str, stream: str, first_id: int) -> None:
        super().__init__(message)
        self.stream = stream
        self.first_id = first_id


class CursorAhead(BusError, ValueError):
    """A cursor is past the stream's head: it belongs to another history.

    (A cursor kept from a restored database, a recreated room, a typo.) Waiting would
    silently skip the messages up to the cursor when they come, so this is an error.

    Attributes:
        stream: The stream.
        head: The stream's highest id now.
    """

    def __init__(self, message: str, stream: str, head: int) -> None:
        super().__init__(message)
        self.stream = stream
        self.head = head


class HistoryReset(BusError):
    """The stream's history is not the one a cursor or subscription was in.

    Its epoch changed: it was deleted (and maybe recreated under the same name), or
    lost acknowledged history. Start again from the new epoch (``stream_info``).

    Attributes:
        stream: The stream.
        epoch: The stream's epoch now (0: it does not exist).
    """

    def __init__(self, message: str, stream: str, epoch: int) -> None:
        super().__init__(message)
        self.stream = stream
        self.epoch = epoch


class StreamDeleted(HistoryReset):
    """The stream was deleted while a subscription followed it."""


def store_error(operation: str, cause: BaseException, *, stream: str | None = None) -> StoreError:
    """The :class:`StoreError` for ``operation`` (``"append"``, ``"read"``, …) failing.

    Every backend words its failures through here, once: ``append on stream 'x'
    failed: OperationalError: server closed the connection``.
    """
    where = "" if stream is None else f" on stream {stream!r}"
    detail = f"{type(cause).__name__}: {cause}".strip().rstrip(":")
    error = StoreError(f"{operation}{where} failed: {detail}")
    error.__cause__ = cause
    return error
