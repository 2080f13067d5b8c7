"""The Postgres backend's server-side text: statements, DDL, channel and statement names.

Owns: the DDL, the append, read and heads statements, and :class:`Queries`, which
composes every statement once per schema with :class:`psycopg.sql.Identifier` (never
by string formatting), the event statements from :mod:`._sql_events` and the
lifecycle ones from :mod:`._sql_lifecycle` included. Imports psycopg's
:mod:`psycopg.sql` only; no I/O.
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


# The bodies of a batch travel as ONE text parameter, joined with U+001E (see
# chatbus._codec.pack_bodies), and are split back server-side; each piece is still
# cast to json on its own. Much cheaper on the client than a text[] parameter, which
# psycopg escapes element by element.
#
# One statement, one implicit transaction (pool connections are autocommit): bump the
# counter (the row lock orders concurrent appenders), insert the batch with the ids
# just reserved, and notify once. The SET of ON CONFLICT DO UPDATE is evaluated once
# the row lock is held, so clock_timestamp() there is later than the previous batch's
# commit: created_at never decreases in id order (greatest() also rides out a clock
# stepped back). $5 is the batch's token (see _OUTCOME). A small batch's notice
# carries it (see _notice_carrying).
_APPEND_UNKEYED: Final = """
    WITH bump AS (
        INSERT INTO {streams} AS st (stream, last_id, last_at, last_token)
        VALUES ($1::text, $2::bigint, clock_timestamp(), $5::bigint)
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id,
            last_at = greatest(clock_timestamp(), st.last_at),
            last_token = EXCLUDED.last_token
        RETURNING st.last_id, st.last_at, st.epoch
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body, created_at)
        SELECT $1::text, bump.last_id - $2::bigint + b.ord, NULL, b.body::json, bump.last_at
        FROM bump,
            unnest(string_to_array($3::text, chr(30))) WITH ORDINALITY AS b(body, ord)
    )
    SELECT bump.last_id, {bump_micros}, pg_notify($4::text, {notice}), bump.epoch FROM bump
"""

# Several streams in one statement (coalesced appends): one JSON array of [stream,
# count, packed bodies] (the bodies of a stream packed as above). The counter rows are
# upserted in ORDER BY stream COLLATE "C": the ModifyTable node takes each row lock as
# the sorted rows reach it, so every multi-stream statement, in every process, locks
# its rows in the same order and two of them cannot deadlock (a single-stream
# statement holds one row). One pg_notify per stream, with that stream's new last id
# (and its messages, when small: see _notice_carrying).
_APPEND_STREAMS: Final = """
    WITH input AS MATERIALIZED (
        SELECT s.value->>0 AS stream, (s.value->>1)::bigint AS n, s.value->>2 AS packed
        FROM json_array_elements($1::json) AS s
    ), bump AS (
        INSERT INTO {streams} AS st (stream, last_id, last_at, last_token)
        SELECT input.stream, input.n, clock_timestamp(), $3::bigint
        FROM input ORDER BY input.stream COLLATE "C"
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id,
            last_at = greatest(clock_timestamp(), st.last_at),
            last_token = EXCLUDED.last_token
        RETURNING st.stream, st.last_id, st.last_at, st.epoch
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body, created_at)
        SELECT bump.stream, bump.last_id - input.n + b.ord, NULL, b.body::json, bump.last_at
        FROM bump JOIN input ON input.stream = bump.stream,
            unnest(string_to_array(input.packed, chr(30))) WITH ORDINALITY AS b(body, ord)
    )
    SELECT bump.stream, bump.last_id, {bump_micros}, pg_notify($2::text, {notice}), bump.epoch
    FROM bump JOIN input ON input.stream = bump.stream
