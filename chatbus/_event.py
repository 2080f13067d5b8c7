"""Events: ephemeral, positioned values beside a stream's durable messages.

Owns: the :class:`Event` value, the validation of what is emitted, the wire encoding
every networked backend shares (:func:`encode_events`, :func:`decode_events`; a
flush's texts made on first read, :class:`EncodedEvents`), and
the retention rule for joiners (:class:`RetainedEvents`, pure). Imports only
:mod:`chatbus._exceptions`, :mod:`chatbus._options` and :mod:`chatbus._message`.

Where an event sits: it carries ``after``, the id of the last durable message of its
stream when it was emitted (as the emitter's bus knew it). A consumer gets an unkeyed
event after message ``after`` and before message ``after + 1``, or not at all; a keyed
event is latest-value state ("status", "typing:al") and is never dropped for being
late, only for being replaced or expiring.
"""

from __future__ import annotations

import collections
import datetime
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, NamedTuple, final, overload

import attrs

from ._exceptions import InvalidMessage, MessageTooLarge
from ._message import MAX_BODY_DEPTH, MAX_ID, MAX_INT_DIGITS, make_draft
from ._options import DEFAULT_RETAINED_EVENT_BYTES, DEFAULT_RETAINED_EVENTS

#: Largest accepted ``ttl``, in seconds (a day).
MAX_TTL: Final = 86_400.0
#: The default bounds of what a stream retains for joiners (count, bytes); see
#: :class:`chatbus.EventRetention`.
RETAINED_EVENTS: Final = DEFAULT_RETAINED_EVENTS
RETAINED_EVENT_BYTES: Final = DEFAULT_RETAINED_EVENT_BYTES
#: Most bytes of one encoded notification of events (Postgres allows 8000).
MAX_PAYLOAD_BYTES: Final = 7900
#: Most bytes of one encoded event: it must fit a notification on its own.
MAX_EVENT_WIRE_BYTES: Final = MAX_PAYLOAD_BYTES - len('{"events":[]}') - 1

_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND: Final = datetime.timedelta(microseconds=1)


@attrs.frozen(kw_only=True)
class Event:
    """An ephemeral event: never stored as a message, delivered at most once.

    Attributes:
        stream: The stream it belongs to.
        after: The id of the last durable message of the stream when it was emitted
            (as the emitter's bus knew it): it reaches a consumer after that message
            and, if unkeyed, before the next one, or not at all.
        body: The decoded JSON value that was emitted. Treat it as read-only: the
            same object is what :meth:`~chatbus.Bus.emit` returns and what every local
            subscriber gets (a copy of what the emitter passed, never that object).
        key: For latest-value state (``"status"``, ``"typing:al"``): a later event
            with the same key replaces it for joiners. None for a plain event.
        ttl: Seconds the event stays retained for joiners, or None (keyed: until
            replaced; unkeyed: until the next message).
        created_at: When it was emitted (UTC, the emitter's clock).
        emitter: Identifies the bus that emitted it (one per :func:`chatbus.open_bus`).
        seq: Its position among that emitter's events: 1, 2, 3, …
    """

    stream: str
    after: int
    body: Any
    key: str | None
    ttl: float | None
    created_at: datetime.datetime
    emitter: str
    seq: int

    @property
    def expires_at(self) -> datetime.datetime | None:
        """When an event with a ``ttl`` stops being retained (None: no expiry)."""
        if self.ttl is None:
            return None
        return self.created_at + datetime.timedelta(seconds=self.ttl)

    @property
    def origin(self) -> tuple[str, int]:
        """``(emitter, seq)``: unique per event, ordered per emitter."""
        return self.emitter, self.seq


