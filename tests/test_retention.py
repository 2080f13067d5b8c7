"""Retention: the policy a bus applies by itself, and the window of trimmed keys.

Deterministic on the memory store (``autojump_clock``, a store clock that follows
trio's), then the same guarantees on every backend in real (short) time.
"""

from __future__ import annotations

import datetime

import pytest
import trio
import trio.testing

import chatbus
from chatbus._message import make_draft
from chatbus.memory import MemoryNotifier, MemoryStore

from support import collect, dense

_T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def trio_clock_store() -> MemoryStore:
    """A memory store whose clock is trio's (so autojump_clock ages its messages)."""
    return MemoryStore(now=lambda: _T0 + datetime.timedelta(seconds=trio.current_time()))


async def first_id_reaches(bus: chatbus.Bus, stream: str, first_id: int) -> int:
    """Wait until ``stream``'s first retained id is at least ``first_id``; return it.

    Polling: the store has no event to wait on. Bound it with ``trio.fail_after``.
    """
    while (info := await bus.stream_info(stream)).first_id < first_id:  # noqa: ASYNC110
        await trio.sleep(0.02)
    return info.first_id


async def firsts(bus: chatbus.Bus, *streams: str) -> list[int]:
    return [(await bus.stream_info(stream)).first_id for stream in streams]


async def test_count_rule_keeps_the_last_n_of_every_stream(autojump_clock):
    store = trio_clock_store()
    policy = chatbus.Retention(max_messages=5, interval=10, streams_per_round=2)
    async with chatbus.open_bus(store=store) as writer:
        # Streams this bus never touched are swept too: the store lists them.
        for i in range(20):
            await writer.publish("a", i)
        for name in "bcde":
            for i in range(8):
                await writer.publish(name, i)
        await writer.publish("small", 0)
        async with chatbus.open_bus(store=store, retention=policy) as bus:
            assert await firsts(bus, "a", "b", "small") == [1, 1, 1]
            await trio.sleep(11)  # one sweep, three pages of two streams
            assert await firsts(bus, "a", "b", "c", "d", "e", "small") == [16, 4, 4, 4, 4, 1]
            assert [m.id for m in await bus.read("a")] == dense(20, 16)
            stats = bus.statistics()
            assert (stats.retention_sweeps, stats.retention_trims) == (1, 5)
            assert stats.retention_errors == 0
            await trio.sleep(10)  # nothing beyond the policy now: nothing trimmed
            assert bus.statistics().retention_trims == 5
            assert (await bus.publish("a", "next")).id == 21  # ids are never reused


async def test_age_rule_drops_what_is_older_than_max_age(autojump_clock):
    store = trio_clock_store()
    policy = chatbus.Retention(max_age=50, interval=10)
    async with chatbus.open_bus(store=store, retention=policy) as bus:
        for i in range(5):
            await bus.publish("room", i)
        await trio.sleep(45)
        for i in range(5):
            await bus.publish("room", i)
        assert await firsts(bus, "room") == [1]
        await trio.sleep(20)  # the first five are 65 s old, the others 20 s
        assert await firsts(bus, "room") == [6]
        await trio.sleep(60)  # everything is old: all trimmed, the head stays
        info = await bus.stream_info("room")
        assert (info.first_id, info.head) == (11, 10)
        assert await bus.read("room") == []
        assert (await bus.publish("room", "fresh")).id == 11


async def test_both_rules_apply_together(autojump_clock):
    store = trio_clock_store()
    policy = chatbus.Retention(max_messages=8, max_age=100, interval=10)
    async with chatbus.open_bus(store=store, retention=policy) as bus:
        for i in range(10):
            await bus.publish("room", i)
        await trio.sleep(11)
        assert await firsts(bus, "room") == [3]  # the count rule
        await trio.sleep(95)
        for i in range(2):
            await bus.publish("room", i)
        await trio.sleep(10)
        assert await firsts(bus, "room") == [11]  # the age rule, though 8 would fit


