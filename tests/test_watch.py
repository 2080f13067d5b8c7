"""The optional WatchingNotifier protocol: the bus watches a stream before it reads."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

import chatbus
from chatbus.memory import MemoryNotifier, MemoryStore


@attrs.define(eq=False)
class Log:
    entries: list[str] = attrs.Factory(list)


@attrs.define(eq=False)
class WatchingNotifier:
    """A memory notifier that must be told which streams to watch (slowly)."""

    inner: MemoryNotifier
    log: Log
    watched: dict[str, int] = attrs.Factory(dict)

    async def notify(self, stream: str, last_id: int) -> None:
        await self.inner.notify(stream, last_id)

    async def listen(self, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        await self.inner.listen(handler, task_status=task_status)

    async def watch(self, stream: str) -> None:
        self.watched[stream] = self.watched.get(stream, 0) + 1
        self.log.entries.append(f"watch {stream}")
        await trio.sleep(0.01)  # the server's confirmation takes a while
        self.log.entries.append(f"watching {stream}")

    def unwatch(self, stream: str) -> None:
        self.watched[stream] -= 1
        self.log.entries.append(f"unwatch {stream}")


@attrs.define(eq=False)
class LoggingStore:
    inner: MemoryStore
    log: Log

    async def append(self, stream: str, drafts: Sequence[object]) -> list[chatbus.Message]:
        return await self.inner.append(stream, drafts)  # type: ignore[arg-type]

    async def read(self, stream: str, after: int, limit: int) -> list[chatbus.Message]:
        self.log.entries.append(f"read {stream}")
        return await self.inner.read(stream, after, limit)

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        return await self.inner.heads(streams)


async def test_a_stream_is_watched_once_before_its_first_read_and_unwatched_after_the_last() -> (
    None
):
    log = Log()
    notifier = WatchingNotifier(MemoryNotifier(), log)
    store = LoggingStore(MemoryStore(), log)
    with trio.fail_after(10):
        async with chatbus.open_bus(store=store, notifier=notifier) as bus:  # type: ignore[arg-type]
            async with trio.open_nursery() as nursery:
                opened = trio.Event()

                async def subscribe() -> None:
                    async with bus.open_subscriber("s"):
                        opened.set()
                        await trio.sleep(0.1)

                for _ in range(3):  # concurrent subscriptions share one watch
                    nursery.start_soon(subscribe)
                await opened.wait()
                assert log.entries[:2] == ["watch s", "watching s"]
                assert log.entries.count("watch s") == 1
                assert "read s" in log.entries[2:]
            assert notifier.watched == {"s": 0}
            assert log.entries[-1] == "unwatch s"
            async with bus.open_subscriber("s"):  # watched again, once
                assert notifier.watched == {"s": 1}
            assert notifier.watched == {"s": 0}


async def test_a_cancelled_watch_is_balanced() -> None:
    log = Log()
    notifier = WatchingNotifier(MemoryNotifier(), log)
    async with chatbus.open_bus(store=MemoryStore(), notifier=notifier) as bus:  # type: ignore[arg-type]
        with trio.move_on_after(0.001):
            async with bus.open_subscriber("s"):
                raise AssertionError("the watch takes longer than that")
        assert notifier.watched == {"s": 0}