"""

# Appends with idempotency keys, any number of streams, in ONE statement: no client
# holds a stream's lock across its own work (or while frozen). Input, shared by both
# statements below: $1 a JSON array of [stream, drafts sent] in the order of the
# drafts, each stream once; $2 a JSON array of keys, one per draft sent (null for
# none); $3 the bodies packed as above. The client sends each key of a stream at most
# once per statement (a repeat within the batch is its first draft's message, settled
# client-side), so the server needs no per-key window. Drafts, keys and bodies are
# zipped by position (ROWS FROM), and a draft's stream is the one whose range of
# positions holds it: no join on the JSON, no per-draft stream name sent.
#
# Two statements, chosen by the store for each batch (see _append.Appends.send_batch):
#
# _APPEND_KEYED_NEW, for keys this store has not sent before (the usual case: a
# retry usually comes back to the process that sent the original): no lookup at all.
# The drafts are inserted with the ids the counter bump reserves, exactly like an
# unkeyed batch, and the unique index on (stream, key) checks each key as its entry
# goes in (one descent of the index per key, where a lookup first costs two). A key
# stored before (by another process, or before this store started) makes the
# statement fail with a unique violation, storing nothing (ids stay dense, no notice
# goes out); the store then runs _APPEND_KEYED for the batch.
#
# _APPEND_KEYED, for a batch with a key this store has sent before (a retry), or after
# the unique index refused one: the keys marked in $6 (one character per draft sent,
# 't': look it up) are looked up, each with one probe of the unique index; the store
# marks the keys it sent before, or every key after a refusal (a key not looked up
# that was stored before fails the statement on the unique index, as above, and the
# store runs it again with every key marked). The drafts not found are inserted with
# the ids the counter bump reserves
# (rows locked in sorted order, as for unkeyed batches), and each stream that stored
# something is notified once (pg_notify in the bump's RETURNING: once per bumped row,
# whatever reads it). A stream whose drafts were all found is not bumped: no lock, no
# write, no notice; a statement that stores nothing writes no WAL and commits without
# waiting for a flush (a batch of retries of keys this store sent; retries of keys
# another process stored go in first, are refused, and then take this way).
#
# The key lookup runs on the statement's snapshot, taken before any lock wait: a
# same-key append that commits while this one waits is not seen, so this statement
# then tries to insert that key again and fails with a unique violation, storing
# nothing. The store runs it again (a new snapshot sees the key): rare, and correct
# thanks to the unique index.
#
# Output of both: a row per bumped stream: (stream, new last id, created_at µs of the
# batch, NULL, the stream's epoch); and (_APPEND_KEYED only) if any key was found, one
# row (NULL, NULL, NULL, [[draft number (from 1), id, created_at µs, same body?,
# original inlined?, original body, redacted?], …], NULL). Every append statement
# returns the epoch it wrote to (see chatbus._message.Appended).
# A redacted message is a tombstone: a retry of it replays it, never a conflict. "Same
# body" compares the stored text with the text sent (json keeps it verbatim): a replay needs
# no body back. A key reused with another body (a conflict) gets the original body
# in the reply when it is at most CONFLICT_INLINE_BYTES, so the error costs no second
# round trip; a bigger one is read afterwards (_BODIES_OF_KEYS), for the reply is
# written while the streams' locks are held, and a client that stops reading a big
# reply (frozen) would hold the locks with it.
_APPEND_KEYED_NEW: Final = """
    WITH input AS MATERIALIZED (
        SELECT s.value->>0 AS stream, (s.value->>1)::bigint AS n,
            (sum((s.value->>1)::bigint) OVER (ORDER BY s.ord))::bigint AS upto
        FROM json_array_elements($1::json) WITH ORDINALITY AS s(value, ord)
    ), bump AS (
        INSERT INTO {streams} AS st (stream, last_id, last_at, last_token)
        SELECT input.stream, input.n, clock_timestamp(), $5::bigint
        FROM input ORDER BY input.stream COLLATE "C"
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id,
            last_at = greatest(clock_timestamp(), st.last_at),
            last_token = EXCLUDED.last_token
        RETURNING st.stream, st.last_id, st.last_at, st.epoch
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body, created_at)
        SELECT b.stream, b.last_id - i.upto + x.ord, x.key, x.body::json, b.last_at
        FROM ROWS FROM (
            unnest(string_to_array($3::text, chr(30))), json_array_elements_text($2::json)
        ) WITH ORDINALITY AS x(body, key, ord)
        JOIN input AS i ON x.ord > i.upto - i.n AND x.ord <= i.upto
        JOIN bump AS b ON b.stream = i.stream
    )
    SELECT bump.stream, bump.last_id, {bump_micros}, pg_notify($4::text, {notice}), bump.epoch
    FROM bump
