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
"""

from __future__ import annotations

import time
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
    note = f"{statements} one-row reads per run; process CPU (user+sys) per statement"
    baselines = [
        ("psycopg via trio-asyncio", aio_samples, note),
        ("sync psycopg", sync_samples, "same chatbus runs"),
    ]
    return [
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
    ]


SCENARIO = Scenario(
    name="statement",
    label="statement",
    needs={"postgres": CHATBUS_POSTGRES},
    entry=run,
    summary="client CPU per one-row read: chatbus pq path vs trio-asyncio and sync psycopg",
)
