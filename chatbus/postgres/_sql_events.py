"""The Postgres backend's statements for emitted events: retain, bound, lock, replay.

Owns: the text of a flush of events (:data:`_LOCK_EVENT_STREAMS`, :data:`_RETAIN_EVENTS`,
:data:`_TRIM_EVENTS`) and of what a joiner gets (:data:`_RETAINED_EVENTS`), as
templates that :class:`._sql.Queries` composes per schema. Pure text: no imports, no I/O.
"""

from __future__ import annotations

from typing import Final

# Emitted events, one round trip per flush of a bus's outbox: retain them for joiners
# (keyed: the latest per key, with its expiry; unkeyed: those after the newest
# position, older ones of the stream cleared; bounded by _TRIM_EVENTS) and NOTIFY
# them, packed into few payloads; of a stream's unkeyed events in one flush (a burst)
# only the newest $4 (the bus's EventRetention.max_events) are written, the rest would
# be trimmed at once. Input: $1 the encoded events (see
# chatbus._event.encode_event: [stream, after, key, ttl, created µs, emitter, seq,
# body]) and $3 the payloads (made by chatbus._event.encode_events), each list
# joined with U+001E, which JSON text never holds unescaped (as for message bodies):
# no JSON string escaping on the client, and each event parsed once here (as jsonb,
# for its fields, once: OFFSET 0 keeps the planner from parsing it per field; it is
# kept as the text sent). event_totals: see _TRIM_EVENTS.
_RETAIN_EVENTS: Final = """
    WITH input AS MATERIALIZED (
        SELECT x.j->>0 AS stream, x.j->>2 AS key, x.j->>5 AS emitter,
            (x.j->>6)::bigint AS seq, (x.j->>1)::bigint AS after, x.encoded,
            (x.j->>4)::bigint AS micros, (x.j->>3)::float8 AS ttl, x.ord
        FROM (
            SELECT e.encoded, e.encoded::jsonb AS j, e.ord
            FROM unnest(string_to_array($1::text, chr(30))) WITH ORDINALITY AS e(encoded, ord)
            OFFSET 0
        ) AS x
    ), keyed AS (
        INSERT INTO {events} AS r (stream, key, emitter, seq, after, encoded, micros, expires_at)
        SELECT DISTINCT ON (i.stream, i.key) i.stream, i.key, i.emitter, i.seq, i.after,
            i.encoded, i.micros,
            to_timestamp(i.micros / 1000000.0) + i.ttl * interval '1 second'
        FROM input AS i WHERE i.key IS NOT NULL
        ORDER BY i.stream, i.key, i.ord DESC
        ON CONFLICT (stream, key) WHERE key IS NOT NULL DO UPDATE SET
            emitter = EXCLUDED.emitter, seq = EXCLUDED.seq, after = EXCLUDED.after,
            encoded = EXCLUDED.encoded, micros = EXCLUDED.micros,
            expires_at = EXCLUDED.expires_at
        WHERE EXCLUDED.micros >= r.micros  -- a newer value flushed first stays
    ), unkeyed AS (
        INSERT INTO {events} (stream, key, emitter, seq, after, encoded, micros, expires_at)
        SELECT i.stream, NULL, i.emitter, i.seq, i.after, i.encoded, i.micros,
            to_timestamp(i.micros / 1000000.0) + i.ttl * interval '1 second'
        FROM (
            SELECT u.*, row_number() OVER (PARTITION BY u.stream ORDER BY u.ord DESC) AS newest
            FROM input AS u WHERE u.key IS NULL
        ) AS i
        WHERE i.newest <= $4::bigint
    ), cleared AS (
        DELETE FROM {events} AS r
        USING (
            SELECT i.stream, max(i.after) AS after FROM input AS i
            WHERE i.key IS NULL GROUP BY i.stream
        ) AS m
        WHERE r.stream = m.stream AND r.key IS NULL AND r.after < m.after
    ), totals AS (
        INSERT INTO {event_totals} AS t (stream, n, bytes)
        SELECT i.stream, count(*), sum(octet_length(i.encoded)) FROM input AS i
        GROUP BY i.stream
        ON CONFLICT (stream) DO UPDATE SET n = t.n + EXCLUDED.n, bytes = t.bytes + EXCLUDED.bytes
    )
    SELECT count(pg_notify($2::text, p.payload))
    FROM unnest(string_to_array($3::text, chr(30))) AS p(payload)
"""

