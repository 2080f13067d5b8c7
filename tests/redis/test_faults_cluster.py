"""Redis Cluster under faults: primary failovers in durable mode, several OS processes.

Each test starts its own cluster (``support.redis_servers``) and is bounded by an
absolute ``trio.fail_after``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

import chatbus

from support.redis_bus import (
    Ledger,
    eventually,
    need_redis,
    open_redis_bus,
    read_all,
    receive_in_order,
    stream_slot,
    unique_prefix,
)
from support.redis_servers import open_cluster

pytestmark = pytest.mark.redis
need_redis()

TESTS = Path(__file__).resolve().parents[1]


async def _flow_while(
    ledger: Ledger,
    pub: chatbus.Publisher,
    numbers: range,
    fault: Callable[[], Awaitable[None]],
) -> None:
    """Publish ``numbers`` (keyed, retried) every 5 ms while ``fault()`` runs meanwhile."""

    async def flow() -> None:
        for n in numbers:
            await ledger.publish(pub, {"i": n}, f"k{n}")
            await trio.sleep(0.005)

    async def later() -> None:
        await trio.sleep(0.2)
        await fault()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flow)
        nursery.start_soon(later)


async def test_primary_failovers_under_durable_mode_lose_nothing_acknowledged() -> None:
    """A coordinated failover (CLUSTER FAILOVER), then the new primary SIGKILLed.

    In durable mode an append is acknowledged (and announced, and readable) only once
    a replica has it, so the promoted replica has every acknowledged message: nothing
    acknowledged is lost, duplicated or reordered, ids are never reused for other
    messages, and the subscriber's view equals the stored stream.
    """
    phase = 60
    total = 4 * phase
    with trio.fail_after(90):
        async with open_cluster(masters=3, replicas=1) as nodes:
            prefix = unique_prefix()
            durable = {"durability": "durable"}
            ledger = Ledger()
            async with (
                open_redis_bus(nodes.url, prefix=prefix, redis_options=durable) as publishing,
                open_redis_bus(
                    nodes.url, prefix=prefix, redis_options=durable, poll_interval=None
                ) as bus,
                publishing.open_publisher("ha") as pub,
                trio.open_nursery() as nursery,
            ):
                received = await nursery.start(receive_in_order, bus, "ha", total)
                for n in range(phase):
                    await ledger.publish(pub, {"i": n}, f"k{n}")
                slot = stream_slot(nodes, prefix)
                primary = nodes.master_for_slot(slot)
                [replica] = nodes.replicas_of(primary)

                async def coordinated() -> None:
                    await trio.to_thread.run_sync(nodes.failover, replica)

                await _flow_while(ledger, pub, range(phase, 2 * phase), coordinated)
                assert nodes.master_for_slot(slot) is replica

                async def crash() -> None:
                    await trio.to_thread.run_sync(replica.kill)
                    await trio.to_thread.run_sync(nodes.wait_promoted, primary)
                    # The same bus finds the new primary by itself, while the dead one
                    # is still dead: a read needs no replica.
                    with trio.fail_after(10):
                        while True:
                            try:
                                await publishing.read("ha", limit=1)
                                break
                            except chatbus.StoreError:
                                await trio.sleep(0.05)
                    # Back as the new primary's replica: until it has synced, a durable
                    # append has no replica to wait for and cannot be acknowledged.
                    await trio.to_thread.run_sync(replica.start)
                    await trio.to_thread.run_sync(nodes.wait_ok)

                await _flow_while(ledger, pub, range(2 * phase, 3 * phase), crash)
                assert nodes.master_for_slot(slot) is primary
                for n in range(3 * phase, total):
                    await ledger.publish(pub, {"i": n}, f"k{n}")
                with trio.fail_after(30):
                    await eventually(lambda: len(received) == total)
                stored = await read_all(publishing, "ha")
            ledger.check(stored)
            assert len(stored) == total, "a message stored twice (or one too many)"
            assert [m.body["i"] for m in stored] == list(range(total))
            assert [(m.id, m.key, m.body) for m in received] == [
                (m.id, m.key, m.body) for m in stored
            ]
            assert ledger.retries > 0, "the crash did not disturb any publish"


async def test_two_publisher_processes_and_a_subscriber_process_on_the_cluster() -> None:
    procs, tasks, per_task = 2, 6, 20
    total = procs * tasks * per_task
    with trio.fail_after(90):
        async with open_cluster(masters=3) as nodes:
            prefix = unique_prefix()
            child = [sys.executable, "-m", "support.redis_child"]
            subscriber = await trio.lowlevel.open_process(
                [*child, "subscribe", nodes.url, prefix, "room", str(total)],
                cwd=TESTS,
                stdout=subprocess.PIPE,
            )
            try:
                assert subscriber.stdout is not None
                output = b""
                while b"ready\n" not in output:
                    chunk = await subscriber.stdout.receive_some()
                    assert chunk, "the subscriber process ended before subscribing"
                    output += chunk
                results: dict[str, bytes] = {}

                async def run_publisher(name: str) -> None:
                    done = await trio.run_process(
                        [
                            *child,
                            "publish",
                            nodes.url,
                            prefix,
                            "room",
                            name,
                            str(tasks),
                            str(per_task),
                        ],
                        cwd=TESTS,
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                    assert done.returncode == 0, done.stderr.decode()
                    results[name] = done.stdout

                async with trio.open_nursery() as publishers:
                    for p in range(procs):
                        publishers.start_soon(run_publisher, f"p{p}")
                while chunk := await subscriber.stdout.receive_some():
                    output += chunk
                assert await subscriber.wait() == 0
            finally:
                if subscriber.returncode is None:
                    subscriber.kill()
                    with trio.CancelScope(shield=True):
                        await subscriber.wait()
            received = json.loads(output.split(b"ready\n", 1)[1])["received"]
            async with open_redis_bus(nodes.url, prefix=prefix) as bus:
                stored = await read_all(bus, "room")
    assert [m.id for m in stored] == list(range(1, total + 1))
    assert received == [[m.id, m.key, m.body] for m in stored]
    acked = {key: id_ for out in results.values() for key, id_ in json.loads(out)["acked"]}
    assert len(acked) == total
    assert {m.key: m.id for m in stored} == acked
    for p in range(procs):  # each task's messages in its own order
        for t in range(tasks):
            seqs = [m.body["seq"] for m in stored if m.key and m.key.startswith(f"p{p}-{t}-")]
            assert seqs == list(range(per_task))
