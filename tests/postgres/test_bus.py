"""Bus-level guarantees over the Postgres backend: several OS processes, a LISTEN
connection killed while messages flow, a database that goes away and comes back.

Each test uses a fresh schema and is bounded by an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

import chatbus
from chatbus.postgres import open_postgres

from support.pg import (
    TcpProxy,
    eventually,
    fresh_postgres_pair,
    fresh_schema,
    pg_dsn,
    terminate_backends,
)

pytestmark = pytest.mark.postgres

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "postgres_chat.py"

# A publisher process: TASKS concurrent tasks share one publisher (so the producer
# group-commits) and each publishes PER_TASK messages, waiting for each to commit.
PUBLISHER_SCRIPT = textwrap.dedent(
    """
    import json, sys, trio, chatbus
    from chatbus.postgres import open_postgres

    dsn, schema, stream, name, tasks, per_task = sys.argv[1:7]

    async def main():
        ids = []
        async with open_postgres(dsn, schema=schema) as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                async with bus.open_publisher(stream) as pub:
                    async def task(t):
                        for seq in range(int(per_task)):
                            body = {"proc": name, "task": t, "seq": seq}
                            msg = await pub.publish(body, key=f"{name}-{t}-{seq}")
                            ids.append(msg.id)
                    async with trio.open_nursery() as nursery:
                        for t in range(int(tasks)):
                            nursery.start_soon(task, t)
                stats = pub.statistics()
        print(json.dumps({"ids": ids, "batches": getattr(stats, "batches", None)}))

    trio.run(main)
    """
)


async def collect(
    bus: chatbus.Bus,
    stream: str,
    count: int,
    *,
    task_status: trio.TaskStatus[list[chatbus.Message]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Subscribe from 0 and keep the first ``count`` messages in ``task_status`` order."""
    received: list[chatbus.Message] = []
    async with bus.open_subscriber(stream, after=0) as sub:
        task_status.started(received)
        async for message in sub:
            received.append(message)
            if len(received) == count:
                return


def check_exactly_once_in_order(received: list[chatbus.Message], count: int) -> None:
    assert [m.id for m in received] == list(range(1, count + 1))


async def test_two_publisher_processes_and_a_subscriber() -> None:
    """Ids are dense across OS processes and the subscriber sees each once, in order."""
    procs, tasks, per_task = 2, 8, 15
    total = procs * tasks * per_task
    with trio.fail_after(40):
        async with fresh_schema() as (dsn, schema):
            async with open_postgres(dsn, schema=schema) as (store, notifier):
                async with (
                    chatbus.open_bus(store=store, notifier=notifier, poll_interval=None) as bus,
                    trio.open_nursery() as nursery,
                ):
                    received = await nursery.start(collect, bus, "room", total)
                    results: dict[str, bytes] = {}

                    async def run_publisher(name: str) -> None:
                        argv = [sys.executable, "-c", PUBLISHER_SCRIPT, dsn, schema, "room"]
                        completed = await trio.run_process(
                            [*argv, name, str(tasks), str(per_task)],
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                        )
                        assert completed.returncode == 0, completed.stderr.decode()
                        results[name] = completed.stdout

                    async with trio.open_nursery() as publishers:
                        for p in range(procs):
                            publishers.start_soon(run_publisher, f"p{p}")
            # The subscriber finished: exactly 1..total, in order, each once.
            check_exactly_once_in_order(received, total)
            seen = {(m.body["proc"], m.body["task"], m.body["seq"]) for m in received}
            assert len(seen) == total
            for p in range(procs):
                for t in range(tasks):
                    seqs = [
                        m.body["seq"]
                        for m in received
                        if (m.body["proc"], m.body["task"]) == (f"p{p}", t)
                    ]
                    assert seqs == list(range(per_task)), "a task's messages out of order"
            ids_by_proc = {name: json.loads(out)["ids"] for name, out in results.items()}
            all_ids = sorted(i for ids in ids_by_proc.values() for i in ids)
            assert all_ids == list(range(1, total + 1))


async def test_listen_connection_killed_while_messages_flow() -> None:
    """Nothing lost, duplicated or reordered; the last messages arrive through resync."""
    rounds, per_round = 6, 25
    total = rounds * per_round
    with trio.fail_after(40):
        async with fresh_postgres_pair() as (store, notifier):
            # The publishing bus is "another process": its own pool and listener.
            async with (
                open_postgres(pg_dsn(), schema=store.schema) as (other_store, other_notifier),
                chatbus.open_bus(store=other_store, notifier=other_notifier) as publishing,
                # No safety-net poll: after the last kill only the resync can deliver.
                chatbus.open_bus(store=store, notifier=notifier, poll_interval=None) as bus,
                trio.open_nursery() as nursery,
            ):
                received = await nursery.start(collect, bus, "flow", total)
                async with publishing.open_publisher("flow") as pub:
                    for round_ in range(rounds):
                        [pid] = notifier.listen_pids
                        assert await terminate_backends([pid]) == 1
                        # Publish while the listener is down or reconnecting.
                        async with trio.open_nursery() as burst:
                            for i in range(per_round):
                                burst.start_soon(pub.publish, {"round": round_, "i": i})
                        await eventually(
                            lambda pid=pid: notifier.listen_pids not in ({pid}, frozenset())
                        )
                await eventually(lambda: len(received) == total)
                stats = bus.statistics()
            check_exactly_once_in_order(received, total)
            assert notifier.reconnects == rounds
            assert stats.resyncs == rounds


