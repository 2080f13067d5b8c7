"""The Postgres backend against a real server: notifier.

Every test runs on a fresh schema (see ``tests/support/pg.py``) and is bounded by an
absolute ``trio.fail_after``.
"""

from __future__ import annotations

import json
import random

import pytest
import trio

from chatbus.postgres import (
    LISTEN_APPLICATION_NAME,
    PostgresNotifier,
    PostgresStore,
    open_postgres,
)

from support.pg import (
    Recorder,
    TcpProxy,
    admin_execute,
    draft,
    eventually,
    fresh_postgres_pair,
    pg_dsn,
    send_raw_notice,
    terminate_backends,
)

pytestmark = pytest.mark.postgres


async def test_notices_for_committed_appends_in_commit_order(
    pair: tuple[PostgresStore, PostgresNotifier],
) -> None:
    store, notifier = pair
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            assert notifier.listen_pids
            await notifier.notify("ordered", 999)  # a no-op for this pair
            async with open_postgres(pg_dsn(), schema=store.schema) as (other, _):

                async def appender(target: PostgresStore) -> None:
                    for _ in range(15):
                        await target.append("ordered", [draft(1)] * random.randint(1, 4))

                async with trio.open_nursery() as writers:
                    for i in range(8):
                        writers.start_soon(appender, store if i % 2 else other)
            [head] = (await store.heads(["ordered"])).values()
            await eventually(lambda: recorder.ids("ordered")[-1:] == [head])
            ids = recorder.ids("ordered")
            assert ids == sorted(set(ids)), "notices out of commit order or duplicated"
            assert 999 not in ids
            assert recorder.resyncs == 0
            nursery.cancel_scope.cancel()


async def test_garbage_payloads_are_ignored(pair: tuple[PostgresStore, PostgresNotifier]) -> None:
    store, notifier = pair
    recorder = Recorder()
    garbage = [
        "",
        "not json",
        "[]",
        "null",
        '"string"',
        '{"stream": 5, "last_id": 1}',
        '{"stream": "s"}',
        '{"stream": "s", "last_id": "1"}',
        '{"stream": "s", "last_id": 1.5}',
        '{"stream": "s", "last_id": -1}',
        '{"stream": "s", "last_id": true}',
        '{"stream": "", "last_id": 1}',
        '{"stream": "' + "x" * 300 + '", "last_id": 1}',
        "[" * 3000,
        '{"stream": "\\ud800", "last_id": 1}',
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            for payload in garbage:
                admin_execute("SELECT pg_notify(%s, %s)", (store.channel, payload))
            admin_execute("SELECT pg_notify(%s, 'ping')", (store.channel + "_other",))
            admin_execute(
                "SELECT pg_notify(%s, %s)",
                (store.channel, json.dumps({"stream": "s", "last_id": 7, "extra": [1]})),
            )
            await send_raw_notice(store.channel, "s", 8)
            await eventually(lambda: recorder.notices == [("s", 7), ("s", 8)])
            assert recorder.resyncs == 0
            nursery.cancel_scope.cancel()


async def test_listen_connection_killed_repeatedly_reconnects_and_resyncs(
    pair: tuple[PostgresStore, PostgresNotifier],
) -> None:
    store, notifier = pair
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            rows = admin_execute(
                "SELECT application_name, query FROM pg_stat_activity WHERE pid = %s",
                (next(iter(notifier.listen_pids)),),
            )
            assert rows[0][0] == LISTEN_APPLICATION_NAME
            assert rows[0][1].upper().startswith("LISTEN")
            for kill in range(1, 5):
                [pid] = notifier.listen_pids
                assert await terminate_backends([pid]) == 1
                await eventually(lambda kill=kill: recorder.resyncs == kill)
                assert notifier.listen_pids and pid not in notifier.listen_pids
                assert notifier.reconnects == kill
                # Notices flow again on the new connection.
                [m] = await store.append("after-kill", [draft(kill)])
                await eventually(lambda m=m: ("after-kill", m.id) in recorder.notices)
            nursery.cancel_scope.cancel()


async def test_silent_listen_connection_is_replaced() -> None:
    """A connection that stops answering (no FIN, no RST) is caught by the ping."""
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with fresh_postgres_pair(
                dsn=proxy.dsn(pg_dsn()), ping_interval=0.2, ping_timeout=0.5, max_backoff=0.5
            ) as (store, notifier):
                async with trio.open_nursery() as inner:
                    await inner.start(notifier.listen, recorder)
                    [old_pid] = notifier.listen_pids
                    proxy.freeze()
                    await trio.sleep(1.5)
                    assert recorder.resyncs == 0  # still trying to reconnect
                    await proxy.up()
                    await eventually(lambda: recorder.resyncs == 1)
                    assert notifier.listen_pids and old_pid not in notifier.listen_pids
                    [m] = await store.append("after-freeze", [draft(1)])
                    await eventually(lambda: ("after-freeze", m.id) in recorder.notices)
                    # A healthy connection answers its pings and is kept.
                    [pid] = notifier.listen_pids
                    await trio.sleep(2)
                    assert notifier.listen_pids == {pid}
                    assert recorder.resyncs == 1
                    inner.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
