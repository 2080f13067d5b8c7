"""The Postgres backend against a real server: failures and lifecycle.

Every test runs on a fresh schema (see ``tests/support/pg.py``) and is bounded by an
absolute ``trio.fail_after``.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
import trio

import chatbus
import chatbus.postgres._pq
from chatbus.postgres import (
    PostgresStore,
    channel_for_schema,
    open_postgres,
)

from support.pg import (
    Recorder,
    TcpProxy,
    draft,
    eventually,
    fresh_postgres_pair,
    fresh_schema,
    pg_dsn,
)

pytestmark = pytest.mark.postgres


async def test_unreachable_database_fails_promptly() -> None:
    with trio.fail_after(10):
        started = time.perf_counter()
        with pytest.raises(chatbus.StoreError) as info:
            async with open_postgres(
                "postgresql://postgres@127.0.0.1:1/test", schema="unused", acquire_timeout=1
            ):
                pytest.fail("opened a store on a closed port")
        assert time.perf_counter() - started < 5
        assert isinstance(info.value.__cause__, psycopg.Error)


async def test_store_fails_promptly_while_database_is_down_and_recovers() -> None:
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with fresh_postgres_pair(
                dsn=proxy.dsn(pg_dsn()),
                acquire_timeout=1,
                connect_timeout=1,
                max_connections=4,
                ping_interval=0.5,
                ping_timeout=1,
                max_backoff=0.5,
            ) as (store, notifier):
                await nursery.start(notifier.listen, recorder)
                [m] = await store.append("down", [draft(1)])
                assert m.id == 1
                proxy.down()
                for operation in (
                    lambda: store.append("down", [draft(2)]),
                    lambda: store.append("down", [draft(2, "key")]),
                    lambda: store.read("down", 0, 10),
                    lambda: store.heads(["down"]),
                ):
                    started = time.perf_counter()
                    # An append sent into the dead connection may have reached the
                    # server: its outcome is unknown, and said so, unless resolved.
                    with pytest.raises((chatbus.StoreError, chatbus.OutcomeUnknown)) as info:
                        await operation()
                    assert time.perf_counter() - started < 3
                    assert isinstance(info.value.__cause__, psycopg.Error)
                await proxy.up()
                recovered_after = time.perf_counter()
                while True:
                    try:
                        [m] = await store.append("down", [draft(3)])
                        break
                    except (chatbus.StoreError, chatbus.OutcomeUnknown):
                        await trio.sleep(0.1)
                print(f"store recovered {time.perf_counter() - recovered_after:.2f}s after up")
                assert m.id == 2, "a failed append left a trace"
                assert [x.body for x in await store.read("down", 0, 10)] == [1, 3]

                # Notices sent while the listener was away are lost: hence the resync.
                await eventually(lambda: recorder.resyncs >= 1)
                [m] = await store.append("down", [draft(4)])
                await eventually(lambda: ("down", m.id) in recorder.notices)
                nursery.cancel_scope.cancel()


async def test_closed_store_raises_store_error() -> None:
    with trio.fail_after(10):
        async with fresh_postgres_pair() as (store, _):
            await store.append("s", [draft(1)])
        with pytest.raises(chatbus.StoreError, match="closed"):
            await store.append("s", [draft(1)])
        with pytest.raises(chatbus.StoreError, match="closed"):
            await store.read("s", 0, 1)


async def test_owns_its_loop_even_inside_another_stores_block() -> None:
    """A store opened in a task spawned inside another store's block must not borrow
    that block's trio-asyncio loop: it closes when that block ends."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            outer_done = trio.Event()
            inner_ok: list[int] = []

            async def inner() -> None:
                async with fresh_postgres_pair() as (store, _):
                    await outer_done.wait()
                    # The outer store's loop is closed now; keyed appends use ours.
                    [m] = await store.append("s", [draft(1, "k1")])
                    [n] = await store.append("s", [draft(2)])
                    # Several at once: connections must come from the (live) pool.
                    async with trio.open_nursery() as reads:
                        for _ in range(6):
                            reads.start_soon(store.read, "s", 0, 10)
                    inner_ok.extend([m.id, n.id])

            async with fresh_postgres_pair():
                nursery.start_soon(inner)
                await trio.sleep(1)
            outer_done.set()
        assert inner_ok == [1, 2]


async def test_body_errors_come_out_unwrapped() -> None:
    with trio.fail_after(10):
        with pytest.raises(KeyError, match="from the body"):
            async with fresh_postgres_pair():
                raise KeyError("from the body")
        # Cancellation too: a bare TooSlowError, not a group of our internals.
        with pytest.raises(trio.TooSlowError):
            await _listen_until_timeout(0.3)


async def _listen_until_timeout(seconds: float) -> None:
    with trio.fail_after(seconds):
        async with fresh_postgres_pair() as (_, notifier), trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, Recorder())
            await trio.sleep_forever()


async def test_concurrent_opens_create_the_schema_once() -> None:
    with trio.fail_after(20):
        async with fresh_schema() as (dsn, schema):
            stores: list[PostgresStore] = []

            async def open_one(task_status: trio.TaskStatus[None]) -> None:
                async with open_postgres(dsn, schema=schema) as (store, _):
                    stores.append(store)
                    task_status.started()
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(nursery.start, open_one)
                await eventually(lambda: len(stores) == 6)
                for i, store in enumerate(stores):
                    [m] = await store.append("shared", [draft(i)])
                    assert m.id == i + 1
                nursery.cancel_scope.cancel()


async def test_options_are_validated() -> None:
    for kwargs, match in (
        ({"schema": ""}, "schema"),
        ({"schema": "x" * 64}, "schema"),
        ({"schema": "a\x00b"}, "schema"),
        ({"min_connections": 0}, "min_connections"),
        ({"min_connections": 5, "max_connections": 2}, "max_connections"),
        ({"acquire_timeout": 0}, "acquire_timeout"),
        ({"ping_interval": -1}, "ping_interval"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_connections": 4, "max_in_flight": 4}, "max_in_flight"),
        ({"schema": "a\ud800"}, "schema is not valid Unicode"),
        ({"idle_in_transaction_timeout": -1}, "idle_in_transaction_timeout"),
        ({"tcp_user_timeout": 4000}, "tcp_user_timeout"),
    ):
        with pytest.raises(ValueError, match=match):
            await _open_and_close(**kwargs)
    for kwargs, match in (
        ({"min_connections": 1.5}, "min_connections must be an int"),
        ({"max_connections": 2.5}, "max_connections must be an int"),
        ({"max_in_flight": 1.5}, "max_in_flight must be an int"),
        ({"schema": 3}, "schema must be a str"),
    ):
        with pytest.raises(TypeError, match=match):
            await _open_and_close(**kwargs)
    with trio.fail_after(10):
        await _open_and_close(connect_timeout=1.5)  # a fraction is fine (rounded up for libpq)
    assert channel_for_schema("chatbus") == channel_for_schema("chatbus")
    assert channel_for_schema("a") != channel_for_schema("b")
    assert len(channel_for_schema("é" * 31)) < 64


async def _open_and_close(**kwargs: Any) -> None:
    async with open_postgres(pg_dsn(), **kwargs):
        pass
