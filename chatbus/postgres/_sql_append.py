"""The Postgres backend's append statements: unkeyed and keyed, one stream or several.

Owns: the text of every append (:data:`_APPEND_UNKEYED`, :data:`_APPEND_STREAMS`,
:data:`_APPEND_KEYED_NEW`, :data:`_APPEND_KEYED_NEW_ONE`, :data:`_APPEND_KEYED`), of the
read of conflicting keys' bodies (:data:`_BODIES_OF_KEYS`) and of the outcome of a
batch whose reply was lost (:data:`_OUTCOME`), as templates that :class:`._sql.Queries`
composes per schema (``{notice}``: see :func:`._sql._notice_carrying`). Pure text: no
imports, no I/O.
"""

from __future__ import annotations

from typing import Final

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
