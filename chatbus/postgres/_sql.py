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


def ddl_marker(schema: str) -> sql.Composable:
    """The signature of the last object :func:`ddl` creates: if it exists, all do."""
    return sql.SQL("{}(json, text, bigint)").format(sql.Identifier(schema, "append_batch"))


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
        sql.SQL(_APPEND_FUNCTION).format(**_names(schema)),
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

    Every statement runs over :mod:`chatbus.postgres._pq` (``$n`` placeholders, text
    parameters) as a prepared statement, so each is kept as UTF-8 bytes.
    """

    append_unkeyed: bytes
    append_streams: bytes
    append_keyed: bytes
    read: bytes
    heads: bytes
    outcome: bytes

    @classmethod
    def for_schema(cls, schema: str) -> Queries:
        """Compose every statement for ``schema``."""
        names = _names(schema)
        return cls(
            append_unkeyed=_bytes(_APPEND_UNKEYED, names, _notice("$1::text", "bump.last_id")),
            append_streams=_bytes(_APPEND_STREAMS, names, _notice("bump.stream", "bump.last_id")),
            append_keyed=_bytes(_APPEND_KEYED, names),
            read=_bytes(_READ, names),
            heads=_bytes(_HEADS, names),
            outcome=_bytes(_OUTCOME, names),
        )


def _names(schema: str) -> dict[str, sql.Composable]:
    return {
        "streams": sql.Identifier(schema, "streams"),
        "messages": sql.Identifier(schema, "messages"),
        "append_function": sql.Identifier(schema, "append_batch"),
        "created_micros": _micros("created_at"),
        "bump_micros": _micros("bump.last_at"),
        "found_micros": _micros("m.created_at"),
        "at_micros": _micros("v_at"),
        "notice": _notice("r.stream", "v_last + v_new"),
        "group_bytes": sql.Literal(READ_GROUP_BYTES),
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
# stepped back). $5 is the batch's token (see _OUTCOME).
_APPEND_UNKEYED: Final = """
    WITH bump AS (
        INSERT INTO {streams} AS st (stream, last_id, last_at, last_token)
        VALUES ($1::text, $2::bigint, clock_timestamp(), $5::bigint)
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id,
            last_at = greatest(clock_timestamp(), st.last_at),
            last_token = EXCLUDED.last_token
        RETURNING st.last_id, st.last_at
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body, created_at)
        SELECT $1::text, bump.last_id - $2::bigint + b.ord, NULL, b.body::json, bump.last_at
        FROM bump,
            unnest(string_to_array($3::text, chr(30))) WITH ORDINALITY AS b(body, ord)
    )
    SELECT bump.last_id, {bump_micros}, pg_notify($4::text, {notice}) FROM bump
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
        INSERT INTO {streams} AS st (stream, last_id, last_at, last_token)
        SELECT input.stream, input.n, clock_timestamp(), $3::bigint
        FROM input ORDER BY input.stream COLLATE "C"
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id + EXCLUDED.last_id,
            last_at = greatest(clock_timestamp(), st.last_at),
            last_token = EXCLUDED.last_token
        RETURNING st.stream, st.last_id, st.last_at
    ), ins AS (
        INSERT INTO {messages} (stream, id, key, body, created_at)
        SELECT bump.stream, bump.last_id - input.n + b.ord, NULL, b.body::json, bump.last_at
        FROM bump JOIN input ON input.stream = bump.stream,
            unnest(string_to_array(input.packed, chr(30))) WITH ORDINALITY AS b(body, ord)
    )
    SELECT bump.stream, bump.last_id, {bump_micros}, pg_notify($2::text, {notice})
    FROM bump
"""

# Appends with idempotency keys, any number of streams, in ONE round trip: the whole
# transaction runs server-side, so no client can hold a stream's lock across its own
# work (or while it is frozen). Per stream, in sorted order (no deadlocks): take the
# counter row's lock; then, in statements that each take a new snapshot (PL/pgSQL,
# READ COMMITTED), find the keys already stored (every append of the stream that
# committed before the lock is visible) and insert the drafts whose key is NULL or
# new and first in the batch, with dense ids; bump the counter and notify once.
# Input: a JSON array of [stream, [key or null per draft], packed bodies].
# Output per stream: new last id, created_at µs of the batch, and the messages found
# for its keys as [[key, id, body, created_at µs], …] (NULL if none).
_APPEND_FUNCTION: Final = """
    CREATE OR REPLACE FUNCTION {append_function}(p_input json, p_channel text, p_token bigint)
    RETURNS TABLE (o_stream text, o_last_id bigint, o_micros bigint, o_found json)
    LANGUAGE plpgsql AS $chatbus$
    DECLARE
        r record;
        v_last bigint;
        v_at timestamptz;
        v_new bigint;
    BEGIN
        FOR r IN
            SELECT e.value->>0 AS stream, e.value->1 AS keys, e.value->>2 AS packed
            FROM json_array_elements(p_input) AS e
            ORDER BY (e.value->>0) COLLATE "C"
        LOOP
            INSERT INTO {streams} AS st (stream, last_id) VALUES (r.stream, 0)
            ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id
            RETURNING st.last_id, greatest(clock_timestamp(), st.last_at) INTO v_last, v_at;
            o_found := (
                SELECT json_agg(json_build_array(m.key, m.id, m.body, {found_micros}))
                FROM {messages} AS m
                WHERE m.stream = r.stream
                    AND m.key IN (SELECT json_array_elements_text(r.keys))
            );
            INSERT INTO {messages} (stream, id, key, body, created_at)
            SELECT r.stream, v_last + row_number() OVER (ORDER BY d.ord), d.key, d.body::json,
                v_at
            FROM (
                SELECT b.body, b.ord, k.value #>> '{{}}' AS key,
                    row_number() OVER (PARTITION BY k.value #>> '{{}}' ORDER BY b.ord) AS nth
                FROM unnest(string_to_array(r.packed, chr(30))) WITH ORDINALITY AS b(body, ord)
                JOIN json_array_elements(r.keys) WITH ORDINALITY AS k(value, ord)
                    ON k.ord = b.ord
            ) AS d
            WHERE d.key IS NULL OR (d.nth = 1 AND NOT EXISTS (
                SELECT 1 FROM {messages} AS m WHERE m.stream = r.stream AND m.key = d.key
            ));
            GET DIAGNOSTICS v_new = ROW_COUNT;
            IF v_new > 0 THEN
                UPDATE {streams} SET last_id = v_last + v_new, last_at = v_at,
                    last_token = p_token
                WHERE stream = r.stream;
                PERFORM pg_notify(p_channel, {notice});
            END IF;
            o_stream := r.stream;
            o_last_id := v_last + v_new;
            o_micros := {at_micros};
            RETURN NEXT;
        END LOOP;
    END
    $chatbus$
"""

_APPEND_KEYED: Final = (
    "SELECT o_stream, o_last_id, o_micros, o_found FROM {append_function}"
    "($1::json, $2::text, $3::bigint)"
)

# After a lost reply: did the batch with token $2 commit? Per stream, its head and the
# token of the last batch that stored something in it.
_OUTCOME: Final = (
    "SELECT json_agg(json_build_array(st.stream, st.last_id, st.last_token)) FROM {streams} AS st"
    " WHERE st.stream IN (SELECT json_array_elements_text($1::json))"
)

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
