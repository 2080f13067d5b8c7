"""Statement: client CPU per single-statement round trip, by way of talking to Postgres.

Why chatbus runs its hot statements over ``psycopg.pq`` from trio rather than
through psycopg's asyncio API: the same one-row read (``PostgresStore.read(stream,
0, 1)``'s statement) is timed three ways in one process, interleaved, and reported
as this process's CPU time (``time.process_time``: user + system, the server's
work excluded) per statement:

* chatbus: ``PostgresStore.read`` (lent connection, prepared statement, trio waits);
* baseline "trio-asyncio": psycopg's ``AsyncConnection`` on a trio-asyncio loop, one
  ``aio_as_trio`` crossing per statement (chatbus's previous path);
* baseline "sync": synchronous psycopg on one connection, no event loop at all.

Ratios are chatbus / baseline: below 1 means chatbus spends less CPU.

And what an append statement costs the server, keyed against unkeyed: chatbus's own
append statements (``chatbus.postgres._sql``) for one merged batch of
``statement_streams`` streams x ``statement_drafts`` drafts, run alternately on one
connection with ``synchronous_commit = off`` (so the WAL flush, the same for both, is
left out), prepared and planned generically as the store runs them; the median wall
time per statement, round trip included (the client's part is a few µs of libpq).
Every keyed draft has a new key. Two keyed rows: the statement the store sends for keys
it has not sent before (inserted at once, the unique index checking each key as its
entry goes in), and the one it sends after the unique index refused a key (every key
looked up first with one probe of the unique index; a batch with a retry looks up
only the keys the store sent before).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import trio
import trio_asyncio
from psycopg import sql

import chatbus

from . import _backends, _pg
from ._backends import CHATBUS_POSTGRES
from ._report import Row, measured
from ._scenario import Context, Scenario

STREAM = "statement"


def _query(schema: str) -> sql.Composed:
    """The read as psycopg runs it (same table, same shape as the store's)."""
    return sql.SQL(
        "SELECT id, key, body::text, created_at FROM {}"
        " WHERE stream = %s AND id > %s ORDER BY id LIMIT %s"
    ).format(sql.Identifier(schema, "messages"))


def _sync_read(dsn: str, schema: str, statements: int) -> float:
    """CPU µs per read with synchronous psycopg (prepared after 5 runs, as usual)."""
    query = _query(schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(20):
            conn.execute(query, (STREAM, 0, 1)).fetchall()
        started = time.process_time()
        for _ in range(statements):
            conn.execute(query, (STREAM, 0, 1)).fetchall()
        return (time.process_time() - started) / statements * 1e6


async def _trio_paths(dsn: str, schema: str, statements: int) -> tuple[float, float]:
    """CPU µs per read: chatbus's store, then psycopg's asyncio API via trio-asyncio."""
    async with (
        trio_asyncio.open_loop() as loop,
        _backends.open_postgres_pair(dsn, schema=schema, drop_schema=False) as (store, _),
    ):
        await store.append(
            STREAM, [chatbus.Draft(body_json='{"n": 0, "text": "hello"}', key=None)]
        )
        for _ in range(20):  # warm up: lend a connection, prepare the statement
            await store.read(STREAM, 0, 1)
        started = time.process_time()
        for _ in range(statements):
            await store.read(STREAM, 0, 1)
        chatbus_cpu = (time.process_time() - started) / statements * 1e6

    query = _query(schema)
    async with trio_asyncio.open_loop() as loop:
        connect = trio_asyncio.aio_as_trio(psycopg.AsyncConnection.connect, loop=loop)
        conn: Any = await connect(dsn, autocommit=True)

        async def one() -> None:
            cur = await conn.execute(query, (STREAM, 0, 1))
            await cur.fetchall()

        crossing = trio_asyncio.aio_as_trio(one, loop=loop)
        try:
            for _ in range(20):
                await crossing()
            started = time.process_time()
            for _ in range(statements):
                await crossing()
            aio_cpu = (time.process_time() - started) / statements * 1e6
        finally:
            await trio_asyncio.aio_as_trio(conn.close, loop=loop)()
    return chatbus_cpu, aio_cpu


def _append_statements(
    dsn: str, schema: str, streams: int, drafts: int, count: int
) -> tuple[dict[bytes, list[float]], dict[bytes, list[float]]]:
    """Server time (µs: wall, and the backend's CPU) of the keyed append statements and
    the unkeyed one, interleaved.

    ``n``: keyed, inserted at once (keys the store has not sent: the usual batch);
    ``k``: keyed, every key looked up first (as after the unique index refused one; a
    batch with a retry looks up only the retried keys); ``u``: unkeyed.
    """
    from chatbus._codec import BODY_SEPARATOR
    from chatbus.postgres._sql import Queries, ddl

    queries = Queries.for_schema(schema)
    names = [f"chat-{i}" for i in range(streams)]
    serial = 0

    def bodies(stream: int) -> str:
        return BODY_SEPARATOR.join(
            json.dumps({"n": stream, "i": i, "text": "hello"}) for i in range(drafts)
        )

    def keyed() -> list[bytes]:
        nonlocal serial
        keys = []
        for _ in range(streams * drafts):
            serial += 1
            keys.append(f"key-{serial}")
        packed = BODY_SEPARATOR.join(bodies(s) for s in range(streams))
        counts = [[name, drafts] for name in names]
        return [json.dumps(counts).encode(), json.dumps(keys).encode(), packed.encode()]

    def unkeyed() -> list[bytes]:
        request = [[name, drafts, bodies(s)] for s, name in enumerate(names)]
        return [json.dumps(request).encode()]

    timings: dict[bytes, list[float]] = {b"n": [], b"k": [], b"u": []}
    cpu: dict[bytes, list[float]] = {b"n": [], b"k": [], b"u": []}
    with psycopg.connect(dsn, autocommit=True) as conn, _backend_cpu(conn) as backend_us:
        for statement in ddl(schema):
            conn.execute(statement)
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        pgconn = conn.pgconn
        pgconn.prepare(b"n", queries.append_keyed_new)
        pgconn.prepare(b"k", queries.append_keyed)
        pgconn.prepare(b"u", queries.append_streams)
        tail = [b"bench", b"1"]
        for i in range(count + 20):
            every_key = [b"t" * (streams * drafts)]
            for name, params in (
                (b"n", keyed()),
                (b"k", keyed() + tail + every_key),
                (b"u", unkeyed()),
            ):
                cpu_started = backend_us()
                started = time.perf_counter()
                result = pgconn.exec_prepared(name, params if name == b"k" else params + tail)
                elapsed = time.perf_counter() - started
                cpu_used = backend_us() - cpu_started
                if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
                    raise RuntimeError(result.get_error_message())
                if i >= 20:  # warmed up
                    timings[name].append(elapsed * 1e6)
                    cpu[name].append(cpu_used)
    return timings, cpu


@contextlib.contextmanager
def _backend_cpu(conn: psycopg.Connection[Any]) -> Iterator[Callable[[], float]]:
    """The CPU time (µs) the connection's server backend has run so far, read from its
    ``/proc/<pid>/schedstat`` when the server runs on this machine (else always 0).

    Unlike wall time, it leaves out the waits: for a CPU on a busy machine, and for
    the cluster-wide lock every notifying transaction holds through its commit.
    """
    try:
        stat = open(f"/proc/{conn.pgconn.backend_pid}/schedstat", "rb")  # noqa: SIM115
    except OSError:
        yield lambda: 0.0
        return
    with stat:

        def read() -> float:
            stat.seek(0)
            return int(stat.read().split()[0]) / 1000.0

        yield read


def run(context: Context, backend: str) -> list[Row]:
    """CPU per statement: chatbus's read against trio-asyncio psycopg and sync psycopg."""
    sizes, dsn = context.sizes, context.dsn
    chatbus_samples: list[float] = []
    aio_samples: list[float] = []
    sync_samples: list[float] = []
    statements = sizes.statement_count
    for _ in range(sizes.repeats):
        schema = _pg.scratch_schema("stmt")
        try:
            chatbus_cpu, aio_cpu = trio.run(_trio_paths, dsn, schema, statements)
            chatbus_samples.append(chatbus_cpu)
            aio_samples.append(aio_cpu)
            sync_samples.append(_sync_read(dsn, schema, statements))
        finally:
            _pg.drop_schema(dsn, schema)
    medians: dict[bytes, list[float]] = {b"n": [], b"k": [], b"u": []}
    cpu_medians: dict[bytes, list[float]] = {b"n": [], b"k": [], b"u": []}
    for _ in range(sizes.repeats):
        schema = _pg.scratch_schema("append")
        try:
            timings, cpu = _append_statements(
                dsn, schema, sizes.statement_streams, sizes.statement_drafts, statements // 10
            )
            for name, samples in timings.items():
                medians[name].append(statistics.median(samples))
                cpu_medians[name].append(statistics.median(cpu[name]))
        finally:
            _pg.drop_schema(dsn, schema)
    note = f"{statements} one-row reads per run; process CPU (user+sys) per statement"
    baselines = [
        ("psycopg via trio-asyncio", aio_samples, note),
        ("sync psycopg", sync_samples, "same chatbus runs"),
    ]
    shape = f"{sizes.statement_streams} streams x {sizes.statement_drafts} drafts"
    cpu_of = {name: statistics.median(values) for name, values in cpu_medians.items()}
    cpu_note = (
        f"; backend CPU (schedstat) {cpu_of[b'n']:,.0f} / {cpu_of[b'k']:,.0f} / unkeyed"
        f" {cpu_of[b'u']:,.0f} us (inserted at once / lookup first / unkeyed)"
    )
    return [
        *(
            measured(
                scenario="statement",
                backend="postgres",
                metric="client CPU/read",
                unit="us",
                samples=chatbus_samples,
                baseline_name=name,
                baseline_samples=samples,
                target="report",
                note=row_note,
            )
            for name, samples, row_note in baselines
        ),
        measured(
            scenario="statement",
            backend="postgres",
            metric="keyed append, server",
            unit="us",
            samples=medians[b"n"],
            baseline_name="unkeyed append",
            baseline_samples=medians[b"u"],
            target="report",
            note=f"one merged statement of {shape}, new keys inserted at once (the unique index"
            f" checks them), synchronous_commit off; median wall time per statement,"
            f" {statements // 10} of each per run{cpu_note}",
        ),
        measured(
            scenario="statement",
            backend="postgres",
            metric="keyed append, lookup first",
            unit="us",
            samples=medians[b"k"],
            baseline_name="unkeyed append",
            baseline_samples=medians[b"u"],
            target="report",
            note="the same batch, every key looked up first (after the unique index refused"
            " a key; a batch with retries looks up only the retried keys), same runs",
        ),
    ]


SCENARIO = Scenario(
    name="statement",
    label="statement",
    needs={"postgres": CHATBUS_POSTGRES},
    entry=run,
    summary="client CPU per one-row read: chatbus pq path vs trio-asyncio and sync psycopg",
)