@pytest.mark.parametrize("opened", ["after the reconnect", "before it"])
@pytest.mark.parametrize("change", ["delete", "trim", "redact"])
async def test_a_change_missed_while_listen_was_down_is_not_served_from_the_cache(
    change: str, opened: str
) -> None:
    """Another process deletes, trims or redacts while this bus's LISTEN connection is
    down: its notice is lost. A subscription opened here, after the reconnect (a
    resync) or before it (the loss known), must see the stream as it is, not what this
    bus's cache held (before it: found by a review, a redaction was missed)."""
    with trio.fail_after(40):
        async with fresh_postgres_pair(max_backoff=4.0) as (store, notifier):
            notifier.min_backoff = 4.0  # the reconnect waits 2..4 s: the notice is lost
            async with (
                open_postgres(pg_dsn(), schema=store.schema) as (other_store, other_notifier),
                chatbus.open_bus(store=other_store, notifier=other_notifier) as other,
                chatbus.open_bus(store=store, notifier=notifier, poll_interval=None) as bus,
                bus.open_publisher("room") as pub,  # its cache holds what it published
                bus.open_subscriber("room") as live,  # watched: the cache's epoch known
            ):
                for i in range(1, 11):
                    await pub.publish({"old": i})
                    assert (await live.receive()).id == i
                old = [(i, {"old": i}) for i in range(1, 11)]
                [pid] = notifier.listen_pids
                assert await terminate_backends([pid]) == 1
                await eventually(lambda: pid not in notifier.listen_pids)
                if change == "delete":
                    await other.delete_stream("room")
                    for i in range(1, 16):
                        await other.publish("room", {"new": i})
                    expected = [(i, {"new": i}) for i in range(1, 16)]
                elif change == "trim":
                    await other.trim("room", before=8)
                    expected = old[7:]
                else:
                    await other.redact("room", 3)
                    expected = [*old[:2], (3, None), *old[3:]]
                assert notifier.reconnects == 0, "the change was not made while LISTEN was down"
                if opened == "after the reconnect":
                    await eventually(lambda: bus.statistics().resyncs == 1)
                async with bus.open_subscriber("room") as sub:
                    got = []
                    while len(got) < len(expected):
                        message = await sub.receive()
                        got.append((message.id, message.body))
                if opened == "before it":
                    assert notifier.reconnects == 0, "opened after the reconnect"
                assert got == expected


async def test_publish_while_database_unavailable_then_recovery() -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with (
                fresh_postgres_pair(
                    dsn=proxy.dsn(pg_dsn()),
                    acquire_timeout=1,
                    connect_timeout=1,
                    ping_interval=0.5,
                    ping_timeout=1,
                    max_backoff=0.5,
                ) as (store, notifier),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
                trio.open_nursery() as inner,
            ):
                received = await inner.start(collect, bus, "outage", 3)
                await bus.publish("outage", "before", key="k0")
                proxy.down()
                started = time.perf_counter()
                with pytest.raises((chatbus.StoreError, chatbus.OutcomeUnknown)):
                    await bus.publish("outage", "during", key="k1")
                assert time.perf_counter() - started < 4
                await proxy.up()
                while True:
                    try:
                        # Retrying with the same key is safe whatever happened.
                        await bus.publish("outage", "during (retried)", key="k1")
                        break
                    except (chatbus.StoreError, chatbus.OutcomeUnknown):
                        await trio.sleep(0.2)
                await bus.publish("outage", "after", key="k2")
                await eventually(lambda: len(received) == 3)
                check_exactly_once_in_order(received, 3)
                assert [m.body for m in received] == ["before", "during (retried)", "after"]
                inner.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


async def test_example_chat_runs() -> None:
    with trio.fail_after(40):
        async with fresh_schema() as (dsn, schema):
            env = {**os.environ, "CHATBUS_DSN": dsn, "CHATBUS_SCHEMA": schema}
            completed = await trio.run_process(
                [sys.executable, str(EXAMPLE)],
                capture_stdout=True,
                capture_stderr=True,
                env=env,
                check=False,
            )
    out = completed.stdout.decode()
    assert completed.returncode == 0, completed.stderr.decode() + out
    assert "alice saw" in out and "bob saw" in out


def test_example_is_a_script() -> None:
    assert EXAMPLE.exists()
    assert (
        subprocess.run([sys.executable, "-m", "py_compile", str(EXAMPLE)], check=False).returncode
        == 0
    )
