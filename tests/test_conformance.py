"""The guarantees of DESIGN.md §2, run against every backend."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.lowlevel

import chatbus

from support import assert_quiet, collect, dense, items


async def test_history_then_live(backend):
    async with backend.open_bus() as bus:
        for i in range(1, 6):
            assert (await bus.publish("room", {"n": i})).id == i
        async with bus.open_subscriber("room", after=0) as sub:
            assert await collect(sub, 5) == dense(5)
            async with bus.open_publisher("room") as pub:
                for i in range(6, 11):
                    await pub.publish({"n": i})
            assert await collect(sub, 5) == dense(10, 6)
            await assert_quiet(sub)


async def test_cursor_resumes_after(backend):
    async with backend.open_bus() as bus:
        for i in range(10):
            await bus.publish("room", i)
        async with bus.open_subscriber("room", after=7) as sub:
            got = await sub.receive()
            assert (got.id, got.body) == (8, 7)
            assert await collect(sub, 2) == [9, 10]
            assert sub.cursor == 10
        async with bus.open_subscriber("room", after=10) as sub:
            await bus.publish("room", "later")
            assert await collect(sub, 1) == [11]


async def test_message_fields(backend):
    async with backend.open_bus() as bus:
        body = {"role": "user", "text": "héllo ☃", "n": [1, 2.5, None, True]}
        msg = await bus.publish("room", body, key="client-1")
        assert isinstance(msg, chatbus.Message)
        assert (msg.stream, msg.id, msg.body, msg.key) == ("room", 1, body, "client-1")
        assert msg.created_at.utcoffset().total_seconds() == 0
        [read] = await bus.read("room")
        assert read == msg
        async with bus.open_subscriber("room") as sub:
            assert await sub.receive() == msg


async def test_streams_are_independent(backend):
    async with backend.open_bus() as bus:
        await bus.publish("a", 1)
        await bus.publish("b", 1)
        await bus.publish("a", 2)
        assert [m.id for m in await bus.read("a")] == [1, 2]
        assert [m.id for m in await bus.read("b")] == [1]


async def test_read_pages_history(backend):
    async with backend.open_bus() as bus, bus.open_publisher("room") as pub:
        for i in range(25):
            await pub.publish(i)
        pages, after = [], 0
        while page := await bus.read("room", after=after, limit=10):
            pages.append([m.id for m in page])
            after = page[-1].id
        assert pages == [dense(10), dense(20, 11), dense(25, 21)]
        assert await bus.read("nothing-here") == []


async def test_idempotency_key_returns_original(backend):
    async with backend.open_bus() as bus, bus.open_publisher("room") as pub:
        first = await pub.publish({"text": "hi"}, key="k1")
        assert not first.replay
        again = await pub.publish({"text": "hi"}, key="k1")
        via_bus = await bus.publish("room", {"text": "hi"}, key="k1")
        assert first == again == via_bus
        assert again.replay and via_bus.replay  # a replay is told apart from a first commit
        other = await pub.publish("x", key="k2")
        assert other.id == 2
        assert [m.body for m in await bus.read("room")] == [{"text": "hi"}, "x"]
        assert not any(m.replay for m in await bus.read("room"))
        # Keys are per stream.
        assert (await bus.publish("elsewhere", "y", key="k1")).id == 1


async def test_key_reused_with_another_body_is_a_conflict(backend):
    async with backend.open_bus() as bus, bus.open_publisher("room") as pub:
        first = await pub.publish({"text": "hi"}, key="k1")
        with pytest.raises(chatbus.IdempotencyConflict, match="'k1'") as info:
            await pub.publish({"text": "hi (edited)"}, key="k1")
        assert info.value.original == first
        with pytest.raises(chatbus.IdempotencyConflict):
            await bus.publish("room", "other", key="k1")
        assert isinstance(info.value, ValueError)
        # Equal in Python is not the same JSON: true is not 1, 1.0 is not 1.
        flag = await pub.publish({"flag": 1}, key="flag")
        for other in ({"flag": True}, {"flag": 1.0}):
            with pytest.raises(chatbus.IdempotencyConflict) as info:
                await pub.publish(other, key="flag")
            assert info.value.original.body == {"flag": 1}
            assert info.value.original.id == flag.id
        # In one batch too: the first use wins, the conflicting one fails alone.
        async with trio.open_nursery() as nursery:
            outcomes: dict[str, object] = {}

            async def send(body: str) -> None:
                try:
                    outcomes[body] = await pub.publish(body, key="k2")
                except chatbus.IdempotencyConflict as exc:
                    outcomes[body] = exc

            for body in ("a", "b", "a"):
                nursery.start_soon(send, body)
        stored = [m.body for m in await bus.read("room")]
        assert stored[0] == {"text": "hi"} and stored[2] in ("a", "b") and len(stored) == 3
        loser = "b" if stored[2] == "a" else "a"
        assert isinstance(outcomes[loser], chatbus.IdempotencyConflict)
        assert isinstance(outcomes[stored[2]], chatbus.Message)


async def test_concurrent_same_key_commits_once(backend):
    async with backend.open_bus() as bus, bus.open_publisher("room") as pub:
        results = []

        async def send(i: int) -> None:
            results.append(await pub.publish({"try": "same"}, key="same"))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(send, i)
        assert len({m.id for m in results}) == 1
        assert sum(not m.replay for m in results) == 1
        assert len(await bus.read("room")) == 1


async def test_subscribers_never_receive_replays(backend):
    """A replayed or conflicting publish is told as such to its caller only: what
    subscriptions receive (live, from the bus's cache, or opened later) is the stored
    message, ``replay=False``, with its stored body."""
    async with backend.open_bus() as bus, bus.open_publisher("room") as pub:
        async with bus.open_subscriber("room") as live:
            for i in range(5):
                await pub.publish({"n": i}, key=f"k{i}")
            assert (await pub.publish({"n": 3}, key="k3")).replay
            with pytest.raises(chatbus.IdempotencyConflict):
                await pub.publish({"n": "other"}, key="k4")
            async with trio.open_nursery() as nursery:  # repeated within one batch
                for _ in range(3):
                    nursery.start_soon(functools.partial(pub.publish, {"n": 5}, key="k5"))
            await pub.publish({"n": 6}, key="k6")
            got = [await live.receive() for _ in range(7)]
            await assert_quiet(live)
        async with bus.open_subscriber("room", after=0) as later:
            again = [await later.receive() for _ in range(7)]
        for messages in (got, again):
            assert [(m.id, m.body, m.replay) for m in messages] == [
                (i + 1, {"n": i}, False) for i in range(7)
            ]


async def test_racing_publishers_and_subscribers_before_during_after(backend):
    """Two publishers race on one stream; subscribers opened at any time see 1..n."""
    n_each, total = 150, 300
    async with backend.open_bus() as bus:
        seen: dict[str, list[int]] = {}

        async def subscribe(name: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with bus.open_subscriber("race", after=0) as sub:
                task_status.started()
                seen[name] = await collect(sub, total, seconds=30)
                await assert_quiet(sub, seconds=0.2)

        async def publish(tag: str) -> None:
            async with bus.open_publisher("race") as pub:
                for i in range(n_each):
                    await pub.publish({"from": tag, "i": i})
                    if i % 7 == 0:
                        await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            await nursery.start(subscribe, "before")
            nursery.start_soon(publish, "a")
            nursery.start_soon(publish, "b")
            await trio.lowlevel.checkpoint()
            await nursery.start(subscribe, "during")
        async with bus.open_subscriber("race", after=0) as sub:
            seen["after"] = await collect(sub, total)
            await assert_quiet(sub, seconds=0.2)
        for name, ids in seen.items():
            assert ids == dense(total), name
        bodies = [m.body for m in await bus.read("race", limit=1000)]
        for tag in "ab":
            assert [b["i"] for b in bodies if b["from"] == tag] == list(range(n_each))


async def test_other_process_publishes_are_delivered(backend):
    """A bus sees what another bus (process) on the same store publishes."""
    async with backend.open_bus() as local, backend.open_bus() as remote:
        async with local.open_subscriber("room") as sub:
            for i in range(5):
                await remote.publish("room", i)
            assert await collect(sub, 5) == dense(5)
            await local.publish("room", "mine")
            await remote.publish("room", "theirs")
            assert await collect(sub, 2) == [6, 7]
            await assert_quiet(sub)


async def test_a_subscription_reopened_at_once_hears_its_stream(backend):
    """Closing a stream's last subscription and opening one again at once (a client
    reconnecting) keeps the stream's notices and events coming, with no poll."""
    async with (
        backend.open_bus(poll_interval=None) as local,
        backend.open_bus() as remote,
        remote.open_publisher("room") as pub,
    ):
        for round in range(3):
            async with local.open_subscriber("room", after=round):
                pass
            async with local.open_subscriber("room", after=round, events=True) as sub:
                await pub.emit(f"part {round}")
                await pub.publish(round)
                assert await items(sub, 2, seconds=5) == [f"part {round}", round + 1]