async def test_a_slow_subscriber_behind_the_window_is_told_never_jumps(autojump_clock):
    store = trio_clock_store()
    policy = chatbus.Retention(max_messages=10, interval=1)
    async with (
        chatbus.open_bus(store=store, retention=policy, read_batch=5) as bus,
        bus.open_subscriber("room") as slow,
    ):
        for i in range(50):
            await bus.publish("room", i)
        received = await collect(slow, 2)
        await trio.sleep(2)  # a sweep trims to the last 10 while it dawdles
        assert await firsts(bus, "room") == [41]
        with pytest.raises(chatbus.HistoryTruncated) as info, trio.fail_after(60):  # noqa: PT012
            while True:
                received.append((await slow.receive()).id)
        assert info.value.first_id == 41
        # What it got before the error is dense from 1: no message skipped silently.
        assert received == dense(len(received))
        assert slow.cursor == len(received) < 40
        # The caller decides: here, reload from the first retained id.
        async with bus.open_subscriber("room", after=info.value.first_id - 1) as again:
            assert await collect(again, 10) == dense(50, 41)


async def test_retention_never_blocks_publishes(autojump_clock):
    class StuckTrims(MemoryStore):
        async def trim(self, stream, before, *, keys_for=None, epoch=None):
            await trio.sleep_forever()

    store = StuckTrims()
    policy = chatbus.Retention(max_messages=1, interval=1)
    async with chatbus.open_bus(store=store, retention=policy) as bus:
        await bus.publish("room", 1)
        await bus.publish("room", 2)
        await trio.sleep(5)  # the sweep is stuck in a trim
        with trio.fail_after(1):
            assert (await bus.publish("room", 3)).id == 3
            async with bus.open_subscriber("room") as sub:
                assert await collect(sub, 3) == [1, 2, 3]


async def test_failing_store_is_counted_and_the_next_sweep_retries(autojump_clock):
    class Flaky(MemoryStore):
        fail = True

        async def over_retention(self, *args, **kwargs):
            if self.fail:
                raise chatbus.StoreError("retention failed: the store is down")
            return await super().over_retention(*args, **kwargs)

    store = Flaky()
    policy = chatbus.Retention(max_messages=1, interval=1)
    async with chatbus.open_bus(store=store, retention=policy) as bus:
        await bus.publish("room", 1)
        await bus.publish("room", 2)
        await trio.sleep(1.5)
        assert bus.statistics().retention_errors == 1
        store.fail = False
        await trio.sleep(1)
        assert await firsts(bus, "room") == [2]


async def test_several_buses_sweeping_at_once_agree(autojump_clock):
    store, notifier = trio_clock_store(), MemoryNotifier()
    policy = chatbus.Retention(max_messages=3, interval=1, streams_per_round=1)
    async with (
        chatbus.open_bus(store=store, notifier=notifier, retention=policy) as one,
        chatbus.open_bus(store=store, notifier=notifier, retention=policy) as two,
        chatbus.open_bus(store=store, notifier=notifier, retention=policy) as three,
    ):
        for round_ in range(5):
            for bus in (one, two, three):
                for name in ("x", "y"):
                    await bus.publish(name, round_)
            await trio.sleep(1.1)
        for name in ("x", "y"):
            info = await one.stream_info(name)
            assert (info.first_id, info.head) == (13, 15)
            assert [m.id for m in await two.read(name)] == dense(15, 13)


def test_retention_options_are_validated():
    with pytest.raises(ValueError, match="max_messages, max_age or both"):
        chatbus.Retention()
    with pytest.raises(ValueError, match="max_messages must be between 1"):
        chatbus.Retention(max_messages=0)
    with pytest.raises(TypeError, match="max_messages must be an int"):
        chatbus.Retention(max_messages=2.5)
    with pytest.raises(ValueError, match="max_age must be between"):
        chatbus.Retention(max_age=-1)
    with pytest.raises(ValueError, match="interval must be between"):
        chatbus.Retention(max_age=1, interval=0)
    with pytest.raises(ValueError, match="streams_per_round must be between"):
        chatbus.Retention(max_age=1, streams_per_round=0)


