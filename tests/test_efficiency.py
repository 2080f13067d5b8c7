"""Work the bus must not do: read back its own commits, or read once per subscriber."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio
import trio.testing

import chatbus
from chatbus.memory import MemoryNotifier, MemoryStore

from support import assert_quiet, collect, dense


@attrs.define(eq=False)
class PostgresLikeStore:
    """Announces each commit before the append returns, as a NOTIFY does; counts reads."""

    inner: MemoryStore
    notifier: MemoryNotifier
    reads: int = 0
    reply_delay: float = 0.002

    async def append(self, stream: str, drafts: Sequence[chatbus.Draft]) -> list[chatbus.Message]:
        messages = await self.inner.append(stream, drafts)
        await self.notifier.notify(stream, messages[-1].id)  # the listener hears it first
        await trio.sleep(self.reply_delay)  # the reply is still on its way
        return messages

    async def read(self, stream: str, after: int, limit: int) -> list[chatbus.Message]:
        self.reads += 1
        return await self.inner.read(stream, after, limit)

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        return await self.inner.heads(streams)


async def test_local_commits_are_not_read_back(autojump_clock):
    notifier = MemoryNotifier()
    store = PostgresLikeStore(MemoryStore(), notifier)
    async with (
        chatbus.open_bus(store=store, notifier=notifier) as bus,
        bus.open_subscriber("s") as sub,
        bus.open_publisher("s") as pub,
    ):
        await trio.testing.wait_all_tasks_blocked()
        reads_at_start = store.reads
        for i in range(20):
            await pub.publish(i)
        assert await collect(sub, 20) == dense(20)
        assert store.reads == reads_at_start
        assert sub.statistics().cache_hits == 20


async def test_remote_message_during_a_local_append_still_arrives(autojump_clock):
    notifier = MemoryNotifier()
    store = PostgresLikeStore(MemoryStore(), notifier, reply_delay=1.0)
    async with (
        chatbus.open_bus(store=store, notifier=notifier) as bus,
        chatbus.open_bus(store=store.inner, notifier=notifier) as remote,
        bus.open_subscriber("s") as sub,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus.publish, "s", "local, slow to return")  # id 1
            await trio.sleep(0.1)
            await remote.publish("s", "remote")  # id 2, announced while 1 is in flight
        assert [(await sub.receive()).body for _ in range(2)] == [
            "local, slow to return",
            "remote",
        ]
        # And with local appends in flight all the time, remote ids are not starved.
        async with trio.open_nursery() as nursery:

            async def keep_appending() -> None:
                for i in range(5):
                    await bus.publish("s", f"local {i}")

            nursery.start_soon(keep_appending)
            await trio.sleep(0.5)
            await remote.publish("s", "remote again")
        got = await collect(sub, 6, seconds=30)
        assert got == dense(8, 3)
        await assert_quiet(sub)


async def test_subscribers_at_one_cursor_share_one_read(autojump_clock):
    notifier = MemoryNotifier()
    store = PostgresLikeStore(MemoryStore(), notifier)
    async with (
        chatbus.open_bus(store=store, notifier=notifier) as bus,
        chatbus.open_bus(store=store.inner, notifier=notifier) as remote,
        trio.open_nursery() as nursery,
    ):
        counts: list[int] = []

        async def follow(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with bus.open_subscriber("s") as sub:
                task_status.started()
                counts.append(len(await collect(sub, 3)))

        for _ in range(50):
            await nursery.start(follow)
        await trio.testing.wait_all_tasks_blocked()
        reads_before = store.reads
        for i in range(3):
            await remote.publish("s", i)  # only the store has these: a read is needed
            await trio.testing.wait_all_tasks_blocked()
    assert counts == [3] * 50
    assert store.reads - reads_before <= 3  # one per remote message, not one per subscriber


async def test_remote_ids_are_not_held_up_by_continuous_local_appends(autojump_clock):
    notifier = MemoryNotifier()
    store = PostgresLikeStore(MemoryStore(), notifier, reply_delay=1.0)
    async with (
        chatbus.open_bus(store=store, notifier=notifier) as bus,
        chatbus.open_bus(store=store.inner, notifier=notifier) as remote,
        bus.open_subscriber("s") as sub,
        trio.open_nursery() as nursery,
    ):

        async def keep_appending(name: str) -> None:
            async with bus.open_publisher("s") as pub:
                for i in range(10):
                    await pub.publish(f"{name} {i}")

        # Two local publishers whose appends overlap: one is always in flight.
        nursery.start_soon(keep_appending, "a")
        await trio.sleep(0.5)
        nursery.start_soon(keep_appending, "b")
        await trio.sleep(2.2)
        published = await remote.publish("s", "remote")
        published_at = trio.current_time()
        async for message in sub:
            if message.id == published.id:
                break
        # Found by the next local commit's hole, about one append later; not after
        # the local publishers have finished (some 8 s on).
        assert trio.current_time() - published_at < 2.5
        rest = await collect(sub, 21 - published.id, seconds=60)
        assert rest == dense(21, published.id + 1)
