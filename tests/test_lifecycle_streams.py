"""The stream lifecycle on every backend: delete, trim, redact, epochs, no silent skip.

Each ``backend.open_bus()`` is a separate "process" over the same store.
"""

from __future__ import annotations

import attrs
import pytest
import trio

import chatbus

from support import assert_quiet, collect, dense


async def test_stream_info_and_epochs(backend):
    async with backend.open_bus() as bus:
        missing = await bus.stream_info("room")
        assert (missing.exists, missing.head, missing.epoch) == (False, 0, 0)
        for i in range(3):
            await bus.publish("room", i)
        info = await bus.stream_info("room")
        assert (info.exists, info.head, info.first_id) == (True, 3, 1)
        assert info.epoch != 0
        await bus.delete_stream("room")
        assert (await bus.stream_info("room")).exists is False
        assert await bus.read("room") == []
        assert (await bus.publish("room", "again")).id == 1  # a new epoch at id 1
        again = await bus.stream_info("room")
        assert again.epoch not in (0, info.epoch)


async def test_stale_epoch_and_cursor_ahead_fail_at_open(backend):
    async with backend.open_bus() as bus:
        for i in range(5):
            await bus.publish("room", i)
        old = await bus.stream_info("room")
        await bus.delete_stream("room")
        await bus.publish("room", "new history")
        with pytest.raises(chatbus.HistoryReset) as info:
            async with bus.open_subscriber("room", after=1, epoch=old.epoch):
                pytest.fail("opened in another history")
        assert info.value.epoch == (await bus.stream_info("room")).epoch
        # The trap the issue found: a cursor past the head must not wait silently.
        with pytest.raises(
            chatbus.CursorAhead, match="head of stream 'room', which is 1"
        ) as ahead:
            async with bus.open_subscriber("room", after=50):
                pytest.fail("opened past the head")
        assert ahead.value.head == 1
        with pytest.raises(chatbus.CursorAhead):
            await bus.read("room", after=50)
        new = await bus.stream_info("room")
        async with bus.open_subscriber("room", after=0, epoch=new.epoch) as sub:
            assert await collect(sub, 1) == [1]
            assert sub.epoch == new.epoch


async def test_trim_never_lets_a_cursor_skip(backend):
    async with backend.open_bus() as bus:
        for i in range(1, 21):
            await bus.publish("room", i)
        assert await bus.trim("room", before=11) == 11
        assert [m.id for m in await bus.read("room")] == dense(20, 11)  # from the start
        assert [m.id for m in await bus.read("room", after=10)] == dense(20, 11)
        with pytest.raises(chatbus.HistoryTruncated) as info:
            await bus.read("room", after=5)
        assert info.value.first_id == 11
        with pytest.raises(chatbus.HistoryTruncated):
            async with bus.open_subscriber("room", after=5):
                pytest.fail("opened below the first retained id")
        async with bus.open_subscriber("room") as sub:
            assert await collect(sub, 10) == dense(20, 11)
        info2 = await bus.stream_info("room")
        assert (info2.first_id, info2.head) == (11, 20)
        assert await bus.trim("room", before=1000) == 21  # never past head + 1
        assert (await bus.publish("room", "next")).id == 21  # ids are not reused
        with pytest.raises(ValueError, match="before"):
            await bus.trim("room", before=0)


@pytest.mark.parametrize("before", [25, 31], ids=["some-kept", "all-trimmed"])
async def test_a_slow_subscriber_trimmed_under_is_told(backend, before):
    async with (
        backend.open_bus(read_batch=5) as bus,
        backend.open_bus() as other,
        bus.open_subscriber("room") as sub,
    ):
        for i in range(1, 31):
            await other.publish("room", i)
        assert await collect(sub, 3) == [1, 2, 3]
        # 31 = head + 1: nothing after the cursor is left, not even a later id to
        # show the gap (what time-based retention does to every idle room).
        assert await other.trim("room", before=before) == before
        with pytest.raises(chatbus.HistoryTruncated) as info:  # noqa: PT012
            with trio.fail_after(5):  # at once: no later publish needed to notice
                while True:
                    await sub.receive()
        assert info.value.first_id == before
        assert sub.cursor < before  # what it got before the gap, never past it silently


