"""chatbus.testing's fault injectors, and the guarantees holding under them."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import chatbus
from chatbus.memory import MemoryNotifier, MemoryStore
from chatbus.testing import FaultyNotifier, LaggingStore

from support import assert_quiet, collect, dense


class Recorder:
    def __init__(self) -> None:
        self.notices: list[int] = []
        self.resyncs = 0

    def notice(self, stream: str, last_id: int) -> None:
        self.notices.append(last_id)

    def resync(self) -> None:
        self.resyncs += 1


async def record_faults(seed: int) -> tuple[list[int], chatbus.testing.FaultStatistics]:
    inner = MemoryNotifier()
    faulty = FaultyNotifier(inner, drop=0.2, duplicate=0.2, reorder=0.2, max_delay=0.5, seed=seed)
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(faulty.listen, recorder)
        for i in range(1, 201):
            await inner.notify("s", i)
            await trio.sleep(0.01)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    return recorder.notices, faulty.statistics()


async def test_faulty_notifier_mistreats_reproducibly(autojump_clock):
    notices, stats = await record_faults(seed=7)
    again, _ = await record_faults(seed=7)
    other, _ = await record_faults(seed=8)
    assert notices == again
    assert notices != other
    assert stats.received == 200
    assert min(stats.dropped, stats.duplicated, stats.reordered, stats.delayed) > 0
    assert notices != sorted(notices)  # reordered
    assert len(notices) != len(set(notices))  # duplicated
    assert len(set(notices)) < 200  # dropped
    assert stats.delivered == len(notices)


async def test_faulty_notifier_passes_resync_and_bounds_what_it_holds(autojump_clock):
    inner = MemoryNotifier()
    faulty = FaultyNotifier(inner, max_delay=10, capacity=5)
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(faulty.listen, recorder)
        for i in range(20):
            await inner.notify("s", i)
        assert faulty.statistics().dropped == 15
        for handler in inner._handlers:
            handler.resync()
        assert recorder.resyncs == 1
        nursery.cancel_scope.cancel()


def test_fault_options_are_validated():
    with pytest.raises(ValueError, match="drop"):
        FaultyNotifier(MemoryNotifier(), drop=1.5)
    with pytest.raises(ValueError, match="lag"):
        LaggingStore(MemoryStore(), lag=-1)


@pytest.mark.parametrize("seed", range(6))
async def test_racing_remote_publishers_through_a_faulty_notifier(seed, autojump_clock):
    """Drops, duplicates, delays, reorders: every subscriber still sees 1..n once."""
    store, inner = MemoryStore(), MemoryNotifier()
    faulty = FaultyNotifier(inner, drop=0.3, duplicate=0.3, reorder=0.3, max_delay=0.2, seed=seed)
    n_each = 60
    total = 2 * n_each + 1  # two racing remote publishers and one local message
    async with (
        chatbus.open_bus(store=store, notifier=inner) as remote_a,
        chatbus.open_bus(store=store, notifier=inner) as remote_b,
        chatbus.open_bus(store=store, notifier=faulty, cache_size=8, read_batch=7) as local,
    ):
        seen: list[list[int]] = []

        async def subscribe(after: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with local.open_subscriber("s", after=after) as sub:
                task_status.started()
                ids = await collect(sub, total - after, seconds=60)
                await assert_quiet(sub, seconds=2)
                seen.append([after, *ids])

        async def publish(bus: chatbus.Bus, tag: str) -> None:
            async with bus.open_publisher("s") as pub:
                for i in range(n_each):
                    await pub.publish([tag, i])
                    await trio.sleep(0.003)

        async with trio.open_nursery() as nursery:
            await nursery.start(subscribe, 0)
            nursery.start_soon(publish, remote_a, "a")
            nursery.start_soon(publish, remote_b, "b")
            nursery.start_soon(local.publish, "s", "local")
            await trio.sleep(0.05)
            await nursery.start(subscribe, 5)
        assert len(seen) == 2
        for after, *ids in seen:
            assert ids == dense(total, after + 1)
        assert faulty.statistics().dropped > 0


async def test_subscriber_waits_for_a_lagging_store(autojump_clock):
    """Notices arrive before the replica shows the rows: retried until it catches up."""
    primary, notifier = MemoryStore(), MemoryNotifier()
    replica = LaggingStore(primary, lag=2.0)
    async with (
        chatbus.open_bus(store=replica, notifier=notifier) as writer,
        chatbus.open_bus(store=replica, notifier=notifier) as reader,
        reader.open_subscriber("s") as sub,
    ):
        start = trio.current_time()
        for i in range(10):
            await writer.publish("s", i)
        assert await reader.read("s") == []  # not visible yet
        assert await collect(sub, 10, seconds=30) == dense(10)
        assert trio.current_time() - start >= 2.0
        stats = sub.statistics()
        assert stats.store_reads > 2  # it had to retry
        await assert_quiet(sub)


async def test_lost_notices_are_found_by_the_poll(autojump_clock):
    store = MemoryStore()
    dropper = FaultyNotifier(MemoryNotifier(), drop=1.0)
    async with (
        chatbus.open_bus(store=store) as other,
        chatbus.open_bus(store=store, notifier=dropper, poll_interval=0.5) as bus,
        bus.open_subscriber("s") as sub,
    ):
        await trio.testing.wait_all_tasks_blocked()  # the subscription is at the head
        await other.publish("s", "never announced here")
        start = trio.current_time()
        assert await collect(sub, 1, seconds=5) == [1]
        assert trio.current_time() - start <= 0.6
        assert bus.statistics().polls >= 1


async def test_pytest_plugin_fixture(chatbus_bus):
    async with chatbus_bus.open_subscriber("s") as sub:
        await chatbus_bus.publish("s", "hello")
        assert (await sub.receive()).body == "hello"
