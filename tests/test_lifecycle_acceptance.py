"""An acceptance pass over the stream lifecycle, through the public API only.

Written as an independent reviewer would check issue 12 on every backend: stale
cursors after a delete and recreate, trims under slow subscribers, redaction seen
live and by other processes, cursors ahead of the head. Each ``backend.open_bus()``
is another "process" over the same store.
"""

from __future__ import annotations

import pytest
import trio

import chatbus

from support import assert_quiet, collect, dense


async def publish_n(bus: chatbus.Bus, stream: str, n: int) -> list[chatbus.Message]:
    return [await bus.publish(stream, f"{stream}-{i}") for i in range(n)]


async def test_a_client_keeping_cursor_and_epoch_never_reads_another_history(backend):
    with trio.fail_after(20):
        async with backend.open_bus() as server, backend.open_bus() as client:
            await publish_n(server, "room", 5)
            async with client.open_subscriber("room") as sub:
                await collect(sub, 3)
                cursor, epoch = sub.cursor, sub.epoch
            assert (cursor, epoch) == (3, (await client.stream_info("room")).epoch)
            await server.delete_stream("room")
            await publish_n(server, "room", 4)  # a new conversation, ids from 1
            with pytest.raises(chatbus.HistoryReset) as reset:
                async with client.open_subscriber("room", after=cursor, epoch=epoch):
                    pytest.fail("resumed in another history")
            assert reset.value.epoch == (await client.stream_info("room")).epoch != epoch
            with pytest.raises(chatbus.HistoryReset):
                await client.read("room", after=cursor, epoch=epoch)
            # Without the epoch, only a cursor past the new head can be caught.
            with pytest.raises(chatbus.CursorAhead) as ahead:
                await client.read("room", after=4 + 1)
            assert ahead.value.head == 4
            # The current epoch reads fine.
            now = await client.stream_info("room")
            page = await client.read("room", after=1, epoch=now.epoch)
            assert [m.id for m in page] == [2, 3, 4]


async def test_a_subscription_from_the_start_opened_before_a_trim_is_told(backend):
    """after=0 means the start as it was at open: a trim before the first read is
    a gap for it, not a silent new start."""
    with trio.fail_after(20):
        async with (
            backend.open_bus(read_batch=2) as bus,
            backend.open_bus() as other,
        ):
            await publish_n(other, "room", 10)
            async with bus.open_subscriber("room") as sub:
                assert sub.cursor == 0
                await other.trim("room", before=6)
                got: list[int] = []
                with pytest.raises(chatbus.HistoryTruncated) as info:  # noqa: PT012
                    while True:
                        got.append((await sub.receive()).id)
                assert info.value.first_id == 6
                assert got == dense(len(got))  # maybe some, before the trim reached it


async def test_last_n_on_a_trimmed_stream_starts_at_what_is_retained(backend):
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            await publish_n(bus, "room", 10)
            await bus.trim("room", before=8)
            async with bus.open_subscriber("room", last=5) as sub:
                assert await collect(sub, 3) == [8, 9, 10]
                await bus.publish("room", "live")
                assert await collect(sub, 1) == [11]
            async with bus.open_subscriber("room", last=2) as sub:
                assert await collect(sub, 2) == [10, 11]
                await assert_quiet(sub, seconds=0.1)


async def test_a_trim_to_the_head_then_publish_continues_the_ids(backend):
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            await publish_n(bus, "room", 3)
            async with other.open_subscriber("room") as sub:
                assert await collect(sub, 3) == [1, 2, 3]
                assert await bus.trim("room", before=100) == 4  # everything
                await bus.publish("room", "after the trim")
                assert await collect(sub, 1) == [4]  # the cursor was at 3: no gap for it