async def test_from_the_start_of_a_stream_trimmed_to_nothing(backend):
    """after=0 means "what is retained": nothing yet, so no error, and the next one."""
    async with backend.open_bus() as bus:
        for i in range(5):
            await bus.publish("room", i)
        assert await bus.trim("room", before=6) == 6
        async with bus.open_subscriber("room") as sub:
            await assert_quiet(sub)
            await bus.publish("room", "after the trim")
            assert await collect(sub, 1) == [6]


async def test_trimmed_keys_still_answer_a_retry(backend):
    async with backend.open_bus() as bus:
        first = await bus.publish("room", "hello", key="client-1")
        for i in range(5):
            await bus.publish("room", i)
        await bus.trim("room", before=4)
        again = await bus.publish("room", "hello", key="client-1")
        assert again.replay and again.id == first.id  # no duplicate of a message seen
        assert (await bus.stream_info("room")).head == 6


async def test_redaction_is_a_tombstone_seen_live(backend):
    async with (
        backend.open_bus() as bus,
        backend.open_bus() as other,
        other.open_subscriber("room", events=True) as sub,
    ):
        await bus.publish("room", "fine")
        secret = await bus.publish("room", {"text": "my password"}, key="k")
        await bus.publish("room", "fine too")
        got = []
        with trio.fail_after(10):
            while len(got) < 3:
                got.append(await sub.receive())
        tombstone = await bus.redact("room", secret.id)
        assert (tombstone.id, tombstone.key, tombstone.body) == (2, "k", None)
        assert tombstone.redacted and tombstone.created_at == secret.created_at
        with trio.fail_after(10):
            event = await sub.receive()
        assert isinstance(event, chatbus.Event) and event.body == {"redacted": 2}
        stored = await other.read("room")
        assert [(m.id, m.body, m.redacted) for m in stored] == [
            (1, "fine", False),
            (2, None, True),
            (3, "fine too", False),
        ]
        with pytest.raises(ValueError, match="no retained message 9"):
            await bus.redact("room", 9)


async def test_a_redaction_reaches_every_buss_cache(backend):
    """Also the cache of a bus that published the message, which serves the
    subscriptions opened there later."""
    async with backend.open_bus() as bus, backend.open_bus() as other:
        async with bus.open_publisher("room") as pub:
            for i in range(1, 6):
                await pub.publish({"text": "my password"} if i == 3 else i)
            await other.redact("room", 3)
            with trio.fail_after(10):
                while True:  # the notice travels (Postgres: NOTIFY)
                    async with bus.open_subscriber("room", after=2) as sub:
                        message = await sub.receive()
                    if message.redacted:
                        break
                    await trio.sleep(0.05)
            assert (message.id, message.body) == (3, None)


async def test_a_keyed_retry_of_a_redacted_message_replays_its_tombstone(backend):
    async with backend.open_bus() as bus:
        first = await bus.publish("room", {"text": "my password"}, key="client-1")
        await bus.redact("room", first.id)
        again = await bus.publish("room", {"text": "my password"}, key="client-1")
        assert (again.id, again.body, again.replay, again.redacted) == (first.id, None, True, True)
        # The body is gone: nothing left to compare, so another body is no conflict either.
        other = await bus.publish("room", "something else", key="client-1")
        assert (other.id, other.replay, other.redacted) == (first.id, True, True)
        assert (await bus.stream_info("room")).head == 1


async def test_scrolling_back_on_a_trimmed_stream(backend):
    async with backend.open_bus() as bus:
        for i in range(1, 21):
            await bus.publish("room", i)
        await bus.trim("room", before=15)
        assert [m.id for m in await bus.read("room", before=18, limit=5)] == [15, 16, 17]
        assert [m.id for m in await bus.read("room", before=16, limit=5)] == [15]
        assert [m.id for m in await bus.read("room", before=16, limit=50)] == [15]
        assert [m.id for m in await bus.read("room", before=21, limit=2)] == [19, 20]
        for before in (5, 15):
            with pytest.raises(chatbus.HistoryTruncated, match="first retained one is 15") as cut:
                await bus.read("room", before=before, limit=5)
            assert cut.value.first_id == 15
        with pytest.raises(chatbus.CursorAhead, match="before=100 is past") as ahead:
            await bus.read("room", before=100)
        assert ahead.value.head == 20