def _event_maker() -> Callable[..., Event]:
    """A positional maker of :class:`Event` values, for the emit path (once per event):
    the same value as ``Event(...)``, made twice as fast by setting its slots directly
    rather than through attrs' frozen ``__init__`` (a named ``object.__setattr__`` per
    field). Arguments in field order."""
    names = tuple(field.name for field in attrs.fields(Event))
    assert names == (
        "stream", "after", "body", "key", "ttl", "created_at", "emitter", "seq"
    ), names  # fmt: skip
    new = object.__new__
    s0, s1, s2, s3, s4, s5, s6, s7 = (Event.__dict__[name].__set__ for name in names)

    def make(
        stream: str,
        after: int,
        body: Any,
        key: str | None,
        ttl: float | None,
        created_at: datetime.datetime,
        emitter: str,
        seq: int,
    ) -> Event:
        event: Event = new(Event)
        s0(event, stream)
        s1(event, after)
        s2(event, body)
        s3(event, key)
        s4(event, ttl)
        s5(event, created_at)
        s6(event, emitter)
        s7(event, seq)
        return event

    return make


#: ``Event(stream=…, after=…, …)`` with positional arguments, quicker (see _event_maker).
make_event: Final = _event_maker()


class EventDraft(NamedTuple):
    """A validated event body waiting for its position: JSON text, key and ttl.

    (A named tuple, not an attrs class: one is made per emit.)
    """

    body_json: str
    key: str | None
    ttl: float | None


