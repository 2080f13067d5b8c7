"""What the Postgres store's statements send and get back, as values: no I/O.

Owns: one caller's batch as the group commit carries it (:class:`Batch`), the bodies
of a statement (:func:`joined_bodies`), a read page decoded (:func:`decode_page`),
and how a statement's result is handed out to the callers of one stream
(:func:`settle`). Imports only chatbus's pure layers and this package's :mod:`._pq`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, final

import attrs
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


def body_digest(body_json: str) -> str:
    """What the server's ``md5(body::text)`` gives for a body sent as ``body_json``."""
    return hashlib.md5(body_json.encode("utf-8")).hexdigest()


def joined_bodies(members: list[PendingAppend]) -> str:
    return BODY_SEPARATOR.join(member.payload.packed for member in members)


def settle(
    stream: str,
    members: list[PendingAppend],
    last_id: int,
    created_at: datetime.datetime,
    found: dict[str, Message] | None,
) -> None:
    """Give each member of one stream its messages, from the statement's result.

    The server stored, in order, every draft whose key is None or new and first in
    the statement; :func:`plan_keyed_batch` makes the same choice here, so the new
    ones are the last ``len(new)`` ids. A draft that resolves to a message stored
    before it (earlier, or earlier in this statement) gets that message as a replay.
    """
    bodies = [body for member in members for body in member.payload.bodies]
    if found is None:  # unkeyed: every draft is new
        first = last_id - len(bodies) + 1
        result = [
            Message.from_row(stream, first + i, body, None, created_at)
            for i, body in enumerate(bodies)
        ]
    else:
        drafts = [draft for member in members for draft in member.payload.drafts]
        slots, new = plan_keyed_batch(drafts, found)
        first = last_id - len(new) + 1
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


def sent_by_key(members: list[PendingAppend]) -> dict[str, tuple[str, Any]]:
    """Per key of a stream's drafts in one statement: (digest of its text, its body)."""
    sent: dict[str, tuple[str, Any]] = {}
    for member in members:
        batch: Batch = member.payload
        for draft, body in zip(batch.drafts, batch.bodies, strict=True):
            if draft.key is not None:
                sent.setdefault(draft.key, (body_digest(draft.body_json), body))
    return sent


def replays(
    stream: str,
    found: list[list[Any]],
    sent: dict[str, tuple[str, Any]],
    bodies: dict[str, Any],
) -> dict[str, Message]:
    """The messages found under a statement's keys (``[key, id, µs, digest, redacted]``
    rows).

    An equal digest means the draft sent the stored text: its body is the stored one.
    Otherwise the original body read afterwards (``bodies``), or None if that failed
    (or the message was redacted: a tombstone).
    """
    return {
        key: Message(
            stream=stream,
            id=id_,
            body=None if redacted else sent[key][1] if sent[key][0] == digest else bodies.get(key),
            key=key,
            created_at=_pq.from_epoch_micros(micros),
            replay=True,
            redacted=redacted,
        )
        for key, id_, micros, digest, redacted in found
    }
