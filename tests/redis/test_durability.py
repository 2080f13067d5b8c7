"""What a publish means when servers restart or replicas lag: epochs, durable mode.

Each test starts servers of its own (tests/support/redis_servers.py), so it can stop,
restart and pause them.
"""

from __future__ import annotations

import pytest
import trio

import chatbus
from chatbus.redis import open_redis

from support import assert_quiet, collect
from support.redis_servers import RedisServer, binaries_problem, open_standalone

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True)
def _needs_redis_server() -> None:
    problem = binaries_problem()
    if problem is not None:
        pytest.skip(problem)


async def _restart(server: RedisServer) -> None:
    await trio.to_thread.run_sync(server.stop)
    await trio.to_thread.run_sync(server.start)


async def _publish_when_back(bus: chatbus.Bus, body: object) -> chatbus.Message:
    """Publish as soon as the server answers again (the pool reconnects by itself)."""
    while True:
        try:
            return await bus.publish("s", body)
        except chatbus.StoreError:
            await trio.sleep(0.05)


async def test_a_restart_that_lost_everything_fails_stale_cursors_never_skips() -> None:
    with trio.fail_after(60):
        async with open_standalone(aof="no") as server:
            async with (
                open_redis(server.url, prefix="p", connect_timeout=1) as (store, notifier),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
            ):
                for i in range(3):
                    await bus.publish("s", i)
                before = await bus.stream_info("s")
                await _restart(server)  # no AOF: everything is gone
                assert (await _publish_when_back(bus, "new")).id == 1
                after = await bus.stream_info("s")
                assert after.epoch != before.epoch and after.head == 1
                with pytest.raises(chatbus.HistoryReset):
                    async with bus.open_subscriber("s", after=3, epoch=before.epoch):
                        pass
                with pytest.raises(chatbus.CursorAhead):
                    async with bus.open_subscriber("s", after=3):
                        pass


async def test_another_server_process_starts_a_new_epoch_and_live_subscribers_learn_it() -> None:
    """Fast mode cannot know what a restart (or failover) lost: the stream's epoch
    changes at the next append, and a live subscription ends with HistoryReset."""
    with trio.fail_after(60):
        async with open_standalone(aof="always") as server:
            async with (
                open_redis(server.url, prefix="p", connect_timeout=1, max_backoff=0.2) as pair,
                chatbus.open_bus(store=pair[0], notifier=pair[1]) as bus,
                bus.open_subscriber("s") as sub,
            ):
                for i in range(3):
                    await bus.publish("s", i)
                assert await collect(sub, 3) == [1, 2, 3]
                before = await bus.stream_info("s")
                await _restart(server)  # AOF always: the data is back
                assert (await _publish_when_back(bus, "after")).id == 4
                assert (await bus.stream_info("s")).epoch != before.epoch
                # A rescan racing that append may deliver it first (the epoch is
                # checked at each resync, not per read); then the subscription ends.
                with pytest.raises(chatbus.HistoryReset):
                    await _receive_past(sub, 4)


async def _receive_past(sub: chatbus.Subscriber[chatbus.Message], last: int) -> None:
    """Receive until something raises; only ids up to ``last`` may come before."""
    while True:
        assert (await sub.receive()).id <= last


