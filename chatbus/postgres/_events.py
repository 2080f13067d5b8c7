"""What a Postgres transaction runs for emitted events: their statements and payloads.

Owns: the parameters of the event statements of :mod:`._sql_events` (a flush of its own, or
carried by an append: :meth:`PostgresStore.append_carrying`) and how events are
packed into NOTIFY payloads. No I/O; imports :mod:`chatbus._event` and :mod:`._sql`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final, final

import attrs

from .._event import Event, encode_events
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

    @classmethod
    def of(
        cls, events: Sequence[Event], encoded: Sequence[str], retention: EventRetention
    ) -> CarriedEvents:
        return cls(list(events), list(encoded), retention)

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
        )


def event_statements(queries: Queries, channel: str, carried: CarriedEvents) -> list[Statement]:
    """What a transaction runs for ``carried``, before anything else: lock the streams'
    events, retain and NOTIFY them, bound what is retained (all before an append's
    statement: its counter rows are locked for no longer than alone)."""
    events, encoded = carried.events, carried.encoded
    retention = carried.retention
    params = [
        _RS.join(encoded).encode("utf-8"),
        channel.encode("utf-8"),
        _RS.join(payloads(events, encoded)).encode("utf-8"),
        b"%d" % retention.max_events,
    ]
    streams = [json.dumps(sorted({e.stream for e in events}), ensure_ascii=False).encode()]
    return [
        (queries.lock_event_streams, streams),
        (queries.retain_events, params),
        (queries.trim_events, [*streams, *trim_bounds(retention)]),
    ]


def trim_bounds(retention: EventRetention) -> list[bytes]:
    """_sql_events._TRIM_EVENTS's $2 to $5: the bounds (count, bytes), then what a stream over
    one is cut to, 9/10 of each rounded up (a bound of 1 keeps 1)."""
    count, size = retention.max_events, retention.max_bytes
    return [b"%d" % n for n in (count, size, count - count // 10, size - size // 10)]


def payloads(events: Sequence[Event], encoded: Sequence[str]) -> list[str]:
    """The NOTIFY payloads of ``events``: packed, each ending with its emitter's tail
    (:func:`._sql.events_payload_tail`)."""
    by_emitter: dict[str, list[str]] = {}
    for event, text in zip(events, encoded, strict=True):
        by_emitter.setdefault(event.emitter, []).append(text)
    packed = []
    for emitter, texts in by_emitter.items():
        tail = events_payload_tail(emitter)
        for payload in encode_events(texts):
            packed.append(payload if tail is None else payload[:-1] + tail)
    return packed
