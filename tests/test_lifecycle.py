"""Cancellation and shutdown: no leaked tasks, no hangs, clear errors."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import chatbus
from chatbus.testing import LaggingStore

from support import collect


def task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def test_leaving_blocks_leaves_no_tasks():
    before = task_count()
    with trio.fail_after(5):
        async with chatbus.open_bus() as bus:
            async with bus.open_publisher("s") as pub, bus.open_subscriber("s") as sub:
                await pub.publish(1)
                await bus.publish("s", 2)  # starts the bus's shared producer
                assert await collect(sub, 2) == [1, 2]
                assert task_count() > before
    assert task_count() == before


async def test_cancelling_a_consumer_mid_wait():
    with trio.fail_after(5):
        async with chatbus.open_bus() as bus, bus.open_subscriber("s") as sub:
            with trio.move_on_after(0.05) as scope:
                await sub.receive()
            assert scope.cancelled_caught
            await bus.publish("s", "still works")
            assert (await sub.receive()).id == 1


async def test_closing_the_bus_ends_subscriptions_and_fails_publishes():
    store = LaggingStore(chatbus.memory.MemoryStore(), lag=0)
    results: list[object] = []
    with trio.fail_after(5):
        async with chatbus.open_bus(store=store) as bus:
            async with bus.open_subscriber("s") as sub, bus.open_publisher("s") as pub:
                await pub.publish("committed")
                assert await collect(sub, 1) == [1]

                async def consume() -> None:
                    results.extend([m.id async for m in sub])
                    results.append("ended")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume)
                    await trio.testing.wait_all_tasks_blocked()
                    await bus.aclose()
                await bus.aclose()  # idempotent
                assert results == ["ended"]
                with pytest.raises(chatbus.BusClosed):
                    await pub.publish("too late")
                with pytest.raises(chatbus.BusClosed):
                    await bus.publish("s", "too late")
                with pytest.raises(chatbus.BusClosed):
                    await bus.read("s")
                with pytest.raises(chatbus.BusClosed):
                    async with bus.open_subscriber("s"):
                        pass
                with pytest.raises(chatbus.BusClosed):
                    async with bus.open_publisher("s"):
                        pass
                results.append("body ran to the end")
    # Closing the bus ends the subscription's task, never the caller's own code.
    assert results == ["ended", "body ran to the end"]


async def test_closing_the_bus_does_not_cancel_the_callers_code():
    reached = []
    with trio.fail_after(5):
        async with chatbus.open_bus() as bus:
            async with bus.open_subscriber("s") as sub, bus.open_publisher("s"):
                await bus.aclose()
                await trio.sleep(0.01)  # a checkpoint: would raise if we were cancelled
                with pytest.raises(trio.EndOfChannel):
                    await sub.receive()
                reached.append("subscriber body")
            await trio.sleep(0.01)
            reached.append("bus body")
    assert reached == ["subscriber body", "bus body"]


class SlowStore(chatbus.memory.MemoryStore):
    """Appends take ``delay`` seconds (before committing)."""

    delay: float = 1.0

    async def append(self, stream, drafts):
        await trio.sleep(self.delay)
        return await super().append(stream, drafts)


async def test_pending_publishes_commit_or_raise_on_bus_close(autojump_clock):
    store = SlowStore()
    outcomes: list[object] = []

    async def publish(pub: chatbus.Publisher, i: int) -> None:
        try:
            outcomes.append((await pub.publish(i)).id)
        except chatbus.BusClosed as exc:
            outcomes.append(type(exc))

    with trio.fail_after(60):
        async with chatbus.open_bus(store=store, max_batch=1) as bus:
            async with bus.open_publisher("s") as pub, trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(publish, pub, i)
                await trio.sleep(1.5)  # the first commits, the second is in flight
                await bus.aclose()
    assert outcomes[0] == 1
    assert outcomes[1:] == [chatbus.BusClosed] * 4
    assert store.last_id("s") <= 2  # the in-flight one may have committed


async def test_closing_a_publisher_commits_what_is_queued(autojump_clock):
    store = SlowStore()
    outcomes: list[int] = []
    with trio.fail_after(60):
        async with chatbus.open_bus(store=store, max_batch=2) as bus:
            async with trio.open_nursery() as nursery:
                async with bus.open_publisher("s") as pub:

                    async def publish(i: int) -> None:
                        outcomes.append((await pub.publish(i)).id)

                    for i in range(5):
                        nursery.start_soon(publish, i)
                    await trio.testing.wait_all_tasks_blocked()
            assert sorted(outcomes) == [1, 2, 3, 4, 5]
            assert pub.statistics().batches == 3


async def test_cancelled_publish_before_commit_stores_nothing(autojump_clock):
    store = SlowStore()
    async with chatbus.open_bus(store=store, max_batch=1) as bus, bus.open_publisher("s") as pub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pub.publish, "first")
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.1):
                await pub.publish("cancelled while queued")
        await pub.publish("after")  # the producer has been past the cancelled one
        assert [m.body for m in await bus.read("s")] == ["first", "after"]


async def test_shared_producer_retires_when_idle(autojump_clock):
    async with chatbus.open_bus() as bus:
        await bus.publish("s", 1)
        assert bus.statistics().publishers == 1
        await trio.sleep(10)
        assert bus.statistics().publishers == 0
        assert bus.statistics().streams == 0
        assert (await bus.publish("s", 2)).id == 2


async def test_subscriber_after_close_raises_closed_resource():
    async with chatbus.open_bus() as bus:
        async with bus.open_subscriber("s") as sub:
            pass
        with pytest.raises(trio.ClosedResourceError):
            await sub.receive()
        assert bus.statistics().subscribers == 0


async def test_a_second_concurrent_reader_is_refused_not_hung():
    with trio.fail_after(5):
        async with chatbus.open_bus() as bus, bus.open_subscriber("s") as sub:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sub.receive)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError, match="one consumer"):
                    await sub.receive()
                nursery.cancel_scope.cancel()
            # The cancelled waiter is gone: receiving works again.
            await bus.publish("s", 1)
            assert (await sub.receive()).id == 1


async def test_a_cancelled_receive_never_loses_what_was_ready():
    async with chatbus.open_bus() as bus, bus.open_subscriber("s", events=True) as sub:
        await bus.publish("s", "one")
        await bus.emit("s", "part")
        await bus.publish("s", "two")
        await trio.testing.wait_all_tasks_blocked()
        got = []
        with trio.fail_after(5):
            while len(got) < 3:
                with trio.CancelScope() as scope:
                    scope.cancel()  # every receive is cancelled once before it runs
                    got.append(await sub.receive())
                got.append(await sub.receive())
        assert [x.body for x in got] == ["one", "part", "two"]
