"""The Postgres backend's server-side text: statements, DDL, channel and statement names.

Owns: the DDL, the read and heads statements, the notices the append statements send
(:func:`_notice_carrying`), and :class:`Queries`, which composes every statement once
per schema with :class:`psycopg.sql.Identifier` (never by string formatting): the
append statements from :mod:`._sql_append`, the event statements from
:mod:`._sql_events` and the lifecycle ones from :mod:`._sql_lifecycle` included.
Imports psycopg's :mod:`psycopg.sql` only; no I/O.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Final, final

import attrs
from psycopg import sql

from .._codec import NOTICE_DATA_BYTES
from .._event import MAX_PAYLOAD_BYTES
from ._sql_append import (
    _APPEND_KEYED,
    _APPEND_KEYED_NEW,
    _APPEND_KEYED_NEW_ONE,
    _APPEND_STREAMS,
    _APPEND_UNKEYED,
    _BODIES_OF_KEYS,
    _OUTCOME,
)
from ._sql_events import (
    _LOCK_EVENT_STREAMS,
    _NOTIFY_EVENTS,
    _RETAIN_EVENTS,
    _RETAINED_EVENTS,
    _TRIM_EVENTS,
)
from ._sql_lifecycle import (
    _DELETE_BATCH,
    _DELETE_STREAM,
    _OVER_RETENTION,
    _REDACT,
    _STREAM_INFO,
    _TRIM_BATCH,
    _TRIM_FIRST,
)


def channel_for_schema(schema: str) -> str:
    """Return the NOTIFY channel used by the store and notifier of ``schema``.

    Derived deterministically (``chatbus_`` + MD5 of the schema name), so it is a
    valid identifier of fixed length whatever the schema is called.
    """
    return "chatbus_" + hashlib.md5(schema.encode("utf-8")).hexdigest()


@functools.cache
@functools.lru_cache(maxsize=1024)
def statement_name(query: bytes) -> bytes:
    """A prepared-statement name for ``query``: ``chatbus_`` and a digest of its text.

    The text holds the schema, so the name stays valid for as long as the session.
    Remembered: every statement a store runs asks (a few stores' dozen queries each).
    """
    return b"chatbus_" + hashlib.blake2b(query, digest_size=12).hexdigest().encode("ascii")


def ddl_lock_key(schema: str) -> int:
    """A signed 64-bit advisory lock key, fixed per schema, that serialises the DDL."""
    digest = hashlib.md5(b"chatbus-ddl:" + schema.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


#: Most bytes of a payload of events with its emitter tail: under NOTIFY's 8000.
_MAX_NOTIFY_BYTES: Final = 7999


def events_payload_tail(emitter: str) -> str | None:
    """What ends a payload of ``emitter``'s events instead of its last ``}``.

    ``{"events":[...],"emitter":"…"}``: a listener of the emitting bus tells its own
    events (which its subscriptions had at once) by this end, and skips them without
    decoding; others read the payload as any (the key is ignored). No body can make
    a payload end so: the events array closes after every body. None if the emitter
    is too long to fit beside the biggest payload.
    """
    tail = ',"emitter":' + json.dumps(emitter, ensure_ascii=False) + "}"
    if MAX_PAYLOAD_BYTES + len(tail.encode("utf-8")) > _MAX_NOTIFY_BYTES:
        return None
    return tail


def _events_lock_seed(schema: str) -> int:
    """Seeds the advisory lock keys of ``schema``'s streams' events (see _sql_events)."""
    digest = hashlib.md5(b"chatbus-events:" + schema.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


#: The comment on a schema's ``streams`` table once :func:`ddl` has run: if it is
#: there, every object is. Change any DDL, change the version.
SCHEMA_VERSION: Final = "chatbus schema 6"


def streams_table(schema: str) -> sql.Composable:
    """The qualified name of ``schema``'s counter table."""
    return sql.Identifier(schema, "streams")


def ddl(schema: str) -> list[sql.Composed]:
    """The statements that create the schema's tables if they do not exist."""
    ident = sql.Identifier(schema)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ( stream text PRIMARY KEY, last_id bigint NOT NULL)"
        ).format(sql.Identifier(schema, "streams")),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " stream text NOT NULL,"
            " id bigint NOT NULL,"
            " key text,"
            " body json NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (stream, id))"
        ).format(sql.Identifier(schema, "messages")),
        sql.SQL(
            "CREATE UNIQUE INDEX IF NOT EXISTS messages_stream_key"
            " ON {} (stream, key) WHERE key IS NOT NULL"
        ).format(sql.Identifier(schema, "messages")),
        # last_at: the created_at of the stream's last batch, so the next one is never
        # earlier; last_token: the token of the last batch that stored something, to
        # find out after a lost reply whether it committed.
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS last_at timestamptz,"
            " ADD COLUMN IF NOT EXISTS last_token bigint"
        ).format(sql.Identifier(schema, "streams")),
        # The stream's epoch (a new one when it is created again after a delete) and
        # its first retained id (trim); redacted messages keep id and key.
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL"
            " DEFAULT (floor(random() * 4e18) + 1)::bigint,"
            " ADD COLUMN IF NOT EXISTS first_id bigint NOT NULL DEFAULT 1"
        ).format(sql.Identifier(schema, "streams")),
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS redacted boolean NOT NULL DEFAULT false"
        ).format(sql.Identifier(schema, "messages")),
        # Events retained for joiners: UNLOGGED (not written to the WAL, emptied by a
        # crash), for they are hints for the eye, never history.
        sql.SQL(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {} ("
            " stream text NOT NULL,"
            " key text,"
            " emitter text NOT NULL,"
            " seq bigint NOT NULL,"
            " after bigint NOT NULL,"
            " encoded text NOT NULL,"
            " micros bigint NOT NULL,"
            " expires_at timestamptz)"
        ).format(sql.Identifier(schema, "events")),
        sql.SQL(
            "CREATE UNIQUE INDEX IF NOT EXISTS events_stream_key ON {} (stream, key)"
            " WHERE key IS NOT NULL"
        ).format(sql.Identifier(schema, "events")),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS events_stream_after ON {} (stream, after)"
            " WHERE key IS NULL"
        ).format(sql.Identifier(schema, "events")),
        # What a flush's trim walks, newest first, and when (see _sql_events._TRIM_EVENTS).
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS events_stream_order ON {} (stream, micros, seq)"
        ).format(sql.Identifier(schema, "events")),
        sql.SQL(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {} ("
            " stream text PRIMARY KEY, n bigint NOT NULL, bytes bigint NOT NULL)"
        ).format(sql.Identifier(schema, "event_totals")),
        # Last: the mark that the schema is at this version (see SCHEMA_VERSION).
        sql.SQL("COMMENT ON TABLE {} IS {}").format(
            sql.Identifier(schema, "streams"), sql.Literal(SCHEMA_VERSION)
        ),
    ]


