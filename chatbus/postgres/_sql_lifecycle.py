"""The Postgres backend's stream lifecycle statements: info, trim, retention, delete, redact.

Owns: the text of :meth:`PostgresStore.stream_info`, ``trim``, ``over_retention``
(the retention sweep), ``delete_stream`` and ``redact``, as templates that
:class:`._sql.Queries` composes per schema. Pure text: no imports, no I/O.
"""

from __future__ import annotations

from typing import Final

_STREAM_INFO: Final = (
    "SELECT st.last_id, st.first_id, st.epoch FROM {streams} AS st WHERE st.stream = $1::text"
)

# Trim, first: the stream's first retained id moves (never past head + 1, never
# back), at once for every reader, if the stream is at epoch $4 (-1: whatever its
# epoch; the statements take text parameters only, so -1 stands for "none" here and
# below, made NULL by nullif); returns it. Then the rows go, in batches
# (_TRIM_BATCH): rows without a key are deleted; rows with a key stay (their keys
# still answer a retried publish with the original id) but are no longer history
# (see _sql._READ), until they are $3 seconds old ($3 = -1: as long as the stream lives).
_TRIM_FIRST: Final = """
    WITH t AS (
        UPDATE {streams} AS st
        SET first_id = greatest(st.first_id, least($2::bigint, st.last_id + 1))
        WHERE st.stream = $1::text
            AND (nullif($4::bigint, -1) IS NULL OR st.epoch = $4::bigint)
        RETURNING st.first_id
    )
    SELECT t.first_id, pg_notify($3::text, json_build_object(
        'stream', $1::text, 'reset', true, 'first_id', t.first_id)::text)
    FROM t
"""

_TRIM_BATCH: Final = """
    DELETE FROM {messages} AS m WHERE m.ctid IN (
        SELECT x.ctid FROM {messages} AS x
        WHERE x.stream = $1::text AND x.id < $2::bigint
            AND (x.key IS NULL
                OR x.created_at < now() - nullif($3::float8, -1) * interval '1 second')
        LIMIT {lifecycle_batch}
    )
"""

# Retention: examine the streams named after $1, $2 of them in name order (one index
# range of the counter table), and return, as one JSON value, [last name examined,
# how many, [[stream, before, more, epoch], ...]] for those holding messages beyond the
# policy: not among the last $3 ($3 = -1: no count rule), or created more than $4
# seconds ago ($4 = -1: no age rule); or trimmed rows whose keys are older than $5
# seconds. created_at never decreases in id order, so the first young message is
# found by walking the primary key from the first retained id, at most $6 rows per
# stream (more = true: the window was all old, there is more to trim after it).
# A probe or two of the primary key per stream: bounded work, no lock taken.
_OVER_RETENTION: Final = """
    WITH policy AS MATERIALIZED (
        SELECT nullif($3::bigint, -1) AS max_messages, nullif($4::float8, -1) AS max_age,
            nullif($5::float8, -1) AS keys_for
    ), page AS MATERIALIZED (
        SELECT st.stream, st.last_id, st.first_id, st.epoch FROM {streams} AS st
        WHERE st.stream > $1::text ORDER BY st.stream LIMIT $2::bigint
    ), aged AS (
        SELECT p.*, CASE WHEN pol.max_age IS NULL THEN NULL ELSE coalesce((
            SELECT m.id FROM {messages} AS m
            WHERE m.stream = p.stream AND m.id >= p.first_id
                AND m.id < p.first_id + $6::bigint
                AND m.created_at >= now() - pol.max_age * interval '1 second'
            ORDER BY m.id LIMIT 1), least(p.first_id + $6::bigint, p.last_id + 1)) END AS young
        FROM page AS p, policy AS pol
    ), t AS (
        SELECT a.stream, a.first_id, a.epoch,
            greatest(a.first_id, a.last_id + 1 - pol.max_messages, a.young) AS before,
            coalesce(a.young = a.first_id + $6::bigint AND a.young <= a.last_id, false) AS more,
            pol.keys_for IS NOT NULL AND EXISTS (
                SELECT 1 FROM (
                    SELECT m.id, m.created_at FROM {messages} AS m
                    WHERE m.stream = a.stream ORDER BY m.id LIMIT 1
                ) AS o
                WHERE o.id < a.first_id
                    AND o.created_at < now() - pol.keys_for * interval '1 second'
            ) AS stale_keys
        FROM aged AS a, policy AS pol
    )
    SELECT json_build_array(
        (SELECT p.stream FROM page AS p ORDER BY p.stream DESC LIMIT 1),
        (SELECT count(*) FROM page),
        coalesce((
            SELECT json_agg(
                json_build_array(t.stream, t.before, t.more, t.epoch) ORDER BY t.stream)
            FROM t WHERE t.before > t.first_id OR t.stale_keys), '[]'::json))::text
"""

# Delete, first: the stream's messages in batches (readers may still see the rest).
_DELETE_BATCH: Final = """
    DELETE FROM {messages} AS m WHERE m.ctid IN (
        SELECT x.ctid FROM {messages} AS x WHERE x.stream = $1::text LIMIT {lifecycle_batch}
    )
"""

# Delete, last: one transaction of these statements, one by one (psycopg; each takes
# a new snapshot): lock the stream's events (as a flush does: one in progress commits
# first, and is deleted) and the counter row, so no append of the stream runs
# meanwhile; delete what is left of the messages, the retained events, their totals
# and the counter row; tell every listener. The next append creates the row again: a
# new epoch, ids from 1. The lock on the counter row is an upsert, not SELECT … FOR
# UPDATE: a stream with no counter row yet (only events) would give that nothing to
# lock, and appends committing between these statements would keep their messages but
# lose their row to the delete, so the next append reused their ids.
_DELETE_STREAM: Final = """
    SELECT pg_advisory_xact_lock(hashtextextended(%(stream)s::text, {events_lock_seed}));
    INSERT INTO {streams} AS st (stream, last_id) VALUES (%(stream)s::text, 0)
        ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id;
    DELETE FROM {messages} WHERE stream = %(stream)s::text;
    DELETE FROM {events} WHERE stream = %(stream)s::text;
    DELETE FROM {event_totals} WHERE stream = %(stream)s::text;
    DELETE FROM {streams} WHERE stream = %(stream)s::text;
    SELECT pg_notify(%(channel)s::text, {reset_notice});
"""

# Redact: the body becomes JSON null, the row keeps id, key and created_at; every
# listener is told at the commit (their caches drop the body); returns the tombstone
# as [key, created_at µs] (no row: not retained).
_REDACT: Final = """
    WITH r AS (
        UPDATE {messages} AS m SET body = 'null'::json, redacted = true
        WHERE m.stream = $1::text AND m.id = $2::bigint
            AND m.id >= coalesce(
                (SELECT st.first_id FROM {streams} AS st WHERE st.stream = $1::text), 1)
        RETURNING json_build_array(m.key, {found_micros}) AS tombstone
    )
    SELECT r.tombstone, pg_notify($3::text, json_build_object(
        'stream', $1::text, 'redacted', $2::bigint)::text)
    FROM r
"""