"""

# _APPEND_KEYED_NEW for one stream (the usual batch at a low rate): $1 the stream, $2
# how many drafts, $3 the bodies, $4 the channel, $5 the token, $6 the keys; the
# unkeyed single-stream statement's shape, so it costs about as much.
_APPEND_KEYED_NEW_ONE: Final = """
    WITH bump AS (
        INSERT INTO {streams} AS st (stream, last_id, last_at, last_token)
        VALUES ($1::text, $2::bigint, clock_timestamp(), $5::bigint)
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id,
            last_at = greatest(clock_timestamp(), st.last_at),
            last_token = EXCLUDED.last_token
        RETURNING st.last_id, st.last_at, st.epoch
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body, created_at)
        SELECT $1::text, bump.last_id - $2::bigint + x.ord, x.key, x.body::json, bump.last_at
        FROM bump, ROWS FROM (
            unnest(string_to_array($3::text, chr(30))), json_array_elements_text($6::json)
        ) WITH ORDINALITY AS x(body, key, ord)
    )
    SELECT $1::text, bump.last_id, {bump_micros}, pg_notify($4::text, {notice}), bump.epoch
    FROM bump
"""

_APPEND_KEYED: Final = """
    WITH input AS MATERIALIZED (
        SELECT s.value->>0 AS stream, (s.value->>1)::bigint AS n,
            (sum((s.value->>1)::bigint) OVER (ORDER BY s.ord))::bigint AS upto
        FROM json_array_elements($1::json) WITH ORDINALITY AS s(value, ord)
    ), d AS MATERIALIZED (
        -- LATERAL ... LIMIT 1: one probe of the unique index per key, never a scan of
        -- the table (a join here may be planned as one, the row counts being unknown).
        SELECT i.stream, x.key, x.body, x.ord, m.id, m.micros, m.same, m.body AS stored,
            m.redacted
        FROM ROWS FROM (
            unnest(string_to_array($3::text, chr(30))), json_array_elements_text($2::json),
            unnest(string_to_array($6::text, NULL))
        ) WITH ORDINALITY AS x(body, key, look, ord)
        JOIN input AS i ON x.ord > i.upto - i.n AND x.ord <= i.upto
        LEFT JOIN LATERAL (
            SELECT m.id, {found_micros} AS micros, m.body::text = x.body AS same, m.body,
                m.redacted
            FROM {messages} AS m
            WHERE x.look = 't' AND m.stream = i.stream AND m.key = x.key
                AND m.key IS NOT NULL
            LIMIT 1
        ) AS m ON true
    ), fresh AS MATERIALIZED (
        SELECT d.stream, d.key, d.body, row_number() OVER w AS n, count(*) OVER w AS of
        FROM d
        WHERE d.id IS NULL
        WINDOW w AS (PARTITION BY d.stream ORDER BY d.ord
            ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
    ), bump AS (
        INSERT INTO {streams} AS st (stream, last_id, last_at, last_token)
        SELECT f.stream, count(*), clock_timestamp(), $5::bigint
        FROM fresh AS f GROUP BY f.stream ORDER BY f.stream COLLATE "C"
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id,
            last_at = greatest(clock_timestamp(), st.last_at),
            last_token = EXCLUDED.last_token
        RETURNING st.stream, st.last_id, st.last_at, st.epoch,
            pg_notify($4::text, {keyed_notice})
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body, created_at)
        SELECT f.stream, b.last_id - f.of + f.n, f.key, f.body::json, b.last_at
        FROM fresh AS f JOIN bump AS b ON b.stream = f.stream
    )
    SELECT b.stream, b.last_id, {b_micros}, NULL, b.epoch FROM bump AS b
    UNION ALL
    SELECT NULL, NULL, NULL,
        json_agg(json_build_array(
            d.ord, d.id, d.micros, d.same AND NOT d.redacted,
            NOT d.same AND NOT d.redacted
                AND octet_length(d.stored::text) <= {conflict_inline},
            CASE WHEN NOT d.same AND NOT d.redacted
                AND octet_length(d.stored::text) <= {conflict_inline}
                THEN d.stored END,
            d.redacted
        ))::text,
        NULL
    FROM d WHERE d.id IS NOT NULL HAVING count(*) > 0
"""

# The bodies of the messages stored under keys $2 (a JSON array) of stream $1.
_BODIES_OF_KEYS: Final = """
    SELECT json_agg(json_build_array(m.key, m.body))
    FROM json_array_elements_text($2::json) AS k(key)
    CROSS JOIN LATERAL (
        SELECT m.key, m.body FROM {messages} AS m
        WHERE m.stream = $1::text AND m.key = k.key AND m.key IS NOT NULL LIMIT 1
    ) AS m
"""

# After a lost reply: did the batch with token $2 commit? Per stream, its head and the
# token of the last batch that stored something in it.
_OUTCOME: Final = (
    "SELECT json_agg(json_build_array(st.stream, st.last_id, st.last_token)) FROM {streams} AS st"
    " WHERE st.stream IN (SELECT json_array_elements_text($1::json))"
)

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
