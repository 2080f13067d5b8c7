"""What the Postgres store's statements send and get back, as values: no I/O.

Owns: the bodies of a statement (:func:`joined_bodies`), a read page decoded
(:func:`decode_page`), and the replays a keyed statement found (:func:`replays`).
How a result is handed out to the callers of one stream is shared with every
backend (:func:`chatbus._coalesce.settle`). Imports only chatbus's pure layers and
this package's :mod:`._pq`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from psycopg import pq

from .._coalesce import Batch, PendingAppend
from .._codec import BODY_SEPARATOR
from .._message import Message
from . import _pq


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
    """The messages found under a statement's keys (``[key, id, µs, digest]`` rows).

    An equal digest means the draft sent the stored text: its body is the stored one.
    Otherwise the original body read afterwards (``bodies``), or None if that failed.
    """
    return {
        key: Message(
            stream=stream,
            id=id_,
            body=sent[key][1] if sent[key][0] == digest else bodies.get(key),
            key=key,
            created_at=_pq.from_epoch_micros(micros),
            replay=True,
        )
        for key, id_, micros, digest in found
    }