async def test_many_streams_many_subscribers(backend):
    async with backend.open_bus() as bus:
        streams = [f"room-{i}" for i in range(10)]
        async with trio.open_nursery() as nursery:
            for stream in streams:

                async def follow(stream: str = stream) -> None:
                    async with bus.open_subscriber(stream) as sub:
                        assert await collect(sub, 20) == dense(20)

                nursery.start_soon(follow)
            await trio.sleep(0.05)
            for i in range(20):
                for stream in streams:
                    await bus.publish(stream, i)


async def test_body_exception_passes_through_unwrapped(backend):
    with pytest.raises(KeyError):
        async with backend.open_bus() as bus, bus.open_subscriber("s"):
            raise KeyError("mine")
    with pytest.raises(KeyError):
        async with backend.open_bus() as bus, bus.open_publisher("s"):
            raise KeyError("mine")


async def test_body_exception_group_passes_through_unchanged(backend):
    error = ExceptionGroup("from the body", [KeyError("mine")])
    with pytest.raises(ExceptionGroup) as info:
        async with backend.open_bus() as bus, bus.open_subscriber("s"), bus.open_publisher("s"):
            raise error
    assert info.value is error
    if backend.url is not None:  # and through open_bus(url), which opens the backend
        with pytest.raises(ExceptionGroup) as info:
            async with chatbus.open_bus(backend.url) as bus, bus.open_subscriber("s"):
                raise error
        assert info.value is error