def _micros(column: str) -> sql.Composable:
    """``column`` (a timestamptz) as µs since the epoch, exact on every server version.

    Whole seconds and the microseconds within the second each fit a double exactly
    (``extract`` returns one before PostgreSQL 14).
    """
    value = sql.SQL(column)
    return sql.SQL(
        "(extract(epoch FROM date_trunc('second', {v}))::bigint * 1000000"
        " + extract(microseconds FROM {v})::bigint % 1000000)"
    ).format(v=value)


def _notice(stream: str, last_id: str) -> sql.Composable:
    """The notice payload (see :func:`chatbus._codec.encode_notice`), built server-side."""
    return sql.SQL("json_build_object('stream', {}, 'last_id', {})::text").format(
        sql.SQL(stream), sql.SQL(last_id)
    )


def _notice_carrying(stream: str, count: str, packed: str, keys: str | None) -> sql.Composable:
    """The notice of an append to one stream of ``count`` drafts (bodies ``packed`` as
    sent, keys ``keys`` a JSON array or None for none): a committed notice carrying them
    (chatbus._codec.CommittedNotice: stream, last id, epoch, created_at µs, count,
    bodies, keys) when the bodies and keys come to at most NOTICE_DATA_BYTES, else a
    plain one. Built here from what the statement has anyway: nothing more is sent."""
    size = sql.SQL("octet_length({packed})").format(packed=sql.SQL(packed))
    if keys is not None:
        size = sql.SQL("{size} + octet_length({keys})").format(size=size, keys=sql.SQL(keys))
    return sql.SQL(
        "CASE WHEN {size} <= {limit} THEN concat({open}, to_json({stream}), {last},"
        " bump.last_id, {epoch}, bump.epoch, {at}, {micros}, {n}, {count}, {bodies},"
        " replace({packed}, chr(30), ','), {keys_open}, {keys}, '}}') ELSE {plain} END"
    ).format(
        size=size,
        limit=sql.Literal(NOTICE_DATA_BYTES),
        open=sql.Literal('{"stream":'),
        stream=sql.SQL(stream),
        last=sql.Literal(',"last_id":'),
        epoch=sql.Literal(',"epoch":'),
        at=sql.Literal(',"at":'),
        micros=_micros("bump.last_at"),
        n=sql.Literal(',"n":'),
        count=sql.SQL(count),
        bodies=sql.Literal(',"bodies":['),
        packed=sql.SQL(packed),
        keys_open=sql.Literal("]" if keys is None else '],"keys":'),
        keys=sql.SQL("''" if keys is None else keys),
        plain=_notice(stream, "bump.last_id"),
    )


