"""Redis notices under faults: pub/sub connections killed, cut off, slots migrated.

Notices are hints (DESIGN.md §2.3): whatever happens to the pub/sub connection, every
subscriber must get exactly 1..n in order. The subscribing buses run without the
safety-net poll (``poll_interval=None``), so a notice lost without a ``resync()``
leaves a message undelivered and the test runs into its ``trio.fail_after``.
Each test starts the servers it needs (``support.redis_servers``).
"""

from __future__ import annotations

import pytest
import trio

import chatbus

from support.redis_bus import (
    TOPOLOGIES,
    Ledger,
    eventually,
    need_redis,
    open_redis_bus,
    open_topology,
    read_all,
    receive_across_resets,
    receive_in_order,
    stream_slot,
    unique_prefix,
)
from support.redis_servers import open_cluster, open_standalone
from support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis
need_redis()


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_pubsub_connections_killed_repeatedly_while_messages_flow(topology: str) -> None:
    """``CLIENT KILL TYPE pubsub`` before every burst: each subscriber gets 1..n in order.

    Each burst is published right after the kill, while the listeners reconnect, and
    must be delivered before the next kill: a reconnect that resubscribes without a
    resync (coredis does that silently) loses the notices of the burst for good.
    """
    rounds, per_round, streams = 12, 3, ["flow-a", "flow-b"]
    total = rounds * per_round
    with trio.fail_after(90):
        async with open_topology(topology) as world:
            prefix = unique_prefix()
            async with (
                open_redis_bus(world.url, prefix=prefix) as publishing,
                open_redis_bus(world.url, prefix=prefix, poll_interval=None) as first,
                open_redis_bus(world.url, prefix=prefix, poll_interval=None) as second,
                trio.open_nursery() as nursery,
            ):
                received = [
                    await nursery.start(receive_in_order, bus, stream, total)
                    for bus in (first, second)
                    for stream in streams
                ]
                for round_ in range(rounds):
                    # At least the two subscribing buses' listeners (more in a cluster).
                    resyncs = [bus.statistics().resyncs for bus in (first, second)]
                    assert world.kill_clients("TYPE", "pubsub") >= 2
                    async with trio.open_nursery() as burst:
                        for stream in streams:
                            for i in range(per_round):
                                burst.start_soon(publishing.publish, stream, {"r": round_, "i": i})
                    done = (round_ + 1) * per_round
                    with trio.fail_after(15):  # the burst arrives, through a resync if need be
                        await eventually(lambda d=done: all(len(r) >= d for r in received))
                        # It may come before the listeners are back (their subscriptions
                        # read the store once the loss is known): wait for them, so the
                        # next kill finds them.
                        await eventually(
                            lambda r=resyncs: all(
                                bus.statistics().resyncs > before
                                for bus, before in zip((first, second), r, strict=True)
                            )
                        )
            for messages in received:
                assert [m.id for m in messages] == list(range(1, total + 1))
                bodies = [(m.body["r"], m.body["i"]) for m in messages]
                assert len(set(bodies)) == total