# What an append carrying only unkeyed events runs before its own statement: their
# NOTIFYs, nothing retained (see _events.event_statements: such events are behind the
# head the append makes). $1 the channel, $2 the payloads joined with U+001E.
_NOTIFY_EVENTS: Final = """
    SELECT count(pg_notify($1::text, p.payload))
    FROM unnest(string_to_array($2::text, chr(30))) AS p(payload)
"""

# A flush of events is one transaction of three statements sent together (one round
# trip, see _pq.execute_pipeline), so that the bound on what a stream retains holds
# at every commit, whoever emits: first the streams' event locks, in one order (no
# deadlock between flushers); then _RETAIN_EVENTS, whose snapshot, taken once the
# locks are held, has every earlier flush; then the bound, by a statement of its own
# (a data-modifying CTE cannot see the rows its sibling inserts). $1: the streams.
# An append carrying events (PostgresStore.append_carrying) runs the three first, then
# its own statement, in the same transaction: event locks are always taken before
# counter rows, by anyone, so the two kinds of lock cannot deadlock either.
_LOCK_EVENT_STREAMS: Final = """
    SELECT count(pg_advisory_xact_lock(s.key)) FROM (
        SELECT DISTINCT hashtextextended(x.stream, {events_lock_seed}) AS key
        FROM json_array_elements_text($1::json) AS x(stream) ORDER BY 1
    ) AS s
"""

# Per stream at most $2 rows and $3 bytes (the flushing bus's EventRetention); the
# oldest go. Ranking a stream's rows costs O(rows), so not every flush does it:
# event_totals holds per stream an upper bound of what is retained (every flush adds
# what it wrote; replaced and cleared rows are not taken off), and only a stream whose
# bound passes a limit is ranked, newest first along events_stream_order, cut to $4
# rows and $5 bytes (9/10 of the limits), and its totals set to the exact figures of
# what is left.
_TRIM_EVENTS: Final = """
    WITH over AS (
        SELECT t.stream FROM {event_totals} AS t
        WHERE t.stream IN (SELECT json_array_elements_text($1::json))
            AND (t.n > $2::bigint OR t.bytes > $3::bigint)
    ), ranked AS MATERIALIZED (
        SELECT o.stream, x.ctid, x.size, x.n, x.bytes FROM over AS o,
        LATERAL (
            SELECT e.ctid, octet_length(e.encoded) AS size,
                count(*) OVER w AS n, sum(octet_length(e.encoded)) OVER w AS bytes
            FROM {events} AS e WHERE e.stream = o.stream
            WINDOW w AS (ORDER BY e.micros DESC, e.seq DESC ROWS UNBOUNDED PRECEDING)
        ) AS x
    ), dropped AS (
        DELETE FROM {events} AS r WHERE r.ctid IN (
            SELECT k.ctid FROM ranked AS k
            WHERE k.n > $4::bigint OR k.bytes > $5::bigint
        )
    )
    UPDATE {event_totals} AS t SET n = k.n, bytes = k.bytes
    FROM (
        SELECT o.stream, count(k.ctid) AS n, coalesce(sum(k.size), 0) AS bytes
        FROM over AS o LEFT JOIN ranked AS k ON k.stream = o.stream
            AND k.n <= $4::bigint AND k.bytes <= $5::bigint
        GROUP BY o.stream
    ) AS k
    WHERE t.stream = k.stream
"""

# What a joiner caught up to message $2 of stream $1 gets: the unkeyed events
# positioned at $2, and every keyed one, none expired, oldest first.
_RETAINED_EVENTS: Final = """
    SELECT json_agg(r.encoded::json ORDER BY r.micros, r.seq) FROM {events} AS r
    WHERE r.stream = $1::text AND (r.key IS NOT NULL OR r.after = $2::bigint)
        AND (r.expires_at IS NULL OR r.expires_at > now())
"""