#: Most rows one statement of a trim or delete removes (each its own transaction,
#: so no lock is held long on a hot stream).
LIFECYCLE_BATCH: Final = 5000
#: Groups of a read page are cut at this many bytes of bodies (see Queries.read).
READ_GROUP_BYTES: Final = 16 * 1024 * 1024
#: A keyed append's reply carries the original body of a key reused with another body
#: (for the IdempotencyConflict) up to this size; bigger ones are read afterwards.
CONFLICT_INLINE_BYTES: Final = 8 * 1024


@final
@attrs.frozen
class Queries:
    """The store's SQL for one schema.

    Every statement runs over :mod:`chatbus.postgres._pq` (``$n`` placeholders, text
    parameters) as a prepared statement, so each is kept as UTF-8 bytes.
    """

    append_unkeyed: bytes
    append_streams: bytes
    append_keyed: bytes
    append_keyed_new: bytes
    append_keyed_new_one: bytes
    read: bytes
    heads: bytes
    outcome: bytes
    lock_event_streams: bytes
    retain_events: bytes
    notify_events: bytes
    trim_events: bytes
    retained_events: bytes
    bodies_of_keys: bytes
    stream_info: bytes
    trim_first: bytes
    trim_batch: bytes
    over_retention: bytes
    delete_batch: bytes
    redact: bytes
    delete_stream: tuple[str, ...]

    @classmethod
    def for_schema(cls, schema: str) -> Queries:
        """Compose every statement for ``schema``."""
        names = _names(schema)
        return cls(
            append_unkeyed=_bytes(
                _APPEND_UNKEYED,
                names,
                _notice_carrying("$1::text", "$2::bigint", "$3::text", None),
            ),
            append_streams=_bytes(
                _APPEND_STREAMS,
                names,
                _notice_carrying("bump.stream", "input.n", "input.packed", None),
            ),
            append_keyed=_bytes(_APPEND_KEYED, names),
            append_keyed_new=_bytes(
                _APPEND_KEYED_NEW, names, _notice("bump.stream", "bump.last_id")
            ),
            append_keyed_new_one=_bytes(
                _APPEND_KEYED_NEW_ONE,
                names,
                _notice_carrying("$1::text", "$2::bigint", "$3::text", "$6::text"),
            ),
            read=_bytes(_READ, names),
            heads=_bytes(_HEADS, names),
            outcome=_bytes(_OUTCOME, names),
            lock_event_streams=_bytes(_LOCK_EVENT_STREAMS, names),
            retain_events=_bytes(_RETAIN_EVENTS, names),
            notify_events=_bytes(_NOTIFY_EVENTS, names),
            trim_events=_bytes(_TRIM_EVENTS, names),
            retained_events=_bytes(_RETAINED_EVENTS, names),
            bodies_of_keys=_bytes(_BODIES_OF_KEYS, names),
            stream_info=_bytes(_STREAM_INFO, names),
            trim_first=_bytes(_TRIM_FIRST, names),
            trim_batch=_bytes(_TRIM_BATCH, names),
            over_retention=_bytes(_OVER_RETENTION, names),
            delete_batch=_bytes(_DELETE_BATCH, names),
            redact=_bytes(_REDACT, names),
            delete_stream=tuple(
                _text(statement, names)
                for statement in _DELETE_STREAM.split(";")
                if statement.strip()
            ),
        )


