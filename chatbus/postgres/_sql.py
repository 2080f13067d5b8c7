"""The Postgres backend's server-side text: statements, DDL, channel and statement names.

Pure text, composed once per schema with :class:`psycopg.sql.Identifier` (never by
string formatting). Imports psycopg's :mod:`psycopg.sql` only; no I/O.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Final, final

import attrs
from psycopg import sql


def channel_for_schema(schema: str) -> str:
    """Return the NOTIFY channel used by the store and notifier of ``schema``.

    Derived deterministically (``chatbus_`` + MD5 of the schema name), so it is a
    valid identifier of fixed length whatever the schema is called.
    """
    return "chatbus_" + hashlib.md5(schema.encode("utf-8")).hexdigest()


@functools.cache
def statement_name(query: bytes) -> bytes:
    """A prepared-statement name for ``query``: ``chatbus_`` and a digest of its text.

    The text holds the schema, so the name stays valid for as long as the session.
    """
    return b"chatbus_" + hashlib.blake2b(query, digest_size=12).hexdigest().encode("ascii")


def ddl_lock_key(schema: str) -> int:
    """A signed 64-bit advisory lock key, fixed per schema, that serialises the DDL."""
    digest = hashlib.md5(b"chatbus-ddl:" + schema.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


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


#: Groups of a read page are cut at this many bytes of bodies (see Queries.read).
READ_GROUP_BYTES: Final = 16 * 1024 * 1024


@final
@attrs.frozen
class Queries:
    """The store's SQL for one schema.

    The statements run by :mod:`chatbus.postgres._pq` (``$n`` placeholders, text
    parameters) are kept as UTF-8 bytes; the keyed ones, run by psycopg, as plain
    strings (psycopg converts a query once, cached by its text).
    """

    append_unkeyed: bytes
    append_streams: bytes
    lock_stream: str
    find_keys: str
    insert_keyed: str
    read: bytes
    heads: bytes

    @classmethod
    def for_schema(cls, schema: str) -> Queries:
        """Compose every statement for ``schema``."""
        names = {
            "streams": sql.Identifier(schema, "streams"),
            "messages": sql.Identifier(schema, "messages"),
            "now_micros": _micros("now()"),
            "created_micros": _micros("created_at"),
            "group_bytes": sql.Literal(READ_GROUP_BYTES),
        }
        return cls(
            append_unkeyed=_bytes(_APPEND_UNKEYED, names, _notice("$1::text", "bump.last_id")),
            append_streams=_bytes(_APPEND_STREAMS, names, _notice("bump.stream", "bump.last_id")),
            lock_stream=_text(_LOCK_STREAM, names),
            find_keys=_text(_FIND_KEYS, names),
            insert_keyed=_text(
                _INSERT_KEYED, names, _notice("%(stream)s::text", "%(last_id)s::bigint")
            ),
            read=_bytes(_READ, names),
            heads=_bytes(_HEADS, names),
        )


def _text(
    template: str, names: dict[str, sql.Composable], notice: sql.Composable | None = None
) -> str:
    extra = {} if notice is None else {"notice": notice}
    return sql.SQL(template).format(**names, **extra).as_string(None)


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
# just reserved, and notify once.
_APPEND_UNKEYED: Final = """
    WITH bump AS (
        INSERT INTO {streams} AS st (stream, last_id)
        VALUES ($1::text, $2::bigint)
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id
        RETURNING st.last_id
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body)
        SELECT $1::text, bump.last_id - $2::bigint + b.ord, NULL, b.body::json
        FROM bump,
            unnest(string_to_array($3::text, chr(30))) WITH ORDINALITY AS b(body, ord)
    )
    SELECT bump.last_id, {now_micros}, pg_notify($4::text, {notice}) FROM bump
"""

# Several streams in one statement (coalesced appends): one JSON array of [stream,
# count, packed bodies] (the bodies of a stream packed as above). The counter rows are
# upserted in ORDER BY stream COLLATE "C": the ModifyTable node takes each row lock as
# the sorted rows reach it, so every multi-stream statement, in every process, locks
# its rows in the same order and two of them cannot deadlock (a single-stream
# statement holds one row). One pg_notify per stream, with that stream's new last id.
_APPEND_STREAMS: Final = """
    WITH input AS MATERIALIZED (
        SELECT s.value->>0 AS stream, (s.value->>1)::bigint AS n, s.value->>2 AS packed
        FROM json_array_elements($1::json) AS s
    ), bump AS (
        INSERT INTO {streams} AS st (stream, last_id)
        SELECT input.stream, input.n FROM input ORDER BY input.stream COLLATE "C"
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id
        RETURNING st.stream, st.last_id
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body)
        SELECT bump.stream, bump.last_id - input.n + b.ord, NULL, b.body::json
        FROM bump JOIN input ON input.stream = bump.stream,
            unnest(string_to_array(input.packed, chr(30))) WITH ORDINALITY AS b(body, ord)
    )
    SELECT bump.stream, bump.last_id, {now_micros}, pg_notify($2::text, {notice})
    FROM bump
"""

# Keyed appends take the row lock first, then look the keys up in a new statement (a
# new snapshot, taken after the lock), so concurrent appends with the same key
# serialise and the later one finds the earlier one's message.
_LOCK_STREAM: Final = """
    INSERT INTO {streams} AS st (stream, last_id) VALUES (%s::text, 0)
    ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id
    RETURNING st.last_id
"""

# One index probe per key, whatever the statistics say. Keys (any text but NUL) travel
# as a binary text[]: no escaping.
_FIND_KEYS: Final = (
    "SELECT m.key, m.id, m.body::text, m.created_at"
    " FROM unnest(%b::text[]) AS k(key) JOIN {messages} AS m"
    " ON m.stream = %s::text AND m.key = k.key AND m.key IS NOT NULL"
)

_INSERT_KEYED: Final = """
    WITH ins AS (
        INSERT INTO {messages} (stream, id, key, body)
        SELECT %(stream)s::text, %(first)s::bigint - 1 + b.ord, b.key, b.body::json
        FROM unnest(
            %(keys)b::text[], string_to_array(%(bodies)s::text, chr(30))
        ) WITH ORDINALITY AS b(key, body, ord)
    ), upd AS (
        UPDATE {streams} SET last_id = %(last_id)s::bigint WHERE stream = %(stream)s::text
    )
    SELECT now(), pg_notify(%(channel)s::text, {notice})
"""

# A page as a few JSON values, each [[id, key, body, created_at µs], …]: one json.loads
# decodes the ids, keys and bodies of many rows at once (body is a json column,
# embedded verbatim). Rows are grouped by the running total of their body sizes,
# 16 MiB a group, so no value nears Postgres's 1 GB limit on one string whatever the
# page holds.
_READ: Final = """
    SELECT json_agg(json_build_array(m.id, m.key, m.body, m.micros) ORDER BY m.id)
    FROM (
        SELECT id, key, body,
            {created_micros} AS micros,
            sum(octet_length(body::text)) OVER (ORDER BY id) AS running
        FROM {messages}
        WHERE stream = $1::text AND id > $2::bigint ORDER BY id LIMIT $3::bigint
    ) AS m
    GROUP BY m.running / {group_bytes}
    ORDER BY min(m.id)
"""

_HEADS: Final = (
    "SELECT json_object_agg(st.stream, st.last_id) FROM {streams} AS st"
    " WHERE st.stream IN (SELECT json_array_elements_text($1::json))"
)