async def test_events_emitted_just_before_a_delete_go_with_it(backend):
    async with backend.open_bus() as bus, backend.open_bus() as other:
        for attempt in range(3):
            room = f"room-{attempt}"
            await bus.publish(room, "old conversation")
            await bus.emit(room, "thinking about the old one", key="status")
            await bus.emit(room, "a part of an old reply")
            await bus.delete_stream(room)
            await bus.publish(room, "new conversation")
            for joiner in (bus, other):
                async with joiner.open_subscriber(room, events=True) as sub:
                    with trio.fail_after(10):
                        first = await sub.receive()
                    assert isinstance(first, chatbus.Message)
                    assert first.body == "new conversation"
                    with trio.move_on_after(0.2):
                        item = await sub.receive()
                        pytest.fail(f"a joiner of the new conversation got {item!r}")


async def test_a_live_subscription_ends_when_its_stream_is_deleted(backend):
    async with (
        backend.open_bus() as bus,
        backend.open_bus() as other,
        other.open_subscriber("room") as sub,
    ):
        for i in range(3):
            await bus.publish("room", i)
        assert await collect(sub, 3) == [1, 2, 3]
        await bus.delete_stream("room")
        await bus.publish("room", "a new conversation")
        with pytest.raises(chatbus.StreamDeleted), trio.fail_after(10):
            await sub.receive()


async def test_delete_racing_publishers_leaves_streams_consistent(backend):
    async with backend.open_bus() as bus, backend.open_bus() as other:
        acked: list[chatbus.Message] = []

        async def publish_many(b: chatbus.Bus, tag: str) -> None:
            for i in range(60):
                acked.append(await b.publish("race", f"{tag}{i}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_many, bus, "a")
            nursery.start_soon(publish_many, other, "b")
            await trio.sleep(0.02)
            await bus.delete_stream("race")
            await trio.sleep(0.02)
            await other.trim("race", before=3)
        info = await bus.stream_info("race")
        stored = await bus.read("race", limit=1000)
        assert [m.id for m in stored] == dense(info.head, info.first_id)
        async with bus.open_subscriber("race") as sub:
            assert await collect(sub, len(stored)) == [m.id for m in stored]
            await assert_quiet(sub)


# ---- the store tells every bus; epochs the store itself moves ----------------------

#: The backends whose store (not the bus) carries a redaction to other processes.
_TELLING_STORES = pytest.mark.parametrize(
    "backend_name",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ],
    indirect=True,
)
_REDIS = pytest.mark.parametrize(
    "backend_name",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ],
    indirect=True,
)


@_TELLING_STORES
async def test_a_store_redaction_reaches_other_buses_caches_without_its_event(backend):
    """The store's own notice (Postgres: NOTIFY in the redact statement; Redis: SPUBLISH
    from the redact script) clears every bus's cache, even with the redaction event
    lost: here the store redacts directly, so no bus emits one."""
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            async with bus.open_subscriber("room") as live:
                for i in range(1, 6):
                    await bus.publish("room", {"text": "my password"} if i == 3 else i)
                assert await collect(live, 5) == [1, 2, 3, 4, 5]  # bus's cache holds them
                assert await other.store.redact("room", 3) is not None
                while True:
                    async with bus.open_subscriber("room", after=2) as sub:
                        message = await sub.receive()
                    if message.redacted:
                        break
                    await trio.sleep(0.05)
            assert (message.id, message.body) == (3, None)