def _make_fast_encoder() -> Any:
    """``encode_body``'s encoder without the layers :meth:`json.JSONEncoder.encode` adds
    on every call (it builds a new C encoder each time); None where there is no C
    encoder. Circular bodies raise RecursionError here: the slow path names them."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has it
        return None
    default = json.JSONEncoder().default
    return make(None, default, json.encoder.encode_basestring, None, ":", ",", False, False, False)


_FAST_ENCODER: Final = _make_fast_encoder()
#: Decodes a body's JSON text (a fresh copy for subscribers): json.loads without its
#: checks (the text is our own encoding).
_DECODER: Final[Any] = json.decoder.JSONDecoder()
_SCAN: Final[Callable[[str, int], tuple[Any, int]]] = _DECODER.scan_once
#: Body types an event shares with its subscribers as is (JSON decodes them equal).
_IMMUTABLE_JSON: Final = frozenset({str, int, float, bool, type(None)})


def copy_body(body: object, body_json: str) -> Any:
    """What subscribers get of an emitted ``body`` (encoded as ``body_json``): the body
    itself if it is immutable, else a decoded copy, as another process would see it."""
    kind = type(body)
    if kind in _IMMUTABLE_JSON:
        return body
    if kind is dict:  # a flat object of str keys and immutable values: a shallow copy
        for name, value in body.items():  # type: ignore[attr-defined]
            if type(name) is not str or type(value) not in _IMMUTABLE_JSON:
                break
        else:
            return body.copy()  # type: ignore[attr-defined]
    return _SCAN(body_json, 0)[0]


def fast_body_json(body: object, max_event_bytes: int) -> str | None:
    """The common case of :func:`chatbus._message.make_draft` for an event body, or
    None when the exact checks must run (anything unusual: they raise or agree).

    Fast only for ASCII JSON short enough that no integer in it can be too long,
    shallow enough that its depth needs no count: then make_draft checks nothing else.
    """
    if _FAST_ENCODER is None:  # pragma: no cover
        return None
    try:
        body_json: str = "".join(_FAST_ENCODER(body, 0))
    except Exception:  # RecursionError included: the slow path says what is wrong
        return None
    size = len(body_json)
    if (
        size > max_event_bytes
        or size > MAX_INT_DIGITS
        or not body_json.isascii()
        # Deeper than MAX_BODY_DEPTH takes more brackets than that: a text no longer
        # (most streamed parts) needs no count. This runs once per emit.
        or (size > MAX_BODY_DEPTH and body_json.count("[") + body_json.count("{") > MAX_BODY_DEPTH)
        or "u0000" in body_json  # maybe a NUL: make_event_draft says
    ):
        return None
    return body_json


#: U+0000 as JSON text writes it: ``\u0000`` after an even number of backslashes
#: (an odd number before it would make the first of them escape another).
_ESCAPED_NUL: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def make_event_draft(
    body: object, key: object, ttl: object, *, max_event_bytes: int
) -> EventDraft:
    """Validate one event before anything is sent.

    Raises:
        InvalidMessage: ``body`` is not JSON-serialisable, or ``key`` is not valid.
        MessageTooLarge: ``body`` encodes to more than ``max_event_bytes``.
        ValueError: ``ttl`` is not a positive number of seconds (up to a day); one
            that is not a number at all raises :class:`InvalidMessage`, which is a
            ValueError and a TypeError.
    """
    if key is None and ttl is None:
        body_json = fast_body_json(body, max_event_bytes)
        if body_json is not None:
            return EventDraft(body_json, None, None)
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise InvalidMessage(
                f"ttl must be a number of seconds or None, not {type(ttl).__name__}"
            )
        if not (0 < ttl <= MAX_TTL) or math.isnan(ttl):
            raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL:g} seconds, got {ttl}")
    try:
        draft = make_draft(body, key, max_body_bytes=max_event_bytes)
    except MessageTooLarge as exc:
        raise MessageTooLarge(str(exc).replace("body is", "event body is", 1)) from None
    except InvalidMessage as exc:
        raise InvalidMessage(str(exc).replace("body", "event body", 1)) from None
    if "u0000" in draft.body_json and _ESCAPED_NUL.search(draft.body_json):
        # Refused on every backend alike: Postgres keeps events as jsonb, which cannot
        # hold U+0000, and one such event failed its whole flush, or the appends it
        # rode in (found by a review). A message body may hold it (json keeps it).
        raise InvalidMessage("event body must not contain NUL characters (U+0000)")
    return EventDraft(draft.body_json, draft.key, None if ttl is None else float(ttl))


def to_micros(ts: datetime.datetime) -> int:
    """Microseconds since the Unix epoch (exact)."""
    return (ts - _EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime.datetime:
    """The UTC datetime ``micros`` microseconds after the Unix epoch."""
    if 0 <= micros < _EXACT_TIMESTAMPS:
        # Three times quicker, and exact here: seconds below 2**32 carry a double's
        # rounding error under 0.25 µs, and fromtimestamp rounds to the nearest µs.
        return _FROM_TIMESTAMP(micros / 1_000_000, datetime.UTC)
    return _EPOCH + datetime.timedelta(microseconds=micros)


_EXACT_TIMESTAMPS: Final = 2**32 * 1_000_000
_FROM_TIMESTAMP: Final = datetime.datetime.fromtimestamp


def encode_event(event: Event, body_json: str, micros: int | None = None) -> str:
    """One event as compact JSON text, its body embedded as the JSON it was sent as
    (``micros``: its ``created_at`` as :func:`to_micros` gives it, if known).

    Built by hand rather than by :func:`json.dumps` of a list: this runs once per
    emitted event, and the strings in it (stream, emitter, key) repeat.
    """
    key = "null" if event.key is None else json_string(event.key)
    ttl = "null" if event.ttl is None else repr(event.ttl)  # finite: checked at emit
    if micros is None:
        micros = to_micros(event.created_at)
    return (
        f"[{json_string(event.stream)},{event.after},{key},{ttl},"
        f"{micros},{json_string(event.emitter)},{event.seq},{body_json}]"
    )


@functools.lru_cache(maxsize=4096)
def json_string(text: str) -> str:
    """``text`` as a JSON string (cached: stream names, emitters and keys repeat)."""
    return json.dumps(text, ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def json_string_bytes(text: str) -> int:
    """UTF-8 bytes of :func:`json_string` of ``text`` (cached likewise)."""
    return len(json_string(text).encode("utf-8"))


#: An emitted event on its way out (see :class:`chatbus._outbox.Outbox`): its number
#: in put order, the event, its body's JSON text, its ``created_at`` in µs since the
#: epoch, and its :func:`encode_event` text's size in UTF-8 bytes (exact).
Outgoing = tuple[int, Event, str, int, int]


@final
@attrs.define(eq=False)
class EncodedEvents(Sequence[str]):
    """The :func:`encode_event` texts of outgoing events, made when first read.

    What a flush hands a store and a notifier as ``encoded``. The in-memory ones
    need no text, only each event's size (:meth:`sizes`, known since emit, where the
    wire limit is checked), so they never pay for it; the networked ones read it,
    and it is made once for all of them.
    """

    _items: Sequence[Outgoing]
    _texts: list[str] | None = attrs.field(default=None, init=False)

    def sizes(self) -> list[int]:
        """Each text's size in UTF-8 bytes, without making it."""
        return [item[4] for item in self._items]

    def _encoded(self) -> list[str]:
        texts = self._texts
        if texts is None:
            texts = self._texts = [
                encode_event(event, body_json, micros)
                for _, event, body_json, micros, _ in self._items
            ]
        return texts

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self._encoded()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._encoded())