async def test_open_bus_checks_retention_and_the_key_window():
    with pytest.raises(TypeError, match=r"chatbus\.Retention"):
        async with chatbus.open_bus(retention={"max_messages": 5}):
            pass
    with pytest.raises(ValueError, match="trimmed_keys_for must be between"):
        async with chatbus.open_bus(trimmed_keys_for=-1):
            pass

    class NoLifecycle:
        append = MemoryStore.append
        read = MemoryStore.read
        heads = MemoryStore.heads

    with pytest.raises(chatbus.BusError, match="NoLifecycle has no trim"):
        async with chatbus.open_bus(
            store=NoLifecycle(), retention=chatbus.Retention(max_messages=5)
        ):
            pass


async def test_trimmed_keys_answer_retries_for_their_window_then_go(autojump_clock):
    store = trio_clock_store()
    async with chatbus.open_bus(store=store, trimmed_keys_for=60) as bus:
        seen = await bus.publish("room", "hello", key="client-1")
        for i in range(3):
            await bus.publish("room", i)
        await bus.trim("room", before=4)
        await trio.sleep(30)
        again = await bus.publish("room", "hello", key="client-1")
        assert again.replay and again.id == seen.id  # no duplicate of what the client saw
        await trio.sleep(31)  # the message is 61 s old: past the window
        await bus.trim("room", before=4)  # the next trim forgets the key
        late = await bus.publish("room", "hello", key="client-1")
        assert not late.replay and late.id == 5


async def test_retention_forgets_trimmed_keys_past_their_window(autojump_clock):
    store = trio_clock_store()
    policy = chatbus.Retention(max_messages=2, interval=10)
    async with chatbus.open_bus(store=store, retention=policy, trimmed_keys_for=100) as bus:
        seen = await bus.publish("room", "hello", key="client-1")
        for i in range(3):
            await bus.publish("room", i)
        await trio.sleep(11)
        assert await firsts(bus, "room") == [3]
        assert (await bus.publish("room", "hello", key="client-1")).id == seen.id
        await trio.sleep(100)  # later sweeps: nothing over the count, the key expired
        assert (await bus.publish("room", "hello", key="client-1")).id == 5


async def test_trimmed_keys_for_none_keeps_them_until_delete(autojump_clock):
    store = trio_clock_store()
    async with chatbus.open_bus(store=store, trimmed_keys_for=None, poll_interval=None) as bus:
        seen = await bus.publish("room", "hello", key="client-1")
        await bus.publish("room", "more")
        await bus.trim("room", before=3)
        await trio.sleep(10 * 366 * 86_400)
        await bus.trim("room", before=3)
        assert (await bus.publish("room", "hello", key="client-1")).id == seen.id
        await bus.delete_stream("room")
        assert (await bus.publish("room", "hello", key="client-1")).id == 1


# ---- every backend, real time -----------------------------------------------------


async def test_retention_on_every_backend(backend):
    policy = chatbus.Retention(max_messages=5, interval=0.05)
    with trio.fail_after(20):
        async with backend.open_bus(read_batch=2) as writer, writer.open_subscriber("a") as slow:
            for i in range(20):
                await writer.publish("a", i)
            for i in range(3):
                await writer.publish("b", i)
            assert await collect(slow, 1) == [1]
            async with backend.open_bus(retention=policy) as bus:
                assert await first_id_reaches(bus, "a", 16) == 16
                assert [m.id for m in await writer.read("a")] == dense(20, 16)
                assert (await bus.stream_info("b")).first_id == 1
                # The subscriber, in another "process", is told; it never jumps.
                got = [1]
                with pytest.raises(chatbus.HistoryTruncated) as info:  # noqa: PT012
                    while True:
                        got.append((await slow.receive()).id)
                assert info.value.first_id == 16 and got == dense(len(got))


