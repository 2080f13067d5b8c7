"""The Postgres backend against a real server: connections lent to trio.

Single statements run over psycopg.pq on pool connections the store keeps.

Every test runs on a fresh schema (see ``tests/support/pg.py``) and is bounded by an
absolute ``trio.fail_after``.
"""

from __future__ import annotations

import random
import time

import psycopg
import pytest
import trio
from psycopg import sql

import chatbus
import chatbus.postgres._connections
import chatbus.postgres._pq
from chatbus._message import Draft, make_draft
from chatbus.postgres import (
    PostgresStore,
)

from support.pg import (
    TcpProxy,
    admin_execute,
    draft,
    eventually,
    fresh_postgres_pair,
    pg_dsn,
    row_lock,
    terminate_backends,
)

pytestmark = pytest.mark.postgres


def app_name_dsn(name: str) -> str:
    return psycopg.conninfo.make_conninfo(pg_dsn(), application_name=name)


def backends_named(name: str) -> list[int]:
    rows = admin_execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))
    return [int(pid) for (pid,) in rows]


async def test_connections_are_kept_between_operations_and_given_back_when_idle() -> None:
    async with fresh_postgres_pair(max_connections=4) as (store, _):
        with trio.fail_after(20):
            for i in range(20):
                await store.append("s", [draft(i)])
                await store.read("s", 0, 5)
                await store.heads(["s"])
            stats = store.statistics()
            assert (stats.connections, stats.borrows) == (1, 1)

            store._connections.idle_return = 0.2
            await trio.sleep(0.3)
            await store.read("s", 0, 1)  # gives the stale one back, borrows again
            stats = store.statistics()
            assert (stats.connections, stats.borrows) == (1, 2)

            store._connections.idle_return = 10
            store._connections.max_lend = 0.5  # busy, but lent long enough: back to the pool
            for _ in range(8):
                await store.read("s", 0, 1)
                await trio.sleep(0.1)
            stats = store.statistics()
            assert stats.connections == 1
            assert stats.borrows in (3, 4)  # 4 only if the machine stalled the loop


async def test_idle_connection_killed_by_the_server_is_replaced_transparently() -> None:
    name = f"chatbus-test-{random.getrandbits(32):08x}"
    async with fresh_postgres_pair(dsn=app_name_dsn(name), max_connections=4) as (store, _):
        with trio.fail_after(20):
            await store.append("s", [draft(1)])
            assert store.statistics().connections == 1
            for _ in range(3):
                # Each kind of operation, on a connection the server closed while it
                # sat idle here: no StoreError, a fresh connection instead. (About a
                # second each: the pool's own idle one is dead too, and psycopg_pool
                # backs off after a failed check.)
                for operation in (
                    lambda: store.read("s", 0, 10),
                    lambda: store.heads(["s"]),
                    lambda: store.append("s", [draft(2)]),
                    lambda: store.append("s", [draft(3, key=f"k{random.random()}")]),
                ):
                    assert await terminate_backends(backends_named(name)) >= 1
                    await trio.sleep(0.1)  # let the termination reach the socket
                    await operation()
            assert store.statistics().borrows >= 13  # one per killed connection
            assert [x.id for x in await store.read("s", 0, 100)] == list(range(1, 8))


@pytest.mark.parametrize("keyed", [False, True])
async def test_cancelled_statement_is_cancelled_on_the_server(keyed: bool) -> None:
    """A statement cancelled mid-flight is cancelled on the server too (as psycopg does),
    its connection is not reused while busy, and its slot comes back (else the store
    would run out of connections)."""
    async with fresh_postgres_pair(max_connections=2, acquire_timeout=1) as (store, _):
        with trio.fail_after(30):
            async with row_lock(store.schema, "slow") as lock:
                for i in range(4):  # more than max_connections: a leaked slot shows
                    key = f"k{i}" if keyed else None
                    with trio.move_on_after(0.3) as scope:
                        await store.append("slow", [draft(i, key)])
                    assert scope.cancelled_caught, "the row lock did not block the append"
                    # The next operations run at once, on healthy connections.
                    assert await store.heads(["other"]) == {"other": i}
                    [m] = await store.append("other", [draft(i)])
                    assert m.id == i + 1
                    assert len(await store.read("other", 0, 10)) == i + 1
                assert store.statistics().connections <= 2
                await lock.release()
            await trio.sleep(0.2)  # a statement still waiting on the lock would run now
            await store.append("slow", [draft("after")])
            assert [(x.id, x.body) for x in await store.read("slow", 0, 10)] == [(1, "after")]