def encode_events(encoded: Iterable[str], *, limit: int = MAX_PAYLOAD_BYTES) -> list[str]:
    """Pack encoded events (see :func:`encode_event`) into payloads of at most ``limit``
    UTF-8 bytes each: ``{"events": [...]}``. An event alone over the limit is dropped
    (validation keeps events far below it)."""
    payloads: list[str] = []
    batch: list[str] = []
    size = 0
    envelope = len('{"events":[]}')
    for text in encoded:
        length = len(text.encode("utf-8")) + 1
        if length + envelope > limit:
            continue
        if batch and size + length + envelope > limit:
            payloads.append('{"events":[' + ",".join(batch) + "]}")
            batch, size = [], 0
        batch.append(text)
        size += length
    if batch:
        payloads.append('{"events":[' + ",".join(batch) + "]}")
    return payloads


def decode_events(payload: bytes | str) -> list[Event] | None:
    """Decode a payload of events; None if it is not one (a notice, garbage)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(items := data.get("events"), list):
        return None
    return decode_event_items(items)


def decode_event_items(items: Iterable[object]) -> list[Event]:
    """Decode encoded events (already parsed JSON); what is not an event is skipped."""
    events = []
    for item in items:
        event = _decode_one(item)
        if event is not None:
            events.append(event)
    return events


def _decode_one(item: object) -> Event | None:
    if not isinstance(item, list) or len(item) != 8:
        return None
    stream, after, key, ttl, micros, emitter, seq, body = item
    if (
        not isinstance(stream, str)
        or type(after) is not int
        or not 0 <= after <= MAX_ID
        or not (key is None or isinstance(key, str))
        or not (ttl is None or isinstance(ttl, int | float))
        or type(micros) is not int
        or not isinstance(emitter, str)
        or type(seq) is not int
    ):
        return None
    try:
        created_at = from_micros(micros)
    except OverflowError:
        return None
    return Event(
        stream=stream,
        after=after,
        body=body,
        key=key,
        ttl=None if ttl is None else float(ttl),
        created_at=created_at,
        emitter=emitter,
        seq=seq,
    )


def _unexpired(event: Event, now: datetime.datetime) -> bool:
    expires = event.expires_at
    return expires is None or expires > now


@final
@attrs.define(eq=False)
class RetainedEvents:
    """What a stream keeps for joiners: the rule, without I/O.

    * unkeyed events whose ``after`` is the stream's head (the parts of a reply being
      streamed after the last message); older ones are dropped as the head moves;
    * the latest event of each key, until its ``ttl`` runs out;
    * an unkeyed event with a ``ttl`` only until it runs out, too.

    Bounded: at most ``max_events`` events and ``max_bytes`` bytes (of their wire
    encodings) per stream; the oldest go first. The bounds apply from the next
    :meth:`add` when they are changed (each flush brings its bus's
    :class:`chatbus.EventRetention`).
    """

    max_events: int
    max_bytes: int
    _unkeyed: collections.deque[tuple[Event, int]] = attrs.field(
        factory=collections.deque, init=False
    )
    _keyed: dict[str, tuple[Event, int]] = attrs.field(factory=dict, init=False)
    #: Bytes of everything retained (kept as it changes: adding stays O(1)).
    _bytes: int = attrs.field(default=0, init=False)

    def add(self, events: Sequence[tuple[Event, int]]) -> None:
        """Retain ``(event, encoded size)`` pairs, in emit order."""
        unkeyed, keyed = self._unkeyed, self._keyed
        added = 0  # into _bytes at the end (what leaves comes off it at once)
        for pair in events:
            event = pair[0]
            if event.key is None:
                if unkeyed and event.after != unkeyed[-1][0].after:
                    if event.after < unkeyed[-1][0].after:
                        continue  # older than what is retained: stale already
                    # The head moved on: what sat before it is stale for joiners.
                    kept = [(e, n) for e, n in unkeyed if e.after >= event.after]
                    self._bytes -= sum(n for _, n in unkeyed) - sum(n for _, n in kept)
                    unkeyed = self._unkeyed = collections.deque(kept)
                unkeyed.append(pair)
            else:
                replaced = keyed.get(event.key)
                if replaced is not None:
                    if replaced[0].created_at > event.created_at:
                        continue  # a newer value (another bus's, flushed first) stays
                    del keyed[event.key]
                    self._bytes -= replaced[1]
                keyed[event.key] = pair
            added += pair[1]
        self._bytes += added
        self._bound()

    def retained(self, head: int, now: datetime.datetime) -> list[Event]:
        """What a joiner caught up to ``head`` gets now, oldest first."""
        self._expire(now)
        keyed = [event for event, _ in self._keyed.values()]
        unkeyed = [
            event
            for event, _ in self._unkeyed
            if event.after == head and (event.ttl is None or _unexpired(event, now))
        ]
        return sorted([*keyed, *unkeyed], key=lambda e: e.created_at)

    def __len__(self) -> int:
        return len(self._unkeyed) + len(self._keyed)

    def _expire(self, now: datetime.datetime) -> None:
        for key, (event, size) in list(self._keyed.items()):
            expires = event.expires_at
            if expires is not None and expires <= now:
                del self._keyed[key]
                self._bytes -= size

    def _bound(self) -> None:
        unkeyed = self._unkeyed
        if not self._keyed:  # the common case: only the parts of a reply, oldest first
            excess, size, max_bytes = len(unkeyed) - self.max_events, self._bytes, self.max_bytes
            if size <= max_bytes:  # only the count is over (if anything): no sizes to watch
                if excess > 0:
                    popleft = unkeyed.popleft
                    self._bytes = size - sum([popleft()[1] for _ in range(excess)])
                return
            while unkeyed and (excess > 0 or size > max_bytes):
                size -= unkeyed.popleft()[1]
                excess -= 1
            self._bytes = size
            return
        while len(self) > self.max_events or self._bytes > self.max_bytes:
            oldest_keyed = next(iter(self._keyed.values()), None)
            oldest_unkeyed = self._unkeyed[0] if self._unkeyed else None
            if oldest_unkeyed is not None and (
                oldest_keyed is None or oldest_unkeyed[0].created_at <= oldest_keyed[0].created_at
            ):
                self._unkeyed.popleft()
                self._bytes -= oldest_unkeyed[1]
            elif oldest_keyed is not None:
                del self._keyed[oldest_keyed[0].key]  # type: ignore[arg-type]
                self._bytes -= oldest_keyed[1]
            else:  # pragma: no cover - len(self) > 0 implies one of them
                break
