"""What the Postgres store's statements send and get back, as values: no I/O.

Owns: the bodies of a statement (:func:`joined_bodies`), a keyed statement's input
(:class:`KeyedRequest`) and what it found (:class:`Found`, :func:`replays`), and a
read page decoded (:func:`decode_page`). How a result is handed out to the callers of
one stream is shared with every backend (:func:`chatbus._coalesce.settle`). Imports
only chatbus's pure layers and this package's :mod:`._pq`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final, final

import attrs
from psycopg import pq

from .._coalesce import Batch, PendingAppend, keys_unique
from .._codec import BODY_SEPARATOR
from .._message import Message, make_message
from . import _pq

#: ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` without building
#: an encoder per call (as json.dumps does when given options).
compact_json: Final[Callable[[Any], str]] = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":")
).encode


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
        else make_message(stream, id_, body, key, to_datetime(micros))
        for group in range(result.ntuples)
        for id_, key, body, micros, redacted in json.loads(_pq.value(result, group, 0))
    ]


def joined_bodies(members: list[PendingAppend]) -> str:
    return BODY_SEPARATOR.join(member.payload.packed for member in members)


@final
@attrs.frozen
class KeyedRequest:
    """What a keyed statement sends: per stream its drafts sent, per draft its key and body.

    A key repeated within one stream's drafts of the statement is sent once (its first
    draft); :func:`settle` gives the repeats that draft's message, as a replay.
    """

    #: Per stream, in the order of the drafts: ``[stream, drafts sent]``.
    counts: list[list[str | int]]
    #: Per draft sent: its stream and its key.
    streams: list[str]
    keys: list[str | None]
    packed: str
    #: The streams whose drafts repeat a key within the statement.
    repeating: frozenset[str] = frozenset()

    @classmethod
    def of(cls, groups: dict[str, list[PendingAppend]]) -> KeyedRequest:
        """The request for ``groups`` (stream -> its members, in order)."""
        counts: list[list[str | int]] = []
        streams: list[str] = []
        keys: list[str | None] = []
        packs: list[str] = []
        repeating: set[str] = set()
        for stream, members in groups.items():
            drafts = [draft for member in members for draft in member.payload.drafts]
            if keys_unique(drafts):  # the usual case: the packs as they are
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
                repeating.add(stream)
            counts.append([stream, sent])
            streams.extend([stream] * sent)
        return cls(counts, streams, keys, BODY_SEPARATOR.join(packs), frozenset(repeating))

    def params(self, channel: bytes, token: int, look: bytes | None) -> list[bytes]:
        """The parameters of a keyed statement: ``_sql_append._APPEND_KEYED_NEW``'s, and with
        ``look`` (per draft sent, ``t`` to look its key up, else ``f``) ``_APPEND_KEYED``'s.
        """
        params = [
            compact_json(self.counts).encode("utf-8"),
            compact_json(self.keys).encode("utf-8"),
            self.packed.encode("utf-8"),
            channel,
            b"%d" % token,
        ]
        if look is not None:
            params.append(look)
        return params

    def params_one(self, channel: bytes, token: int) -> list[bytes]:
        """The parameters of ``_sql_append._APPEND_KEYED_NEW_ONE`` (a request of one stream)."""
        ((stream, count),) = self.counts
        return [
            str(stream).encode("utf-8"),
            b"%d" % int(count),
            self.packed.encode("utf-8"),
            channel,
            b"%d" % token,
            compact_json(self.keys).encode("utf-8"),
        ]

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