async def _replicate(primary: RedisServer, replica: RedisServer) -> None:
    await trio.to_thread.run_sync(replica.command, "REPLICAOF", "127.0.0.1", primary.port)
    while replica.info("replication").get("master_link_status") != "up":  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_durable_publishes_are_visible_only_once_a_replica_has_them() -> None:
    with trio.fail_after(60):
        async with open_standalone() as primary, open_standalone() as replica:
            await _replicate(primary, replica)
            async with (
                open_redis(primary.url, prefix="p", durability="durable", wait_timeout=0.3) as (
                    store,
                    notifier,
                ),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
                bus.open_subscriber("s") as sub,
            ):
                assert (await bus.publish("s", "one")).id == 1
                assert await collect(sub, 1) == [1]
                replica.pause()
                try:
                    with pytest.raises(chatbus.OutcomeUnknown, match="not confirmed"):
                        await bus.publish("s", "two")
                    # Stored on the primary, but nobody may see it: a failover now
                    # could lose it and give its id to another message.
                    assert [m.id for m in await bus.read("s")] == [1]
                    assert (await bus.stream_info("s")).head == 1
                    assert (await store.heads(["s"]))["s"] == 1
                    await assert_quiet(sub)
                finally:
                    replica.resume()
                # The next durable append makes everything before it visible too.
                assert (await bus.publish("s", "three")).id == 3
                assert [m.body for m in await bus.read("s")] == ["one", "two", "three"]
                assert await collect(sub, 2) == [2, 3]


async def test_a_durable_wait_unblocked_is_an_unknown_outcome_not_a_failure() -> None:
    """A failover turns the primary into a replica while an append's WAIT blocks: the
    server unblocks the WAIT with an error (here CLIENT UNBLOCK … ERROR, the same
    reply). The script ran, so the batch is stored, invisible: OutcomeUnknown, never
    StoreError ("nothing stored"), which would invite an unkeyed retry to store it
    twice."""
    with trio.fail_after(60):
        async with open_standalone() as primary, open_standalone() as replica:
            await _replicate(primary, replica)
            async with (
                open_redis(primary.url, prefix="p", durability="durable", wait_timeout=20) as (
                    store,
                    notifier,
                ),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
            ):
                assert (await bus.publish("s", "one")).id == 1
                replica.pause()
                outcome: list[BaseException] = []

                async def publish() -> None:
                    try:
                        await bus.publish("s", "two")
                    except Exception as exc:
                        outcome.append(exc)

                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(publish)
                        waiting: list[str] = []
                        while not waiting:
                            await trio.sleep(0.05)
                            clients = await trio.to_thread.run_sync(
                                primary.command, "CLIENT", "LIST"
                            )
                            waiting = [
                                line.split("id=", 1)[1].split(" ", 1)[0]
                                for line in clients.splitlines()
                                if " cmd=wait " in line
                            ]
                        await trio.to_thread.run_sync(
                            primary.command, "CLIENT", "UNBLOCK", waiting[0], "ERROR"
                        )
                finally:
                    replica.resume()
                (error,) = outcome
                assert isinstance(error, chatbus.OutcomeUnknown), error
                assert "not confirmed" in str(error)
                # Stored: the next durable append makes it visible.
                assert (await bus.publish("s", "three")).id == 3
                assert [m.body for m in await bus.read("s")] == ["one", "two", "three"]


async def test_durable_mode_refuses_to_open_without_enough_replicas() -> None:
    """Without the replicas it waits for, every durable publish would fail after
    wait_timeout: refuse at open, naming the primary and the count."""
    with trio.fail_after(60):
        async with open_standalone() as primary, open_standalone() as replica:
            with pytest.raises(chatbus.StoreError, match=r"wait_replicas=1 .* has 0"):
                async with open_redis(primary.url, prefix="p", durability="durable"):
                    pass
            with pytest.raises(chatbus.StoreError, match="durable mode needs"):
                async with chatbus.open_bus(primary.url + "?durability=durable"):
                    pass
            await _replicate(primary, replica)
            with pytest.raises(chatbus.StoreError, match=r"wait_replicas=2 .* has 1"):
                async with open_redis(
                    primary.url, prefix="p", durability="durable", wait_replicas=2
                ):
                    pass
            with pytest.raises(chatbus.StoreError, match="not a primary"):
                async with open_redis(replica.url, prefix="p", durability="durable"):
                    pass
            async with (
                open_redis(primary.url, prefix="p", durability="durable") as (store, notifier),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
            ):
                assert (await bus.publish("s", "kept")).id == 1
            # The fast mode needs no replica.
            async with open_redis(primary.url, prefix="q") as (store, notifier):
                assert store.durability == "fast"
