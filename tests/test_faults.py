"""Faults of the pluggable parts: a failing store or notifier, and the bus recovering."""

from __future__ import annotations

import pytest
import trio

import chatbus

from support import collect


async def test_failing_store_raises_store_error_and_bus_recovers():
    class FlakyStore:
        broken = True
        inner = chatbus.memory.MemoryStore()

        async def append(self, stream, drafts):
            if self.broken:
                raise OSError("disk on fire")
            return await self.inner.append(stream, drafts)

        async def read(self, stream, after, limit):
            return await self.inner.read(stream, after, limit)

        async def heads(self, streams):
            return await self.inner.heads(streams)

    store = FlakyStore()
    async with chatbus.open_bus(store=store) as bus, bus.open_subscriber("s") as sub:
        with pytest.raises(chatbus.StoreError, match="disk on fire") as info:
            await bus.publish("s", 1)
        assert isinstance(info.value.__cause__, OSError)
        store.broken = False
        assert (await bus.publish("s", 2)).id == 1
        assert await collect(sub, 1) == [1]


async def test_failing_notify_still_publishes_and_is_counted(autojump_clock):
    class BrokenNotifier:
        inner = chatbus.memory.MemoryNotifier()

        async def notify(self, stream, last_id):
            raise OSError("notice channel down")

        async def listen(self, handler, *, task_status=trio.TASK_STATUS_IGNORED):
            await self.inner.listen(handler, task_status=task_status)

    store = chatbus.memory.MemoryStore()
    async with (
        chatbus.open_bus(store=store, notifier=BrokenNotifier()) as bus,
        chatbus.open_bus(store=store, poll_interval=0.5) as other,
        other.open_subscriber("s") as sub,
        bus.open_publisher("s") as pub,
    ):
        assert (await pub.publish("committed anyway")).id == 1
        assert pub.statistics().notify_errors == 1
        assert await collect(sub, 1) == [1]  # found by the other bus's poll