async def test_waiting_for_a_connection_is_bounded_by_acquire_timeout() -> None:
    async with fresh_postgres_pair(max_connections=1, acquire_timeout=0.5) as (store, _):
        with trio.fail_after(20):
            async with row_lock(store.schema, "slow") as lock, trio.open_nursery() as nursery:
                # The only connection blocks on the lock; the appends share it (merged).
                for i in range(2):
                    nursery.start_soon(store.append, "slow", [draft(i, f"k{i}")])
                await eventually(lambda: store.statistics().connections == 1)
                started = time.perf_counter()
                with pytest.raises(chatbus.StoreError, match="PoolTimeout") as info:
                    await store.read("other", 0, 1)
                assert 0.4 < time.perf_counter() - started < 3
                assert isinstance(info.value.__cause__, psycopg.OperationalError)
                await lock.release()
            assert len(await store.read("slow", 0, 10)) == 2


async def test_prepared_statements_survive_psycopgs_deallocate_all() -> None:
    """psycopg sends DEALLOCATE ALL when it rolls back after preparing statements of its
    own (the keyed path prepares after 5 runs); the store's must be prepared again."""
    async with fresh_postgres_pair(max_connections=1) as (store, _):
        with trio.fail_after(20):
            await store.read("s", 0, 10)  # prepares the store's read on the one connection
            for i in range(8):
                await store.append("s", [draft(i, f"k{i}")])
            with pytest.raises(chatbus.StoreError):  # rolled back inside psycopg
                await store.append("s", [Draft(body_json="NaN", key="bad")])
            async with row_lock(store.schema, "s") as lock:
                with trio.move_on_after(0.3):  # cancelled inside its transaction
                    await store.append("s", [draft("x", "x")])
                await lock.release()
            for _ in range(3):
                assert len(await store.read("s", 0, 10)) == 8
                assert await store.heads(["s"]) == {"s": 8}
            [m] = await store.append("s", [draft("unkeyed")])
            assert m.id == 9


async def test_cancelled_callers_do_not_leak_pool_connections() -> None:
    async with fresh_postgres_pair(max_connections=2, acquire_timeout=1) as (store, _):
        with trio.fail_after(30):
            store._connections.idle_return = 0.05  # every acquire gives an idle one back
            for _ in range(4):
                async with trio.open_nursery() as nursery:  # two connections idle here
                    for _ in range(2):
                        nursery.start_soon(store.read, "s", 0, 1)
                await trio.sleep(0.1)
                with trio.move_on_after(0):  # cancelled while giving one back
                    await store.read("s", 0, 1)
            async with trio.open_nursery() as nursery:  # both connections still usable
                for _ in range(2):
                    nursery.start_soon(store.read, "s", 0, 1)