@_REDIS
async def test_a_fast_mode_reset_is_a_history_reset_not_a_delete(backend):
    """A stream found on another server process (restart, failover: the recorded
    run_id differs) starts a new epoch in fast mode; subscribers learn it as a
    HistoryReset saying so, never as StreamDeleted; a real delete still is one."""
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            for i in range(3):
                await bus.publish("room", i)
            old = await bus.stream_info("room")
            assert not old.reset_by_store
            async with bus.open_subscriber("room", after=3, epoch=old.epoch) as sub:
                store = bus.store
                # What a restart looks like to the append script.
                await store.client.hset(store.keys("room").meta, {"run": "another-process"})
                await bus.publish("room", "after the restart")
                with pytest.raises(chatbus.HistoryReset) as reset:
                    await sub.receive()
            assert not isinstance(reset.value, chatbus.StreamDeleted)
            assert "another server process" in str(reset.value)
            now = await bus.stream_info("room")
            assert now.reset_by_store and now.epoch not in (0, old.epoch)
            with pytest.raises(chatbus.HistoryReset, match="another server process") as stale:
                async with bus.open_subscriber("room", after=3, epoch=old.epoch):
                    pass
            assert not isinstance(stale.value, chatbus.StreamDeleted)
            # A delete after it is a delete again.
            async with bus.open_subscriber("room", after=4, epoch=now.epoch) as sub:
                await bus.delete_stream("room")
                with pytest.raises(chatbus.StreamDeleted):
                    await sub.receive()
            await bus.publish("room", "new conversation")
            assert not (await bus.stream_info("room")).reset_by_store


@_REDIS
async def test_a_read_of_a_new_epoch_is_a_history_reset_before_its_notice(backend, monkeypatch):
    """A read that meets the new epoch of a restart or failover before the notice of
    it arrives (another connection) never hands its page on as the rest of the old
    history: the subscription ends with HistoryReset. Here the reset notices are
    lost, so the read is the only way to learn it."""
    from chatbus import _listener

    parse_reset = _listener.parse_reset
    monkeypatch.setattr(
        _listener,
        "parse_reset",
        lambda payload: None if b'"reset"' in payload else parse_reset(payload),
    )
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            for i in range(3):
                await bus.publish("room", i)
            old = await bus.stream_info("room")
            async with bus.open_subscriber("room", after=3, epoch=old.epoch) as sub:
                store = other.store
                await store.client.hset(store.keys("room").meta, {"run": "another-process"})
                await other.publish("room", "after the restart")  # its notice wakes sub
                with pytest.raises(chatbus.HistoryReset, match="another server process"):
                    await sub.receive()


@_TELLING_STORES
async def test_a_subscription_opened_before_its_stream_follows_the_history_it_read(
    backend, monkeypatch
):
    """Opened on a stream that does not exist yet (epoch 0), a subscription takes
    the epoch of the first page it reads with that page, not from a later look: a
    delete and a new history in between end it with StreamDeleted instead of going
    on with the new history's ids after the old one's (found by a review: a later
    look adopted the new epoch). Here every later look waits until the new history
    is there."""
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            async with bus.open_subscriber("room") as sub:
                assert sub.epoch == 0
                gate = trio.Event()
                stream_info = type(bus.store).stream_info

                async def later_look(store, stream):
                    await gate.wait()
                    return await stream_info(store, stream)

                monkeypatch.setattr(type(bus.store), "stream_info", later_look)
                await other.publish("room", "old history")
                with trio.fail_after(5):
                    first = await sub.receive()
                assert (first.id, first.body) == (1, "old history")
                await other.delete_stream("room")
                for i in range(3):
                    await other.publish("room", f"new history {i}")
                gate.set()
                with pytest.raises(chatbus.StreamDeleted):
                    await sub.receive()


@_REDIS
async def test_a_fast_append_after_durable_ones_keeps_the_epoch(backend):
    """Durable appends record no run_id (what was visible is on a replica, so also on
    a promoted replica or a slot migration's target): a fast append on such a stream,
    on whichever server holds it, takes it over without a reset."""
    with trio.fail_after(20):
        async with backend.open_bus() as bus:
            for i in range(3):
                await bus.publish("room", i)
            old = await bus.stream_info("room")
            store = bus.store
            await store.client.hset(store.keys("room").meta, {"run": "durable"})
            async with bus.open_subscriber("room", after=3, epoch=old.epoch) as sub:
                await bus.publish("room", "fast again")
                assert await collect(sub, 1) == [4]
                await bus.publish("room", "and again")  # the run is recorded now
                assert await collect(sub, 1) == [5]
            assert (await bus.stream_info("room")).epoch == old.epoch