async def test_age_retention_on_every_backend(backend):
    policy = chatbus.Retention(max_age=2.0, interval=0.05)
    with trio.fail_after(20):
        async with backend.open_bus(retention=policy) as bus:
            for i in range(4):
                await bus.publish("room", i)
            await trio.sleep(2.3)
            for i in range(2):
                await bus.publish("room", i)
            # The old four go at the next sweep; the fresh two are 2 s from their turn.
            assert await first_id_reaches(bus, "room", 5) == 5
            assert [m.id for m in await bus.read("room")] == [5, 6]


async def test_trimmed_key_window_on_every_backend(backend):
    with trio.fail_after(20):
        async with backend.open_bus(trimmed_keys_for=1.0) as bus:
            seen = await bus.publish("room", "hello", key="client-1")
            await bus.publish("room", "other", key="client-2")
            await bus.publish("room", "plain")
            await bus.trim("room", before=3)
            again = await bus.publish("room", "hello", key="client-1")
            assert again.replay and (again.id, again.body) == (seen.id, "hello")
            await trio.sleep(1.2)
            await bus.trim("room", before=3)
            late = await bus.publish("room", "hello", key="client-1")
            assert not late.replay and late.id == 4
            info = await bus.stream_info("room")
            assert (info.first_id, info.head) == (3, 4)


async def test_a_sweep_never_trims_a_stream_created_again_since_it_looked():
    """The sweep found 'room' over the policy; before its trim, 'room' was deleted and
    a new conversation began: the new one keeps every message."""

    class RecreatedMeanwhile(MemoryStore):
        async def over_retention(self, *args, **kwargs):
            page = await super().over_retention(*args, **kwargs)
            if page.trims:
                await self.delete_stream("room")
                await self.append(
                    "room", [make_draft(i, None, max_body_bytes=100) for i in range(3)]
                )
            return page

    store = RecreatedMeanwhile()
    policy = chatbus.Retention(max_messages=2, interval=1)
    with trio.fail_after(10):
        async with chatbus.open_bus(store=store, retention=policy, poll_interval=None) as bus:
            for i in range(10):
                await bus.publish("room", i)
            while bus.statistics().retention_sweeps < 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
            assert [m.id for m in await bus.read("room")] == [1, 2, 3]


async def test_a_store_trim_for_another_epoch_changes_nothing(backend):
    """What keeps a sweep from trimming a stream created again since it looked."""
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            for i in range(5):
                await bus.publish("room", i)
            epoch = (await bus.stream_info("room")).epoch
            store = bus.store
            assert await store.trim("room", 4, epoch=epoch + 1) == 1
            assert (await bus.stream_info("room")).first_id == 1
            assert await store.trim("room", 4, epoch=epoch) == 4
            assert [m.id for m in await bus.read("room")] == [4, 5]


async def test_over_retention_pages_cover_every_stream(backend):
    """Page by page (bounded per call), a store's listing finds every stream over the
    policy, on a Cluster on every master, and none that is not."""
    names = [f"room-{i}" for i in range(24)]
    with trio.fail_after(30):
        async with backend.open_bus() as bus:
            for name in names:
                for i in range(3):
                    await bus.publish(name, i)
            await bus.publish("short", "only one")
            store = bus.store
            found: dict[str, tuple[int, int]] = {}
            after: str | None = ""
            pages = 0
            while after is not None:
                page = await store.over_retention(
                    after, 4, max_messages=2, max_age=None, keys_for=None
                )
                pages += 1
                assert pages < 10_000, "the listing never ends"
                for stream, before, epoch in page.trims:
                    found[stream] = (before, epoch)
                after = page.next_after
            assert sorted(found) == sorted(names)
            assert pages > 1
            for name in names:
                assert found[name] == (2, (await bus.stream_info(name)).epoch)