async def test_statement_cancelled_while_being_sent_returns_promptly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A statement still in libpq's send buffer cannot be cancelled on the server (it
    has not arrived): the connection must go at once, not after a wasted wait.

    The server is behind a frozen proxy, so the socket takes a few MB of the 50 MB
    statement and no more (straight to the server, a backend on the other core could
    read all of it before the first wait, and the statement then ran: a flaky test).
    A cancel request would wait 5 s here: the bound below tells the two apart."""
    monkeypatch.setattr(chatbus.postgres._connections, "_CANCEL_TIMEOUT", 5.0)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with fresh_postgres_pair(dsn=proxy.dsn(pg_dsn()), max_connections=2) as (
                store,
                _,
            ):
                await store.append("s", [draft(0)])  # lends a connection, prepares the append
                big = Draft(body_json='"' + "x" * 50_000_000 + '"', key=None)
                proxy.freeze()
                started = time.perf_counter()
                with trio.CancelScope() as scope:
                    scope.cancel()  # the first wait is the one for the socket to take more
                    await store.append("s", [big])
                assert time.perf_counter() - started < 2
                await proxy.up()
                assert [m.id for m in await store.read("s", 0, 10)] == [1]
                [m] = await store.append("s", [draft(1)])
                assert m.id == 2
            nursery.cancel_scope.cancel()


async def test_statement_prepared_again_after_deallocate_all() -> None:
    async with fresh_postgres_pair(max_connections=1) as (store, _):
        with trio.fail_after(20):
            await store.append("s", [draft(0)])
            await store.read("s", 0, 10)
            [(conn, _)] = store._connections._idle  # behind the store's back, as a reset would
            await chatbus.postgres._pq.execute(conn.pgconn, b"DEALLOCATE ALL", [])
            assert [m.id for m in await store.read("s", 0, 10)] == [1]
            [m] = await store.append("s", [draft(1)])
            assert m.id == 2


async def test_pages_of_large_bodies_come_in_several_json_values() -> None:
    async with fresh_postgres_pair(max_connections=2) as (store, _):
        with trio.fail_after(60):
            # 35 MiB in all: the page comes as 3 JSON values of at most ~16 MiB (the
            # grouping keeps each one far below Postgres's 1 GB limit on a string).
            bodies = [str(i) * (7 * 1024 * 1024) for i in range(5)]
            for body in bodies:
                await store.append("big", [make_draft(body, None, max_body_bytes=8 << 20)])
            await store.append("big", [draft("small")])
            page = await store.read("big", 0, 100)
            assert [m.body for m in page] == [*bodies, "small"]
            assert [m.id for m in await store.read("big", 4, 100)] == [5, 6]


async def test_created_at_is_the_stored_timestamp_to_the_microsecond(store: PostgresStore) -> None:
    with trio.fail_after(20):
        returned = []
        for i in range(50):
            returned += await store.append("t", [draft(i), draft(i)])  # unkeyed
            returned += await store.append("t", [draft(i, f"k{i}")])  # keyed (psycopg)
        rows = admin_execute(
            sql.SQL("SELECT id, created_at FROM {} WHERE stream = 't'").format(
                sql.Identifier(store.schema, "messages")
            )
        )
        stored = dict(rows)
        read = {m.id: m.created_at for m in await store.read("t", 0, 1000)}
        assert len(stored) == len(read) == len(returned) == 150
        for message in returned:
            assert message.created_at == read[message.id] == stored[message.id]
        assert len({m.created_at.microsecond for m in returned}) > 1  # not truncated


async def test_a_call_cancelled_while_the_server_is_silent_ends_within_about_a_second() -> None:
    """Review: with the server a TCP black hole, a cancelled call (an SSE stream giving
    up its open once the store is known down, a subscription being closed) waited 4 s
    for a cancel request the server would never answer. The wait is bounded by
    _CANCEL_TIMEOUT (1 s); the connection then goes."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with fresh_postgres_pair(dsn=proxy.dsn(pg_dsn())) as (store, _):
                await store.heads(["warm"])  # a lent connection, ready
                proxy.freeze()
                began = trio.current_time()
                with trio.move_on_after(0.5):
                    await store.heads(["warm"])
                assert trio.current_time() - began < 0.5 + 1.0 + 1.0
                await proxy.up()
                assert await store.heads(["warm"]) == {"warm": 0}  # a fresh connection serves
            nursery.cancel_scope.cancel()
