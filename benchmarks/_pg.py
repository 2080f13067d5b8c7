"""Postgres helpers: reachability, scratch schemas, connection counts, raw baselines.

The raw baselines use **synchronous psycopg 3 with one thread per connection**
(sync psycopg has the lowest per-statement overhead here, so it is the strictest
baseline). Each transaction is a single autocommit statement, one round trip:
``WITH ins AS (INSERT … RETURNING id) SELECT pg_notify(…)``.
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql


def unreachable_reason(dsn: str) -> str | None:
    """None if ``dsn`` accepts a connection, else why not (one line)."""
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"Postgres not reachable at {dsn}: {type(exc).__name__}: {exc}".splitlines()[0]
    return None


def chatbus_postgres_missing() -> str | None:
    """None if ``chatbus.postgres.open_postgres`` can be imported, else why not."""
    try:
        from chatbus import postgres
    except Exception as exc:
        return f"chatbus.postgres not importable: {type(exc).__name__}: {exc}"
    if not hasattr(postgres, "open_postgres"):
        return "chatbus.postgres has no open_postgres yet"
    return None


def chatbus_pool_size() -> int:
    """The default ``max_connections`` of ``chatbus.postgres.open_postgres`` (10 if unknown)."""
    try:
        from chatbus import postgres

        default = inspect.signature(postgres.open_postgres).parameters["max_connections"].default
    except Exception:
        return 10
    return int(default) if isinstance(default, int) else 10


def scratch_schema(prefix: str) -> str:
    """A fresh schema name, unique to this process and call."""
    return f"bench_{prefix}_{os.getpid()}_{secrets.token_hex(3)}"


def drop_schema(dsn: str, schema: str) -> None:
    """Drop ``schema`` and everything in it (ignoring a missing schema)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _own_local_ports() -> set[int]:
    """Local TCP ports of this process's sockets (Linux /proc), for pg_stat_activity."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def own_connections(dsn: str) -> dict[str, int]:
    """This process's server connections by ``application_name`` (TCP DSNs only).

    The counting connection itself is excluded. Matching is by client port, so other
    processes using the same database (tests, colleagues) are not counted.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        ports = _own_local_ports()
        rows = conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity"
            " WHERE client_port = ANY(%s) AND pid <> pg_backend_pid()"
            " GROUP BY application_name",
            (sorted(ports),),
        ).fetchall()
    return {str(name): int(count) for name, count in rows}


def _create_scratch(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigserial PRIMARY KEY, stream text NOT NULL,"
                " body json NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(schema, "messages"))
        )


def _run_threads(connections: int, work: Callable[[int], None]) -> float:
    """Run ``work(index)`` in ``connections`` threads at once; return the elapsed time."""
    barrier = threading.Barrier(connections + 1)
    errors: list[BaseException] = []

    def target(index: int) -> None:
        try:
            barrier.wait()
            work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def raw_throughput(
    dsn: str, *, messages: int, per_transaction: int, connections: int, streams: int
) -> float:
    """Raw psycopg INSERT + pg_notify, ``per_transaction`` messages per transaction.

    ``connections`` threads, each with its own autocommit connection, share the
    messages; each transaction is one statement (insert the rows, notify once).
    Returns committed messages per second. Uses (and drops) a scratch schema.
    """
    schema = scratch_schema("raw")
    _create_scratch(dsn, schema)
    try:
        table = sql.Identifier(schema, "messages")
        channel = f"{schema}_raw"
        statement = sql.SQL(
            "WITH ins AS (INSERT INTO {} (stream, body)"
            " SELECT %(stream)s, b::json FROM unnest(%(bodies)s::text[]) AS b RETURNING id)"
            " SELECT pg_notify(%(channel)s,"
            " json_build_object('stream', %(stream)s::text, 'last_id', max(id))::text) FROM ins"
        ).format(table)
        transactions = max(1, messages // per_transaction)
        conns = [psycopg.connect(dsn, autocommit=True) for _ in range(connections)]
        try:
            for conn in conns:  # warm up: prepare nothing, just touch the table
                conn.execute("SELECT 1")

            def work(index: int) -> None:
                conn = conns[index]
                stream = f"raw-{index % streams}"
                for n in range(index, transactions, connections):
                    bodies = [
                        json.dumps({"n": n, "i": i, "text": "hello"})
                        for i in range(per_transaction)
                    ]
                    conn.execute(
                        statement, {"stream": stream, "bodies": bodies, "channel": channel}
                    )

            elapsed = _run_threads(connections, work)
        finally:
            for conn in conns:
                conn.close()
        return transactions * per_transaction / elapsed
    finally:
        drop_schema(dsn, schema)
