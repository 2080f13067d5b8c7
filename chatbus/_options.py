"""Option checks and the option records they fill.

Owns: range, whole-number and identifier checks with one wording, the frozen
records holding a bus's validated options, each default stated once, here, and a
URL's password hidden for messages.
Imports nothing from chatbus but :mod:`chatbus._exceptions`'s layer (nothing at all).
"""

from __future__ import annotations

import attrs


def check_range(name: str, value: object, low: float, high: float) -> None:
    """Raise a ValueError naming ``name`` unless ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def check_int_range(name: str, value: object, low: int, high: int) -> None:
    """Like :func:`check_range`, for options that must be whole numbers."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    check_range(name, value, low, high)


def check_identifier(name: str, value: object, *, max_bytes: int) -> str:
    """Return ``value`` if it is 1 to ``max_bytes`` bytes of valid UTF-8 without NULs.

    For names a server stores as identifiers (a Postgres schema, a key prefix).
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (lone surrogate): {value!r}") from None
    if not value or "\x00" in value or size > max_bytes:
        raise ValueError(
            f"{name} must be 1 to {max_bytes} bytes of UTF-8 without NULs, got {value!r}"
        )
    return value


#: Most messages one :meth:`chatbus.Bus.read` call may ask for.
MAX_READ_LIMIT = 10_000
#: Default limit on a body's JSON encoding, in UTF-8 bytes.
DEFAULT_MAX_BODY_BYTES = 256 * 1024
#: Default limit on an event body's JSON encoding (events ride in NOTIFY payloads,
#: at most 8000 bytes with the envelope).
DEFAULT_MAX_EVENT_BYTES = 4000
#: Default bounds on what a stream retains of its events for joiners (count, bytes).
DEFAULT_RETAINED_EVENTS = 1000
DEFAULT_RETAINED_EVENT_BYTES = 1024 * 1024
#: Default time (a day, in seconds, from a message's creation) that the idempotency
#: key of a trimmed message keeps answering a retried publish.
DEFAULT_TRIMMED_KEYS_FOR = 86_400.0


@attrs.frozen(kw_only=True)
class EventRetention:
    """How much of its events a stream keeps for joiners: ``open_bus(event_retention=...)``.

    A subscription opened with ``events=True`` gets, right after catching up, what its
    stream retained (the parts of a reply so far, the latest value of each key). Per
    stream at most ``max_events`` events and ``max_bytes`` bytes of them (UTF-8, as
    sent) are kept; past either bound the oldest go first. The bus that flushes
    events applies its own bounds to their streams (give every bus of a deployment
    the same). On Postgres a stream over a bound is cut to 9/10 of it at once (ranking
    a stream's events costs O(events), so it is not done on every flush).

    Attributes:
        max_events: Most events retained per stream (1..100000; default 1000).
        max_bytes: Most bytes of events retained per stream (1..64 MiB; default 1 MiB).
            An event bigger than that alone is not retained (it is still delivered).
    """

    max_events: int = DEFAULT_RETAINED_EVENTS
    max_bytes: int = DEFAULT_RETAINED_EVENT_BYTES

    def __attrs_post_init__(self) -> None:
        check_int_range("max_events", self.max_events, 1, 100_000)
        check_int_range("max_bytes", self.max_bytes, 1, 64 * 1024 * 1024)


@attrs.frozen(kw_only=True)
class BusOptions:
    """A bus's tuning knobs, validated (see :func:`chatbus.open_bus` for their meaning)."""

    cache_size: int = 256
    max_batch: int = 256
    max_pending: int = 4096
    read_batch: int = 256
    max_concurrent_reads: int = 8
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    poll_interval: float | None = 1.0
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    event_buffer: int = 256
    outbox_size: int = 10_000
    event_retention: EventRetention = EventRetention()
    #: Seconds a trimmed message's idempotency key still answers retries (None: ever).
    trimmed_keys_for: float | None = DEFAULT_TRIMMED_KEYS_FOR

    def __attrs_post_init__(self) -> None:
        check_int_range("cache_size", self.cache_size, 1, 1_000_000)
        check_int_range("max_batch", self.max_batch, 1, 100_000)
        check_int_range("max_pending", self.max_pending, 1, 1_000_000)
        check_int_range("read_batch", self.read_batch, 1, MAX_READ_LIMIT)
        check_int_range("max_concurrent_reads", self.max_concurrent_reads, 1, 1000)
        check_int_range("max_body_bytes", self.max_body_bytes, 1, 64 * 1024 * 1024)
        if self.poll_interval is not None:
            check_range("poll_interval", self.poll_interval, 0.001, 86_400)
        check_int_range("max_event_bytes", self.max_event_bytes, 1, 6000)
        check_int_range("event_buffer", self.event_buffer, 1, 1_000_000)
        check_int_range("outbox_size", self.outbox_size, 1, 10_000_000)
        if not isinstance(self.event_retention, EventRetention):
            raise TypeError(
                "event_retention must be a chatbus.EventRetention,"
                f" not {type(self.event_retention).__name__}"
            )
        if self.trimmed_keys_for is not None:
            check_range("trimmed_keys_for", self.trimmed_keys_for, 0, 10 * 366 * 86_400)


def redacted_url(url: str) -> str:
    """``url`` (``scheme://[user[:password]@]hosts/...``) with its password as
    ``***``, for messages that may end up in logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hosts}"
