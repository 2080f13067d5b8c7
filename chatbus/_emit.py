"""Emitting events: what :meth:`chatbus.Bus.emit` does between its caller and the
subscriptions and outbox that take the event.

Owns: the emitter's identity and sequence, an event's position (the stream's head as
this bus knows it, asked of the store when it does not), its clock, its size on the
wire (checked here; the text is made by a flush, and only for a store that needs it:
see :class:`chatbus._event.EncodedEvents`), and the streams held while emits on them
go on. Imports :mod:`chatbus._event`, :mod:`chatbus._message`, :mod:`chatbus._outbox`
and :mod:`chatbus._topic`; the bus owns one :class:`Emitter`.

This runs once per event, so the usual case (a stream this bus already knows the
head of) is one synchronous pass with no schedule point: no topic to acquire, no
lists, one encoding of the body, no coroutine of its own (the caller's ``emit`` is
the only one).
"""

from __future__ import annotations

import datetime
import secrets
import time
from typing import Final, final

import attrs
import trio

from ._event import (
    MAX_EVENT_WIRE_BYTES,
    Event,
    EventDraft,
    copy_body,
    fast_body_json,
    json_string_bytes,
    make_event,
    make_event_draft,
)
from ._exceptions import MessageTooLarge
from ._message import check_stream
from ._outbox import Outbox
from ._protocols import Store
from ._topic import Topic, Topics

#: Emits between two schedule points of :meth:`Emitter.emit` (each one is a cancel point).
EMITS_PER_SCHEDULE_POINT: Final = 32
#: A stream emitted on stays known to the bus (its head kept current by notices) until
#: it went this long (up to twice as long) without an emit; at most this many such
#: streams at once.
EMIT_HOLD_SECONDS: Final = 5.0
MAX_EMIT_HOLDS: Final = 10_000
_UTC: Final = datetime.UTC
_from_timestamp: Final = datetime.datetime.fromtimestamp