async def test_notices_sent_while_the_listener_is_cut_off_arrive_after_it_reconnects() -> None:
    """The subscribing bus reaches Redis through a proxy that goes down and up again.

    Messages published (by another bus, directly) while it is down were announced on
    a channel nobody of that bus heard: only the resync after the reconnect finds them.
    """
    with trio.fail_after(60):
        async with open_standalone() as server, trio.open_nursery() as nursery:
            proxy = TcpProxy("127.0.0.1", server.port)
            await proxy.start(nursery)
            prefix = unique_prefix()
            via_proxy = f"redis://127.0.0.1:{proxy.port}/0"
            async with (
                open_redis_bus(server.url, prefix=prefix) as publishing,
                open_redis_bus(via_proxy, prefix=prefix, poll_interval=None) as bus,
                trio.open_nursery() as inner,
            ):
                received = await inner.start(receive_in_order, bus, "cut", 7)
                await publishing.publish("cut", "before")
                await eventually(lambda: len(received) == 1)
                for outage in range(3):
                    proxy.down()
                    await publishing.publish("cut", {"outage": outage, "i": 0})
                    await publishing.publish("cut", {"outage": outage, "i": 1})
                    await trio.sleep(0.3)  # the listener notices and retries meanwhile
                    await proxy.up()
                    with trio.fail_after(15):
                        await eventually(lambda o=outage: len(received) == 3 + 2 * o)
            assert [m.id for m in received] == list(range(1, 8))
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("durability", ["durable", "fast"])
async def test_slot_migrated_while_subscribed_loses_nothing(durability: str) -> None:
    """The stream's slot moves to another master while messages flow.

    Redis then unsubscribes the slot's sharded channels on the old owner (coredis's
    iterator for them ends): the notifier must subscribe again at the new owner and
    resync. Messages published after the move are only delivered if it did. A
    migration copies every key as it is: nothing is lost, so in durable mode the
    subscription goes on without a reset. In fast mode a conservative
    :class:`chatbus.HistoryReset` is allowed (never a claim that the stream was
    deleted); the subscriber then resumes from its cursor in the new epoch.
    """
    before, during, after = 20, 150, 20
    total = before + during + after
    options = {"durability": durability}
    replicas = 1 if durability == "durable" else 0
    with trio.fail_after(90):
        async with open_cluster(masters=3, replicas=replicas) as nodes:
            prefix = unique_prefix()
            ledger = Ledger()
            async with (
                open_redis_bus(nodes.url, prefix=prefix, redis_options=options) as publishing,
                open_redis_bus(
                    nodes.url, prefix=prefix, redis_options=options, poll_interval=None
                ) as bus,
                publishing.open_publisher("moving") as pub,
                trio.open_nursery() as nursery,
            ):
                resets: list[chatbus.HistoryReset] = []
                received = await nursery.start(receive_across_resets, bus, "moving", total, resets)
                for i in range(before):
                    await ledger.publish(pub, {"i": i}, f"k{i}")
                slot = stream_slot(nodes, prefix)
                owner = nodes.master_for_slot(slot)
                target = next(m for m in nodes.masters() if m is not owner)
                moved = trio.Event()

                async def flow() -> None:
                    for i in range(before, before + during):
                        await ledger.publish(pub, {"i": i}, f"k{i}")
                        await trio.sleep(0.005)

                async def migrate() -> None:
                    await trio.sleep(0.2)
                    assert await trio.to_thread.run_sync(nodes.migrate_slot, slot, target) > 0
                    moved.set()

                async with trio.open_nursery() as both:
                    both.start_soon(flow)
                    both.start_soon(migrate)
                assert moved.is_set()
                assert nodes.master_for_slot(slot) is target
                for i in range(before + during, total):
                    await ledger.publish(pub, {"i": i}, f"k{i}")
                with trio.fail_after(20):
                    await eventually(lambda: len(received) == total)
                stored = await read_all(publishing, "moving")
            ledger.check(stored)
            assert [(m.id, m.body) for m in received] == [(m.id, m.body) for m in stored]
            assert [m.body["i"] for m in received] == list(range(total))
            for reset in resets:
                assert not isinstance(reset, chatbus.StreamDeleted), f"not deleted: {reset}"
            if durability == "durable":
                assert resets == [], f"durable mode, nothing lost, yet: {resets}"
            # Subscribing afresh at the new owner works too.
            async with open_redis_bus(nodes.url, prefix=prefix, poll_interval=None) as late:
                async with late.open_subscriber("moving", after=total) as sub:
                    await late.publish("moving", "after the move")
                    with trio.fail_after(10):
                        message = await sub.receive()
                    assert (message.id, message.body) == (total + 1, "after the move")


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_subscriptions_opened_and_closed_while_pubsub_is_killed_keep_the_bus(
    topology: str,
) -> None:
    """Subscriptions come and go at the moment the listening connections die: entering
    one may raise a chatbus error, leaving one never raises, and the bus lives on.

    Before the fix a SUNSUBSCRIBE sent on the dead socket raised trio's
    BrokenResourceError in the listener's nursery and took the whole bus down, and
    leaving a subscription raised "Nursery is closed to new arrivals".
    """
    streams = [f"churn-{i}" for i in range(40)]
    problems: list[str] = []
    with trio.fail_after(120):
        async with open_topology(topology) as world:
            prefix = unique_prefix()
            async with open_redis_bus(world.url, prefix=prefix, poll_interval=None) as bus:
                for cycle in range(8):
                    stop = trio.Event()

                    async def hold(stream: str, stop: trio.Event = stop) -> None:
                        try:
                            async with bus.open_subscriber(stream):
                                await stop.wait()
                        except chatbus.BusError:
                            pass  # a clear error while the listener reconnects is fine
                        except Exception as exc:  # what the test is about
                            problems.append(repr(exc))

                    async with trio.open_nursery() as nursery:
                        for stream in streams:
                            nursery.start_soon(hold, stream)
                        await trio.sleep(0.3)
                        if cycle % 2:
                            stop.set()
                            world.kill_clients("TYPE", "pubsub")
                        else:
                            world.kill_clients("TYPE", "pubsub")
                            await trio.sleep(0.001 * cycle)
                            stop.set()
                # Still serving: a live message reaches a new subscription.
                async with bus.open_subscriber("after", after=0) as sub:
                    await bus.publish("after", "still here")
                    with trio.fail_after(15):
                        assert (await sub.__anext__()).body == "still here"
    assert problems == []


async def test_subscriptions_open_promptly_while_the_listen_connection_is_killed() -> None:
    """``CLIENT KILL TYPE pubsub`` every 50 ms while subscriptions open on new streams:
    a watch given a session just given up (not yet replaced) returns at once, and its
    replacement subscribes again; no open waits out ``ping_timeout`` (found by a
    review: about one open in 100 took 5 s)."""
    slowest = 0.0
    with trio.fail_after(60):
        async with open_topology("standalone") as world:
            async with open_redis_bus(world.url, prefix=unique_prefix()) as bus:
                stop = trio.current_time() + 4

                async def killer() -> None:
                    while trio.current_time() < stop:
                        await trio.to_thread.run_sync(world.kill_clients, "TYPE", "pubsub")
                        await trio.sleep(0.05)

                async def opener(k: int) -> None:
                    nonlocal slowest
                    i = 0
                    while trio.current_time() < stop:
                        i += 1
                        began = trio.current_time()
                        async with bus.open_subscriber(f"open-{k}-{i}"):
                            slowest = max(slowest, trio.current_time() - began)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(killer)
                    for k in range(4):
                        nursery.start_soon(opener, k)
    assert slowest < 2.0
