"""The three chat-server scenarios that motivated chatbus, with chatbus's own objects.

A naive server caches recently published messages and keys its live catch-up on
"last delivered id"; each scenario below loses or repeats a message there.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio
import trio.testing

import chatbus

from support import assert_quiet, collect, dense


@attrs.define(eq=False)
class GatedStore:
    """Commits at once, but holds the *return* of chosen appends until released.

    Holding a return delays everything a local producer does after the commit (cache
    fill, wake-up, notice), which is how a racing writer's later id reaches the cache
    first.
    """

    inner: chatbus.Store
    gates: dict[str, trio.Event] = attrs.Factory(dict)

    async def append(self, stream: str, drafts: Sequence[chatbus.Draft]) -> list[chatbus.Message]:
        messages = await self.inner.append(stream, drafts)
        for draft in drafts:
            gate = self.gates.get(draft.body_json)
            if gate is not None:
                await gate.wait()
        return messages

    async def read(self, stream: str, after: int, limit: int) -> list[chatbus.Message]:
        return await self.inner.read(stream, after, limit)

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        return await self.inner.heads(streams)


async def test_scenario_1_late_lower_id_after_higher(backend):
    """Cache fills 4, 5, 7; a notice; then 6 lands late with a late notice: 5, 6, 7 once."""
    async with backend.open_bus() as plain:
        for i in range(1, 4):
            await plain.publish("chat", i)
        gated = GatedStore(plain.store)
        release_6 = gated.gates['"six"'] = trio.Event()
        async with (
            backend.open_bus(store=gated, poll_interval=None) as bus,
            bus.open_subscriber("chat", after=3) as sub,
            bus.open_publisher("chat") as worker,
            bus.open_publisher("chat") as promoter,
        ):
            await worker.publish("four")
            await worker.publish("five")
            assert await collect(sub, 2) == [4, 5]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(promoter.publish, "six")  # commits as 6, returns late
                await trio.sleep(0.05)
                seven = await worker.publish("seven")  # 7 reaches the cache first
                assert seven.id == 7
                # The subscriber must not wait for 6's own wake-up, nor skip it.
                assert await collect(sub, 2) == [6, 7]
                release_6.set()  # 6 lands in the cache, its late notice arrives
            await backend.inject_notice("chat", 6)
            await assert_quiet(sub)
            stats = sub.statistics()
            assert stats.delivered == 4 and stats.duplicates_skipped == 0
            assert [m.body for m in await bus.read("chat", after=3)] == [
                "four",
                "five",
                "six",
                "seven",
            ]


async def test_scenario_2_stale_notice_after_cursor(backend):
    """Opened with after=100, a stale notice for 96: only 101 onward, never 96-100."""
    async with backend.open_bus() as bus:
        async with bus.open_publisher("chat") as pub:
            for i in range(1, 101):
                await pub.publish(i)
        async with bus.open_subscriber("chat", after=100) as sub:
            await backend.inject_notice("chat", 96)
            await backend.inject_notice("chat", 95)
            await assert_quiet(sub)
            await bus.publish("chat", 101)
            await backend.inject_notice("chat", 96)
            got = await sub.receive()
            assert (got.id, got.body) == (101, 101)
            await assert_quiet(sub)


async def test_scenario_3_store_only_then_cache_only(backend):
    """One message only in the store (another process), the next only in the cache."""
    async with backend.open_bus() as other_process, backend.open_bus() as bus:
        async with bus.open_subscriber("chat") as sub:
            remote = await other_process.publish("chat", "from another process")
            local = await bus.publish("chat", "from this process")
            assert (remote.id, local.id) == (1, 2)
            got = [await sub.receive(), await sub.receive()]
            assert [m.body for m in got] == ["from another process", "from this process"]
            await assert_quiet(sub)


async def test_scenario_3_without_any_notice_from_the_other_process():
    """The store-only message arrives even if its notice never reaches this bus."""
    store = chatbus.memory.MemoryStore()
    async with (
        chatbus.open_bus(store=store) as other_process,  # its own, unheard notifier
        chatbus.open_bus(store=store, poll_interval=None) as bus,
        bus.open_subscriber("chat") as sub,
    ):
        await trio.testing.wait_all_tasks_blocked()  # the subscription is at the head
        await other_process.publish("chat", "store only")
        await bus.publish("chat", "cache only")
        assert await collect(sub, 2) == dense(2)
        assert sub.statistics().gaps >= 1