async def test_redaction_reaches_other_processes_caches(backend):
    """A process that had the message cached must not serve its old body later."""
    with trio.fail_after(20):
        async with backend.open_bus() as writer, backend.open_bus() as reader:
            async with reader.open_subscriber("room", events=True) as live:
                await writer.publish("room", "hello")
                secret = await writer.publish("room", {"text": "my password"})
                await writer.publish("room", "bye")
                items = [await live.receive() for _ in range(3)]
                assert [m.id for m in items] == [1, 2, 3]  # reader's cache holds them
                await writer.redact("room", secret.id)
                event = await live.receive()
                assert isinstance(event, chatbus.Event)
                assert event.body == {"redacted": 2}
                # A new subscription on the reader, from the start, gets the tombstone.
                async with reader.open_subscriber("room") as late:
                    got = [await late.receive() for _ in range(3)]
                assert [(m.id, m.body, m.redacted) for m in got] == [
                    (1, "hello", False),
                    (2, None, True),
                    (3, "bye", False),
                ]
                assert (await reader.read("room", after=1, limit=1))[0].redacted


async def test_redacting_twice_and_redacting_trimmed_ids(backend):
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            await publish_n(bus, "room", 5)
            first = await bus.redact("room", 3)
            again = await bus.redact("room", 3)  # idempotent
            assert (first.id, first.body, again.body, again.redacted) == (3, None, None, True)
            await bus.trim("room", before=3)
            with pytest.raises(ValueError, match="no retained message 2"):
                await bus.redact("room", 2)
            with pytest.raises(ValueError, match="no retained message 6"):
                await bus.redact("room", 6)
            assert [m.id for m in await bus.read("room")] == [3, 4, 5]


async def test_cursor_ahead_is_named_everywhere(backend):
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            with pytest.raises(chatbus.CursorAhead, match="which is 0") as nothing:
                async with bus.open_subscriber("new-room", after=3):
                    pytest.fail("opened past the head of a stream that does not exist")
            assert nothing.value.head == 0
            await publish_n(bus, "room", 2)
            with pytest.raises(chatbus.CursorAhead, match="which is 2"):
                async with bus.open_subscriber("room", after=50):
                    pass
            with pytest.raises(chatbus.CursorAhead, match="which is 2"):
                await bus.read("room", after=3)
            assert await bus.read("room", after=2) == []  # at the head: fine
            async with bus.open_subscriber("room", after=2) as sub:
                await bus.publish("room", "next")
                assert await collect(sub, 1) == [3]


async def test_deleting_a_stream_nobody_made_and_trimming_it(backend):
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            await bus.delete_stream("ghost")
            assert await bus.trim("ghost", before=5) == 1
            assert not (await bus.stream_info("ghost")).exists
            assert (await bus.publish("ghost", "first")).id == 1


async def test_scroll_back_stops_at_the_first_retained_id(backend):
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            await publish_n(bus, "room", 12)
            await bus.trim("room", before=10)
            assert [m.id for m in await bus.read("room", before=12, limit=5)] == [10, 11]
            # Below the first retained id: trimmed, said so (never the messages above it).
            for before in (5, 10):
                with pytest.raises(chatbus.HistoryTruncated) as cut:
                    await bus.read("room", before=before, limit=3)
                assert cut.value.first_id == 10


async def test_a_trim_never_moves_the_first_id_back(backend):
    """What lets every process run retention at once: a late trim to a lower id (a
    sweep that computed its target earlier) changes nothing."""
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            await publish_n(bus, "room", 12)
            assert await bus.trim("room", before=10) == 10
            assert await other.trim("room", before=5) == 10
            info = await other.stream_info("room")
            assert (info.first_id, info.head) == (10, 12)
            with pytest.raises(chatbus.HistoryTruncated):
                await other.read("room", after=6)


async def test_a_subscription_to_a_stream_deleted_for_good_ends_with_stream_deleted(backend):
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            await publish_n(bus, "room", 3)
            async with other.open_subscriber("room") as sub:
                assert await collect(sub, 3) == [1, 2, 3]
                await bus.delete_stream("room")
                with pytest.raises(chatbus.StreamDeleted) as info:
                    await sub.receive()
                assert info.value.epoch == 0  # it does not exist any more