async def test_open_at_the_tail_and_page_back(backend):
    async with backend.open_bus() as bus:
        for i in range(1, 121):
            await bus.publish("room", i)
        async with bus.open_subscriber("room", last=50) as sub:
            assert await collect(sub, 50) == dense(120, 71)
            await bus.publish("room", 121)
            assert await collect(sub, 1) == [121]
            await assert_quiet(sub)
        async with bus.open_subscriber("room", last=0) as sub:
            await bus.publish("room", 122)
            assert await collect(sub, 1) == [122]
        async with bus.open_subscriber("room", last=1000) as sub:
            assert await collect(sub, 122) == dense(122)
        async with bus.open_subscriber("empty", last=10) as sub:
            await bus.publish("empty", "first")
            assert await collect(sub, 1) == [1]
        # Scroll back from the oldest shown (71): the 50 below it, in order, no overlap.
        older = await bus.read("room", before=71, limit=50)
        assert [m.id for m in older] == dense(70, 21)
        assert [m.id for m in await bus.read("room", before=21, limit=50)] == dense(20)
        assert await bus.read("room", before=1) == []
        with pytest.raises(ValueError, match="not both"):
            await bus.read("room", after=3, before=5)
        with pytest.raises(ValueError, match="not both"):
            bus.open_subscriber("room", after=3, last=5)
        with pytest.raises(ValueError, match="last"):
            bus.open_subscriber("room", last=-1)
        with pytest.raises(ValueError, match="before"):
            await bus.read("room", before=0)