@final
@attrs.define(eq=False)
class Emitter:
    """One bus's emitting side (see :meth:`chatbus.Bus.emit` for the contract)."""

    _topics: Topics
    _store: Store
    _outbox: Outbox
    #: Where the tasks that let go of held streams run (the bus's).
    _nursery: trio.Nursery
    #: The bus's service scopes: closing it cancels those tasks.
    _service_scopes: list[trio.CancelScope]
    _max_event_bytes: int
    #: Identifies this bus's events (see Event.emitter); seq numbers them.
    id: str = attrs.field(factory=lambda: secrets.token_hex(8), init=False)
    emitted: int = attrs.field(default=0, init=False)
    #: The ``created_at`` of the last event, in µs since the epoch.
    _last_micros: int = attrs.field(default=0, init=False)
    #: Streams held for emits (see _hold), with the emit count at the last one.
    _holds: dict[str, int] = attrs.field(factory=dict, init=False)
    #: What every event of this bus has on the wire besides its own parts (see
    #: _emit_now): its brackets and commas, and this emitter's id.
    _fixed_bytes: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._fixed_bytes = len("[,,,,,,,]") + json_string_bytes(self.id)

    def emit_or_draft(
        self, stream: str, body: object, key: str | None, ttl: float | None
    ) -> Event | EventDraft:
        """Validate an event and, in the usual case, emit it now; else return its
        draft, for :meth:`emit_at_head`.

        :meth:`chatbus.Bus.emit` and :meth:`chatbus.Publisher.emit` call it right
        after a cancel point (``emit()`` is one every time): each emit is then one
        coroutine, theirs, and in the usual case one synchronous pass.
        """
        # A stream with a topic was checked when it got it.
        topic = self._topics.by_name.get(stream) if type(stream) is str else None
        if topic is None:
            check_stream(stream)
        body_json = None
        if key is None and ttl is None:  # a streamed part: validated in one pass
            body_json = fast_body_json(body, self._max_event_bytes)
        if body_json is None:
            body_json, key, ttl = make_event_draft(
                body, key, ttl, max_event_bytes=self._max_event_bytes
            )
        if (
            topic is None
            or not topic.head_known
            or topic.head_asked_at_resync != topic.resyncs
            or not self.emitted % EMITS_PER_SCHEDULE_POINT
        ):
            return EventDraft(body_json, key, ttl)
        # The usual case: no schedule point, so nothing can change between reading
        # the head and handing the event over, and the topic (in use by what made it)
        # needs no hold of ours.
        if self._topics.closed:
            self._topics.check_open()  # raises BusClosed
        return self._emit_now(topic, body, body_json, key, ttl, topic.high_water)

    async def emit_at_head(self, stream: str, body: object, draft: EventDraft) -> Event:
        """Emit ``draft`` (see :meth:`emit_or_draft`) with a schedule point: asking the
        store for the head if need be."""
        topic = self._topics.acquire(stream)
        try:
            if not topic.head_known or topic.head_asked_at_resync != topic.resyncs:
                resyncs = topic.resyncs
                heads = await self._store.heads([topic.name])
                topic.advance(heads.get(topic.name, 0))
                topic.head_known = True
                topic.head_asked_at_resync = resyncs
                after = topic.high_water
            else:
                # Read before the checkpoint: a reset meanwhile (a resync) would give 0.
                after = topic.high_water
                await trio.lowlevel.checkpoint()
            return self._emit_now(topic, body, *draft, after)
        finally:
            self._topics.release(topic)

    def _emit_now(
        self,
        topic: Topic,
        body: object,
        body_json: str,
        key: str | None,
        ttl: float | None,
        after: int,
    ) -> Event:
        """Make the event at ``after`` and hand it over: no await, so in emit order."""
        # Never earlier than this bus's previous event: subscriptions order events by
        # (after, created_at), and one emitter's must stay in emit order.
        micros = time.time_ns() // 1000
        if micros < self._last_micros:
            micros = self._last_micros
        seq = self.emitted + 1
        stream = topic.name
        # The size of encode_event's text in UTF-8 bytes, exactly, without making it
        # (this runs once per event; a flush makes the text if its store needs it,
        # see EncodedEvents): "[" stream "," after "," key "," ttl "," micros ","
        # emitter "," seq "," body "]", the emitter's part in _fixed_bytes.
        size = (
            self._fixed_bytes
            + json_string_bytes(stream)
            + (4 if key is None else json_string_bytes(key))  # null
            + (4 if ttl is None else len(repr(ttl)))
            + len(str(after))
            # 16 digits from 2001 to 2286
            + (16 if 10**15 <= micros < 10**16 else len(str(micros)))
            + len(str(seq))
            + (len(body_json) if body_json.isascii() else len(body_json.encode("utf-8")))
        )
        if size > MAX_EVENT_WIRE_BYTES:
            raise MessageTooLarge(
                f"event is {size} bytes on the wire with its stream name and key;"
                f" the limit is {MAX_EVENT_WIRE_BYTES} (shorten the body, key or name)"
            )
        event = make_event(
            stream,
            after,
            # Subscribers get a copy: the emitter may change its body afterwards.
            copy_body(body, body_json),
            key,
            ttl,
            # from_micros, inline: the clock is well inside its exact range.
            _from_timestamp(micros / 1_000_000, _UTC),
            self.id,
            seq,
        )
        self._last_micros = micros
        self.emitted = seq
        self._outbox.put(event, body_json, micros, size)
        topic.deliver_emitted(event)
        holds = self._holds
        if stream in holds:
            holds[stream] = seq
        else:
            self._hold(topic)
        return event

    def _hold(self, topic: Topic) -> None:
        """Keep ``topic`` while emits on it go on, so the next one need not ask the
        store for the head (a round trip per emit on a stream this bus neither
        publishes nor subscribes to)."""
        if len(self._holds) >= MAX_EMIT_HOLDS:
            return
        self._holds[topic.name] = self.emitted
        self._topics.acquire(topic.name)
        self._nursery.start_soon(self._release_hold, topic)

    async def _release_hold(self, topic: Topic) -> None:
        """Let go of ``topic`` once a whole EMIT_HOLD_SECONDS passed without an emit on
        it (emits mark it with their count: cheaper than reading a clock each time)."""
        with trio.CancelScope() as scope:
            self._service_scopes.append(scope)
            try:
                holds = self._holds
                seen = None
                while holds[topic.name] != seen:
                    seen = holds[topic.name]
                    await trio.sleep(EMIT_HOLD_SECONDS)
            finally:
                del self._holds[topic.name]
                self._service_scopes.remove(scope)
                self._topics.release(topic)