async def test_a_retry_of_a_redacted_message_stores_no_duplicate(backend):
    """It gets the tombstone as a replay (there is no body left to compare), rather
    than storing the redacted content again under a new id."""
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            secret = await bus.publish("room", {"text": "my password"}, key="k1")
            await bus.redact("room", secret.id)
            again = await bus.publish("room", {"text": "my password"}, key="k1")
            assert (again.id, again.body, again.replay, again.redacted) == (1, None, True, True)
            info = await bus.stream_info("room")
            assert info.head == 1
            assert [(m.id, m.body) for m in await bus.read("room")] == [(1, None)]


async def test_a_store_failing_at_open_from_the_start_is_retried_not_raised(autojump_clock):
    """Opening from the start has no cursor to check: a store error then is retried
    in the background (as every read is), the first retained id found afterwards."""

    class FailsOnce(chatbus.memory.MemoryStore):
        failures = 2

        async def stream_info(self, stream):
            if self.failures:
                self.failures -= 1
                raise chatbus.StoreError("stream info failed: the store is down")
            return await super().stream_info(stream)

    store = FailsOnce()
    async with chatbus.open_bus(store=store) as bus:
        for i in range(5):
            await bus.publish("room", i)
        await bus.trim("room", before=3)
        async with bus.open_subscriber("room") as sub:
            assert await collect(sub, 3) == [3, 4, 5]
            assert store.failures == 0
        store.failures = 1
        with pytest.raises(chatbus.StoreError):  # a cursor to check: raised
            async with bus.open_subscriber("room", after=3):
                pass


async def test_a_redaction_whose_event_was_lost_is_not_served_after_a_resync():
    """Events are at most once: when a notifier says some were lost (resync), what
    the bus cached may predate a redaction, so it reads the store again."""

    class LossyNotifier:
        """Loses every event; ``lost()`` then tells the listener, as a reconnect would."""

        def __init__(self, inner: chatbus.memory.MemoryNotifier) -> None:
            self.inner, self.handlers = inner, []

        async def notify(self, stream, last_id):
            await self.inner.notify(stream, last_id)

        async def listen(self, handler, *, task_status=trio.TASK_STATUS_IGNORED):
            self.handlers.append(handler)
            handler_without_events = type(
                "NoEvents",
                (),
                {"notice": handler.notice, "resync": handler.resync, "events": lambda _, e: None},
            )()
            await self.inner.listen(handler_without_events, task_status=task_status)

        def lost(self):
            for handler in self.handlers:
                handler.resync()

    store, shared = chatbus.memory.MemoryStore(), chatbus.memory.MemoryNotifier()
    lossy = LossyNotifier(shared)
    with trio.fail_after(10):
        async with (
            chatbus.open_bus(store=store, notifier=shared) as writer,
            chatbus.open_bus(store=store, notifier=lossy) as reader,
            reader.open_subscriber("room") as live,
        ):
            for body in ("hello", "my password", "bye"):
                await writer.publish("room", body)
            assert await collect(live, 3) == [1, 2, 3]  # the reader's cache has them
            await writer.redact("room", 2)
            lossy.lost()
            async with reader.open_subscriber("room") as late:
                got = [await late.receive() for _ in range(3)]
            assert [m.body for m in got] == ["hello", None, "bye"]


async def test_a_cursor_stored_before_the_first_message_resumes(backend):
    """(0, epoch 0) is what a client stores on a room nobody wrote to yet: it fits the
    history that starts later; a real cursor with epoch 0 does not."""
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            async with bus.open_subscriber("room") as sub:
                stored = (sub.cursor, sub.epoch)
            assert stored == (0, 0)
            await publish_n(bus, "room", 2)
            async with bus.open_subscriber("room", after=0, epoch=0) as sub:
                assert await collect(sub, 2) == [1, 2]
                assert sub.epoch == (await bus.stream_info("room")).epoch
            assert [m.id for m in await bus.read("room", after=0, epoch=0)] == [1, 2]
            with pytest.raises(chatbus.HistoryReset):
                await bus.read("room", after=1, epoch=0)