def _names(schema: str) -> dict[str, sql.Composable]:
    return {
        "streams": sql.Identifier(schema, "streams"),
        "messages": sql.Identifier(schema, "messages"),
        "created_micros": _micros("created_at"),
        "bump_micros": _micros("bump.last_at"),
        "found_micros": _micros("m.created_at"),
        "keyed_notice": _notice("st.stream", "st.last_id"),
        "b_micros": _micros("b.last_at"),
        "group_bytes": sql.Literal(READ_GROUP_BYTES),
        "conflict_inline": sql.Literal(CONFLICT_INLINE_BYTES),
        "events": sql.Identifier(schema, "events"),
        "events_lock_seed": sql.Literal(_events_lock_seed(schema)),
        "event_totals": sql.Identifier(schema, "event_totals"),
        "lifecycle_batch": sql.Literal(LIFECYCLE_BATCH),
        "reset_notice": sql.SQL(
            "json_build_object('stream', %(stream)s::text, 'reset', true)::text"
        ),
    }


def _text(
    template: str, names: dict[str, sql.Composable], notice: sql.Composable | None = None
) -> str:
    extra = {} if notice is None else {"notice": notice}
    return sql.SQL(template).format(**{**names, **extra}).as_string(None)


def _bytes(
    template: str, names: dict[str, sql.Composable], notice: sql.Composable | None = None
) -> bytes:
    return _text(template, names, notice).encode("utf-8")


# A page as a few JSON values, each [[id, key, body, created_at µs, redacted], …]
# (only ids from the stream's first retained one: the rows of trimmed messages with
# keys stay, for their keys, but are not history any more): one json.loads
# decodes the ids, keys and bodies of many rows at once (body is a json column,
# embedded verbatim). Rows are grouped by the running total of their body sizes,
# 16 MiB a group, so no value nears Postgres's 1 GB limit on one string whatever the
# page holds. Beside each group, the stream's epoch (one snapshot: the page is of
# that epoch; 0: no such stream), so that a subscription never takes a page of a
# stream deleted and created again for the rest of the history it follows
# (PostgresStore.read_with_epoch); no row at all for an empty page.
_READ: Final = """
    SELECT json_agg(json_build_array(m.id, m.key, m.body, m.micros, m.redacted) ORDER BY m.id),
        e.epoch
    FROM (
        SELECT id, key, body, redacted,
            {created_micros} AS micros,
            sum(octet_length(body::text)) OVER (ORDER BY id) AS running
        FROM {messages}
        WHERE stream = $1::text AND id > greatest($2::bigint, coalesce(
            (SELECT st.first_id - 1 FROM {streams} AS st WHERE st.stream = $1::text), 0))
        ORDER BY id LIMIT $3::bigint
    ) AS m
    CROSS JOIN (
        SELECT coalesce(max(st.epoch), 0) AS epoch FROM {streams} AS st
        WHERE st.stream = $1::text
    ) AS e
    GROUP BY e.epoch, m.running / {group_bytes}
    ORDER BY min(m.id)
"""

_HEADS: Final = (
    "SELECT json_object_agg(st.stream, st.last_id) FROM {streams} AS st"
    " WHERE st.stream IN (SELECT json_array_elements_text($1::json))"
)