async def test_an_epoch_the_store_moved_is_a_history_reset_on_memory():
    """The subscription's wording, on any store: an epoch moved by the store itself
    (``reset_by_store``) is a HistoryReset naming it; one moved by a delete is
    StreamDeleted."""
    from chatbus.memory import MemoryNotifier, MemoryStore

    class Restarted(MemoryStore):
        moved = False

        async def stream_info(self, stream):
            info = await super().stream_info(stream)
            if self.moved:
                return attrs.evolve(info, epoch=info.epoch + 1, reset_by_store=True)
            return info

    store, notifier = Restarted(), MemoryNotifier()
    with trio.fail_after(10):
        async with chatbus.open_bus(store=store, notifier=notifier) as bus:
            await bus.publish("room", 1)
            async with bus.open_subscriber("room", after=1) as sub:
                store.moved = True
                await notifier.notify_reset("room")  # what a store's reset notice does
                with pytest.raises(chatbus.HistoryReset, match="another server process") as got:
                    await sub.receive()
            assert not isinstance(got.value, chatbus.StreamDeleted)
            store.moved = False
            async with bus.open_subscriber("room", after=1) as sub:
                await bus.delete_stream("room")
                with pytest.raises(chatbus.StreamDeleted, match="was deleted"):
                    await sub.receive()


async def test_a_resync_while_a_run_is_gathered_skips_nothing():
    """A run read across a resync is checked before delivery (the epoch may have
    moved), then gathered again from the same cursor: never lost."""
    from chatbus.memory import MemoryNotifier, MemoryStore

    class Capturing(MemoryNotifier):
        handlers: list = []  # noqa: RUF012 - one test's

        async def listen(self, handler, *, task_status=trio.TASK_STATUS_IGNORED):
            self.handlers.append(handler)
            await super().listen(handler, task_status=task_status)

    class ResyncingReads(MemoryStore):
        resyncs = 0

        async def read(self, stream, after, limit):
            page = await super().read(stream, after, limit)
            if page and self.resyncs < 5:
                self.resyncs += 1
                for handler in notifier.handlers:
                    handler.resync()  # as a listener reconnect would, mid-read
            return page

    store, notifier = ResyncingReads(), Capturing()
    with trio.fail_after(10):
        async with (
            chatbus.open_bus(store=store, notifier=notifier, read_batch=3) as bus,
            chatbus.open_bus(store=store, notifier=notifier) as writer,
            bus.open_subscriber("room") as sub,
        ):
            for i in range(1, 13):
                await writer.publish("room", i)
            assert await collect(sub, 12) == dense(12)
            assert store.resyncs == 5


def _hear_notices_while(monkeypatch, *, resets: bool) -> list[bool]:
    """Make the Postgres and Redis listeners drop message notices (committed or plain)
    while the returned flag's ``[0]`` is False, and reset (delete) notices then too
    (``resets``) or always."""
    from chatbus import _listener
    from chatbus.redis import _session

    heard = [True]
    readers = [(_listener, "parse_committed_notice"), (_listener, "parse_notice")]
    readers += [(_session, "quick_notice"), (_session, "parse_notice")]
    if resets:
        readers.append((_listener, "parse_reset"))
    else:
        monkeypatch.setattr(_listener, "parse_reset", lambda payload: None)
    for module, name in readers:
        parse = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda payload, parse=parse: parse(payload) if heard[0] else None
        )
    return heard


@_TELLING_STORES
async def test_the_hearing_switch_drops_every_message_notice(backend, monkeypatch):
    """The tests below rely on _hear_notices_while really losing notices, committed
    (carrying their messages) or plain: not one reaches the bus while it is off."""
    heard = _hear_notices_while(monkeypatch, resets=True)
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            async with bus.open_subscriber("room") as sub:
                await other.publish("room", "heard")
                assert (await sub.receive()).body == "heard"
                heard[0] = False
                before = bus.statistics().notices
                for i in range(5):
                    await other.publish("room", [i] * i)  # one-stream batches, small
                await trio.sleep(0.3)
                assert bus.statistics().notices == before


async def _ends_deleted_with_nothing_more(subscription) -> None:
    got: list[chatbus.Message] = []

    async def drain() -> None:
        async for message in subscription:
            got.append(message)

    with pytest.raises(chatbus.StreamDeleted):
        await drain()
    assert got == []


