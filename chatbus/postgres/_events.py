"""What a Postgres transaction runs for emitted events: their statements and payloads.

Owns: the parameters of the event statements of :mod:`._sql_events` (a flush of its own, or
carried by an append: :meth:`PostgresStore.append_carrying`) and how events are
packed into NOTIFY payloads. No I/O; imports :mod:`chatbus._event` and :mod:`._sql`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Final, final

import attrs

from .._event import MAX_PAYLOAD_BYTES, Event, encode_events
from .._options import EventRetention
from ._sql import Queries, events_payload_tail

#: Joins the encoded events (and their payloads) of a flush into one text parameter:
#: JSON text never holds it unescaped (see _sql_events._RETAIN_EVENTS).
_RS: Final = "\x1e"

Statement = tuple[bytes, list[bytes]]


@final
@attrs.frozen
class CarriedEvents:
    """Events for one transaction, encoded (see :func:`chatbus._event.encode_event`)."""

    events: list[Event]
    encoded: list[str]
    #: The bounds of what each stream retains (the flushing bus's).
    retention: EventRetention
    #: Per event: whether joiners may still want it (else it is only NOTIFYed).
    retain: list[bool]

    @classmethod
    def of(
        cls,
        events: Sequence[Event],
        encoded: Sequence[str],
        retention: EventRetention,
        *,
        behind_head: bool = False,
    ) -> CarriedEvents:
        """``behind_head``: an append that surely stores a message of their stream
        carries them. Its unkeyed events are positioned at the head before it (their
        ``after``), and a joiner gets the unkeyed events of the head it caught up to,
        which is then past them: they are NOTIFYed (live subscriptions place them
        before the append's messages) but not retained. Keyed ones are retained, as a
        flush retains them (new messages do not clear them)."""
        retain = [not behind_head or event.key is not None for event in events]
        return cls(list(events), list(encoded), retention, retain)

    @classmethod
    def joined(cls, parts: Sequence[CarriedEvents]) -> CarriedEvents | None:
        """The events of ``parts``, in order (bounded as the first's); None if none."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return cls(
            [e for p in parts for e in p.events],
            [t for p in parts for t in p.encoded],
            parts[0].retention,
            [r for p in parts for r in p.retain],
        )


def event_statements(queries: Queries, channel: str, carried: CarriedEvents) -> list[Statement]:
    """What a transaction runs for ``carried``, before anything else: lock the streams'
    events, retain and NOTIFY them, bound what is retained (all before an append's
    statement: its counter rows are locked for no longer than alone). Events none of
    which is to be retained are only NOTIFYed: one statement, no lock, no write."""
    events, encoded = carried.events, carried.encoded
    retention = carried.retention
    notices = _RS.join(payloads(events, encoded)).encode("utf-8")
    if not any(carried.retain):
        return [(queries.notify_events, [_utf8(channel), notices])]
    if not all(carried.retain):
        kept = [i for i, retain in enumerate(carried.retain) if retain]
        events, encoded = [events[i] for i in kept], [encoded[i] for i in kept]
    params = [
        _RS.join(encoded).encode("utf-8"),
        _utf8(channel),
        notices,
        b"%d" % retention.max_events,
    ]
    names = {e.stream for e in events}
    streams = [_streams_json(next(iter(names))) if len(names) == 1 else _json_list(names)]
    return [
        (queries.lock_event_streams, streams),
        (queries.retain_events, params),
        (queries.trim_events, [*streams, *trim_bounds(retention)]),
    ]


def _json_list(names: set[str]) -> bytes:
    return json.dumps(sorted(names), ensure_ascii=False).encode("utf-8")


# Once per flush: the same few channels, streams and bounds come back each time.
_utf8: Final = functools.lru_cache(maxsize=64)(lambda text: text.encode("utf-8"))
_streams_json: Final = functools.lru_cache(maxsize=4096)(lambda name: _json_list({name}))


@functools.lru_cache(maxsize=64)
def _trim_bounds(count: int, size: int) -> tuple[bytes, ...]:
    return tuple(b"%d" % n for n in (count, size, count - count // 10, size - size // 10))


def trim_bounds(retention: EventRetention) -> list[bytes]:
    """_sql_events._TRIM_EVENTS's $2 to $5: the bounds (count, bytes), then what a stream over
    one is cut to, 9/10 of each rounded up (a bound of 1 keeps 1)."""
    return list(_trim_bounds(retention.max_events, retention.max_bytes))


def payloads(events: Sequence[Event], encoded: Sequence[str]) -> list[str]:
    """The NOTIFY payloads of ``events``: packed, each ending with its emitter's tail
    (:func:`._sql.events_payload_tail`)."""
    emitter = events[0].emitter if events else ""
    if all(event.emitter == emitter for event in events):
        # The usual case: one bus's outbox, one emitter. A few ASCII events fit one
        # payload with room to spare: no need to measure each in bytes.
        tail = _payload_tail(emitter)
        if len(encoded) <= 16:
            joined = ",".join(encoded)
            if len(joined) + _ENVELOPE < MAX_PAYLOAD_BYTES and joined.isascii():
                return [f'{{"events":[{joined}]{"}" if tail is None else tail}']
        by_emitter = {emitter: list(encoded)}
    else:
        by_emitter = {}
        for event, text in zip(events, encoded, strict=True):
            by_emitter.setdefault(event.emitter, []).append(text)
    packed = []
    for emitter, texts in by_emitter.items():
        tail = _payload_tail(emitter)
        for payload in encode_events(texts):
            packed.append(payload if tail is None else payload[:-1] + tail)
    return packed


_payload_tail: Final = functools.lru_cache(maxsize=1024)(events_payload_tail)
#: ``{"events":[]}`` around a payload's events, as encode_events counts it.
_ENVELOPE: Final = len('{"events":[]}') + 1
