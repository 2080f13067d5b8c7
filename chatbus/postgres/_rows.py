"""What the Postgres store's statements send and get back, as values: no I/O.

Owns: one caller's batch as the group commit carries it (:class:`Batch`), the bodies
of a statement (:func:`joined_bodies`) and a keyed statement's input
(:class:`KeyedRequest`), a read page decoded (:func:`decode_page`),
and how a statement's result is handed out to the callers of one stream
(:func:`settle`). Imports only chatbus's pure layers and this package's :mod:`._pq`.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, final

import attrs
import psycopg
from psycopg import pq

from .._coalesce import PendingAppend
from .._codec import BODY_SEPARATOR, plan_keyed_batch
from .._message import Draft, Message
from . import _pq


@final
@attrs.frozen
class Batch:
    """One caller's append as the group commit carries it."""

    drafts: list[Draft]
    packed: str
    bodies: list[Any]
    keyed: bool


def decode_page(stream: str, result: pq.abc.PGresult) -> list[Message]:
    """Decode a read's result: a few JSON values, each [[id, key, body, µs, redacted], …]."""
    to_datetime = _pq.from_epoch_micros
    return [
        Message(
            stream=stream,
            id=id_,
            body=body,
            key=key,
            created_at=to_datetime(micros),
            redacted=redacted,
        )
        if redacted
        else Message.from_row(stream, id_, body, key, to_datetime(micros))
        for group in range(result.ntuples)
        for id_, key, body, micros, redacted in json.loads(_pq.value(result, group, 0))
    ]


def joined_bodies(members: list[PendingAppend]) -> str:
    return BODY_SEPARATOR.join(member.payload.packed for member in members)


@final
@attrs.frozen
class KeyedRequest:
    """What a keyed statement sends: per draft sent, its stream, key and body.

    A key repeated within one stream's drafts of the statement is sent once (its first
    draft); :func:`settle` gives the repeats that draft's message, as a replay.
    """

    streams: list[str]
    keys: list[str | None]
    packed: str

    @classmethod
    def of(cls, groups: dict[str, list[PendingAppend]]) -> KeyedRequest:
        """The request for ``groups`` (stream -> its members, in order)."""
        streams: list[str] = []
        keys: list[str | None] = []
        packs: list[str] = []
        for stream, members in groups.items():
            drafts = [draft for member in members for draft in member.payload.drafts]
            if _keys_unique(drafts):  # the usual case: the packs as they are
                keys.extend(draft.key for draft in drafts)
                packs.append(joined_bodies(members))
                sent = len(drafts)
            else:
                seen: set[str] = set()
                texts = []
                for draft in drafts:
                    if draft.key is not None:
                        if draft.key in seen:
                            continue
                        seen.add(draft.key)
                    keys.append(draft.key)
                    texts.append(draft.body_json)
                packs.append(BODY_SEPARATOR.join(texts))
                sent = len(texts)
            streams.extend([stream] * sent)
        return cls(streams, keys, BODY_SEPARATOR.join(packs))

    def found(self, rows: list[list[Any]]) -> dict[str, list[Found]]:
        """The statement's found rows ``[draft number, id, µs, same body, inlined,
        original body, redacted]`` by stream."""
        by_stream: dict[str, list[Found]] = {}
        for number, id_, micros, same, inline, original, redacted in rows:
            key = self.keys[number - 1]
            assert key is not None  # only keys are looked up
            found = Found(key, id_, micros, same, inline, original, redacted)
            by_stream.setdefault(self.streams[number - 1], []).append(found)
        return by_stream


@final
@attrs.frozen
class Found:
    """A message a keyed statement found under one of its keys."""

    key: str
    id: int
    micros: int
    #: The draft sent the stored text: a replay whose body is the draft's.
    same: bool
    #: Not the same, and ``original`` is the stored body (else it is read afterwards).
    inline: bool
    original: Any
    #: Redacted: a tombstone, whatever was sent (a retry replays it, no conflict).
    redacted: bool = False


def settle(
    stream: str,
    members: list[PendingAppend],
    last_id: int | None,
    created_at: datetime.datetime,
    found: dict[str, Message] | None,
) -> None:
    """Give each member of one stream its messages, from the statement's result.

    The server stored, in order, every draft whose key is None or new and first in
    the statement; :func:`plan_keyed_batch` makes the same choice here, so the new
    ones are the last ``len(new)`` ids. A draft that resolves to a message stored
    before it (earlier, or earlier in this statement) gets that message as a replay.
    ``last_id`` is None when the statement stored nothing in ``stream``.
    """
    bodies = [body for member in members for body in member.payload.bodies]
    drafts = [draft for member in members for draft in member.payload.drafts]
    if not found and (found is None or _keys_unique(drafts)):
        # Unkeyed, or no key found and none repeated (the usual keyed batch): every
        # draft is new, and the drafts are the last ids in order.
        if last_id is None:  # pragma: no cover - the server stored what it did not find
            raise psycopg.DataError(f"no counter row returned for stream {stream!r}")
        first = last_id - len(bodies) + 1
        result = [
            Message.from_row(stream, first + i, body, draft.key, created_at)
            for i, (draft, body) in enumerate(zip(drafts, bodies, strict=True))
        ]
    else:
        slots, new = plan_keyed_batch(drafts, found)
        if new and last_id is None:  # pragma: no cover - the server stored what it did not find
            raise psycopg.DataError(f"no counter row returned for stream {stream!r}")
        first = (last_id or 0) - len(new) + 1
        stored: dict[int, Message] = {}
        result = []
        for draft, body, slot in zip(drafts, bodies, slots, strict=True):
            if isinstance(slot, Message):
                result.append(slot)  # found in the stream: a replay already
            elif (original := stored.get(slot)) is not None:
                result.append(attrs.evolve(original, replay=True))  # repeated in the batch
            else:
                message = Message.from_row(stream, first + slot, body, draft.key, created_at)
                stored[slot] = message
                result.append(message)
    start = 0
    for member in members:
        member.settle(result[start : start + member.drafts])
        start += member.drafts


def _keys_unique(drafts: list[Draft]) -> bool:
    """No key appears twice among ``drafts`` (None is no key)."""
    keys = [draft.key for draft in drafts if draft.key is not None]
    return len(set(keys)) == len(keys)


def sent_by_key(members: list[PendingAppend]) -> dict[str, Any]:
    """Per key of a stream's drafts in one statement: the body of its first draft (sent)."""
    sent: dict[str, Any] = {}
    for member in members:
        batch: Batch = member.payload
        for draft, body in zip(batch.drafts, batch.bodies, strict=True):
            if draft.key is not None:
                sent.setdefault(draft.key, body)
    return sent


def replays(
    stream: str, found: list[Found], sent: dict[str, Any], bodies: dict[str, Any]
) -> dict[str, Message]:
    """The messages found under a statement's keys.

    The same body: the draft sent the stored text, so its body is the stored one.
    Otherwise the original body from the reply, or read afterwards (``bodies``), or
    None if that read failed; a redacted message's is its tombstone (None).
    """
    return {
        f.key: Message(
            stream=stream,
            id=f.id,
            body=(
                None
                if f.redacted
                else sent[f.key]
                if f.same
                else f.original
                if f.inline
                else bodies.get(f.key)
            ),
            key=f.key,
            created_at=_pq.from_epoch_micros(f.micros),
            replay=True,
            redacted=f.redacted,
        )
        for f in found
    }