@_TELLING_STORES
async def test_a_page_of_a_new_epoch_never_reaches_another_subscription_through_the_cache(
    backend, monkeypatch
):
    """Two subscriptions of one stream in one bus share its cache. One opened before
    the stream existed (epoch 0) reads, after a delete, the first page of the new
    history, and adopts it; the other follows the old history. The page must not
    reach the other through the cache as the rest of the old history: it ends with
    StreamDeleted. Here the delete notices are lost and the other subscription is
    woken only by a later message's notice, so it finds the page in the cache before
    any read of its own (before the fix it delivered ids 2 and 3 of the new history
    after id 1 of the old)."""
    heard = _hear_notices_while(monkeypatch, resets=False)
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            gate, reading = trio.Event(), trio.Event()
            read_with_epoch = type(bus.store).read_with_epoch

            async def held_first_read(store, stream, after, limit):
                if store is bus.store and after == 0 and not gate.is_set():
                    reading.set()
                    await gate.wait()
                return await read_with_epoch(store, stream, after, limit)

            monkeypatch.setattr(type(bus.store), "read_with_epoch", held_first_read)
            async with bus.open_subscriber("room") as newcomer:
                assert newcomer.epoch == 0
                await other.publish("room", "old history")
                old = await other.stream_info("room")
                with trio.fail_after(5):
                    await reading.wait()  # the newcomer's read of the old history, held
                async with bus.open_subscriber("room", after=1, epoch=old.epoch) as follower:
                    heard[0] = False
                    await other.delete_stream("room")
                    for i in range(3):
                        await other.publish("room", f"new history {i}")
                    gate.set()  # the held read now meets the new history
                    first = await newcomer.receive()
                    assert (first.id, first.body) == (1, "new history 0")
                    assert newcomer.epoch not in (0, old.epoch)
                    heard[0] = True
                    await other.publish("room", "new history 3")  # wakes the follower
                    # Not ids 2 and 3 of the new history:
                    await _ends_deleted_with_nothing_more(follower)


@_TELLING_STORES
async def test_a_local_publish_into_a_new_history_never_reaches_the_old_ones_subscription(
    backend, monkeypatch
):
    """Another process deleted the stream and began a new history with as many
    messages as the old one had; its notices are late. This bus then publishes: its
    message (the next id, in the new history) must not reach a subscription of the
    old history through the bus's cache as the old one's next message: the store
    says which epoch the append wrote to, and the subscription ends with
    StreamDeleted (found in review: it delivered the message, then ended)."""
    heard = _hear_notices_while(monkeypatch, resets=True)
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            for i in range(5):
                await other.publish("room", f"old history {i}")
            old = await other.stream_info("room")
            async with bus.open_subscriber("room", after=0, epoch=old.epoch) as follower:
                assert [m.id for m in [await follower.receive() for _ in range(5)]] == [
                    1, 2, 3, 4, 5
                ]  # fmt: skip
                heard[0] = False  # the notices of what follows are late
                await other.delete_stream("room")
                for i in range(5):
                    await other.publish("room", f"new history {i}")
                mine = await bus.publish("room", "mine")
                assert mine.id == 6  # in the new history
                await _ends_deleted_with_nothing_more(follower)  # not id 6


@_TELLING_STORES
async def test_a_cache_kept_by_a_publisher_alone_is_not_trusted_by_the_next_subscription(
    backend, monkeypatch
):
    """A subscription opened and closed while the stream did not exist (epoch 0); then
    this bus published with no subscription open (its cache kept the messages, and
    its notices may stop: Redis unwatches the channel), and another process deleted
    the stream and began a new history, its delete notice late. The next
    subscription must get the new history, not the cache's old messages as its own
    (found by a review: the cache, taken for "of the history created since" epoch 0,
    served the deleted messages)."""
    heard = _hear_notices_while(monkeypatch, resets=True)
    with trio.fail_after(20):
        async with backend.open_bus() as bus, backend.open_bus() as other:
            async with bus.open_publisher("room") as pub:  # keeps the stream's topic
                async with bus.open_subscriber("room") as sub:
                    assert sub.epoch == 0
                for i in range(3):
                    await pub.publish({"old": i})
                heard[0] = False
                await other.delete_stream("room")
                for i in range(3):
                    await other.publish("room", {"new": i})
                async with bus.open_subscriber("room", after=0) as sub:
                    got = [(await sub.receive()).body for _ in range(3)]
                assert got == [{"new": 0}, {"new": 1}, {"new": 2}]
