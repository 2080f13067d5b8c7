"""chatbus.sse's shared fan-out (``_sse_hub``): caught-up streams of a room share one
subscription and one ring of encoded frames; nothing about what a client sees changes."""

from __future__ import annotations

import collections
import contextlib
import gc
import random
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from test_sse import mid, parse

import chatbus
import chatbus._flush_clock
import chatbus._sse_hub
import chatbus.sse
from chatbus.sse import Cursor


def on_hub(gen) -> bool:
    """The stream follows the room's hub now (not a subscription of its own)."""
    frame = gen.ag_frame
    return frame is not None and bool(frame.f_locals.get("switch"))


async def follow(gen, until: int, frames: list[dict[str, object]]) -> None:
    """Pull frames into ``frames`` until message ``until`` came."""
    async for chunk in gen:
        frames.extend(parse(chunk))
        if any(f.get("event") == "message" and int(mid(f)) >= until for f in frames[-64:]):
            return


def message_ids(frames: list[dict[str, object]]) -> list[int]:
    return [int(mid(f)) for f in frames if f.get("event") == "message"]


async def test_streams_switch_to_the_hub_at_an_exact_id_under_concurrent_publishing():
    """Clients join at many points (history, tail, live) while messages keep coming;
    each switches to the hub once caught up, and sees every id after its start once,
    in order: the switch neither loses nor doubles the message at its boundary."""
    total = 1500
    rng = random.Random(7)
    async with chatbus.open_bus() as bus:
        for i in range(1, 101):
            await bus.publish("room", i)
        results: dict[int, tuple[list[int], int]] = {}
        switched: set[int] = set()

        async def client(index: int, cursor: Cursor) -> None:
            gen = chatbus.sse.sse_bytes(bus, "room", cursor, events=False, flush=0.001)
            frames: list[dict[str, object]] = []
            start = int(mid(parse((await gen.__anext__()).decode())[0]))
            with trio.fail_after(30):
                async for chunk in gen:
                    frames.extend(parse(chunk.decode()))
                    if on_hub(gen):
                        switched.add(index)
                    if message_ids(frames[-64:]) and message_ids(frames[-64:])[-1] >= total:
                        break
            await gen.aclose()
            results[index] = (message_ids(frames), start)

        async with trio.open_nursery() as nursery:

            async def publish() -> None:
                async with bus.open_publisher("room") as pub:
                    for i in range(101, total + 1):
                        await pub.publish(i)
                        if i % 7 == 0:
                            await trio.sleep(0.0005)

            nursery.start_soon(publish)
            for index in range(40):
                choice = rng.choice(["after", "last", "live"])
                cursor = {
                    "after": Cursor(after=rng.randrange(0, 100)),
                    "last": Cursor(last=rng.randrange(0, 30)),
                    "live": Cursor(last=0),
                }[choice]
                nursery.start_soon(client, index, cursor)
                await trio.sleep(rng.random() * 0.02)
        for ids, start in results.values():
            assert ids == list(range(start + 1, total + 1))
        assert len(switched) >= 30  # (most switched; the test is about those)
        assert bus.statistics().subscribers == 0


async def test_a_slow_client_falls_behind_the_ring_and_resumes_exactly(monkeypatch):
    """A client that stops reading while the ring moves past it goes back to a
    subscription of its own at its cursor (as any slow subscriber: bounded, nothing
    lost) and then joins the hub again."""
    monkeypatch.setattr(chatbus._sse_hub, "RING_SIZE", 64)
    async with chatbus.open_bus() as bus:
        fast = chatbus.sse.sse_stream(bus, "room", Cursor(last=0), events=False, flush=0)
        slow = chatbus.sse.sse_stream(bus, "room", Cursor(last=0), events=False, flush=0)
        await fast.__anext__()
        await slow.__anext__()
        await bus.publish("room", 1)
        got_fast: list[dict[str, object]] = []
        got_slow: list[dict[str, object]] = []
        with trio.fail_after(10):
            await follow(fast, 1, got_fast)
            await follow(slow, 1, got_slow)
            while not (on_hub(fast) and on_hub(slow)):
                await bus.publish("room", "more")
                await follow(fast, len(message_ids(got_fast)) + 1, got_fast)
                await follow(slow, len(message_ids(got_slow)) + 1, got_slow)
        head = len(message_ids(got_slow))
        hub = slow.ag_frame.f_locals["hub"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, fast, head + 500, got_fast)
            async with bus.open_publisher("room") as pub:
                for i in range(500):
                    await pub.publish(i)
        assert hub.base > head  # the ring moved past the slow client's place
        with trio.fail_after(10):
            await follow(slow, head + 500, got_slow)
        assert message_ids(got_slow) == list(range(1, head + 501))
        assert message_ids(got_fast) == list(range(1, head + 501))
        await bus.publish("room", "after")
        with trio.fail_after(10):
            await follow(slow, head + 501, got_slow)
            while not on_hub(slow):  # caught up again: back on the hub
                await bus.publish("room", "again")
                await follow(slow, len(message_ids(got_slow)) + 1, got_slow)
        await fast.aclose()
        await slow.aclose()
        assert bus.statistics().subscribers == 0


@pytest.mark.parametrize("how", ["aclose", "cancel", "drop"])
async def test_streams_leaving_the_hub_leave_no_subscription_behind(how):
    async with chatbus.open_bus() as bus:
        gens = [
            chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0, heartbeat=60)
            for _ in range(5)
        ]
        for gen in gens:
            await gen.__anext__()
        frames: list[list[dict[str, object]]] = [[] for _ in gens]
        with trio.fail_after(10):
            count = 0
            while not all(on_hub(g) for g in gens):
                count += 1
                await bus.publish("room", count)
                for gen, got in zip(gens, frames, strict=True):
                    await follow(gen, count, got)
        assert bus.statistics().subscribers == 1  # the hub's, for all five
        if how == "aclose":
            for gen in gens:
                await gen.aclose()
        elif how == "cancel":
            with trio.move_on_after(0.1):
                async with trio.open_nursery() as nursery:
                    for gen in gens:
                        nursery.start_soon(follow, gen, 10**9, [])
            for gen in gens:
                with pytest.raises(StopAsyncIteration):
                    await gen.__anext__()
        else:
            del gen, gens
            gc.collect()
            with trio.fail_after(5):
                while bus.statistics().subscribers:  # noqa: ASYNC110 (no event to wait on)
                    await trio.sleep(0.01)
        # At once: the last stream leaving closed the hub's subscription.
        assert bus.statistics().subscribers == 0
        assert not chatbus._sse_hub._HUBS.get(bus)
        # A stream opened afterwards starts a new hub and gets the next message.
        gen = chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0)
        await gen.__anext__()
        await bus.publish("room", "next")
        got: list[dict[str, object]] = []
        await follow(gen, count + 1, got)
        assert message_ids(got) == [count + 1]
        await gen.aclose()


async def test_events_keep_their_positions_on_the_hub():
    """An event emitted after message n reaches a hub client after n, before n + 1;
    a keyed event retained for joiners reaches a client that joins a busy hub."""
    async with chatbus.open_bus() as bus:
        gens = [chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0) for _ in range(3)]
        for gen in gens:
            await gen.__anext__()
        frames: list[list[dict[str, object]]] = [[] for _ in gens]
        count = 0
        with trio.fail_after(10):
            while not all(on_hub(g) for g in gens):
                count += 1
                await bus.publish("room", count)
                for gen, got in zip(gens, frames, strict=True):
                    await follow(gen, count, got)
        first = count + 1
        for n in range(first, first + 20):
            await bus.publish("room", n)
            await bus.emit("room", {"after": n})
        for gen, got in zip(gens, frames, strict=True):
            with trio.fail_after(10):
                await follow(gen, first + 19, got)
                await bus.publish("room", "last")
                await follow(gen, first + 20, got)
            seq = [
                ("message", int(mid(f)))
                if f["event"] == "message"
                else ("event", f["data"]["body"]["after"])
                for f in got
                if f.get("event") in ("message", "event")
            ]
            tail = [s for s in seq if first <= s[1] < first + 20]
            expected = [
                (kind, n) for n in range(first, first + 20) for kind in ("message", "event")
            ]
            assert tail == expected
        # A joiner while the hub runs gets what the room retained (a keyed state).
        await bus.emit("room", {"typing": "al"}, key="typing:al", ttl=30)
        joiner = chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0)
        await joiner.__anext__()
        got = []
        with trio.fail_after(10):
            while not [f for f in got if f.get("event") == "event"]:
                got.extend(parse(await joiner.__anext__()))
        (event,) = [f for f in got if f.get("event") == "event"]
        assert event["data"]["key"] == "typing:al"
        for gen in [*gens, joiner]:
            await gen.aclose()


@pytest.mark.parametrize("hub", [True, False])
async def test_streams_on_the_hub_end_as_their_own_subscription_would(monkeypatch, hub):
    """The stream deleted, or the bus closed, under clients on the hub: each gets what
    came before, then the same ``end`` frame a subscription of its own gives."""
    monkeypatch.setattr(chatbus.sse, "_HUB", hub)
    async with chatbus.open_bus() as bus:
        gens = [chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0) for _ in range(2)]
        for gen in gens:
            await gen.__anext__()
        frames: list[list[dict[str, object]]] = [[] for _ in gens]
        count = 0
        with trio.fail_after(10):
            while count < 3 or (hub and not all(on_hub(g) for g in gens)):
                count += 1
                await bus.publish("room", count)
                for gen, got in zip(gens, frames, strict=True):
                    await follow(gen, count, got)
        await bus.delete_stream("room")
        for gen, got in zip(gens, frames, strict=True):
            with trio.fail_after(10):
                async for chunk in gen:
                    got.extend(parse(chunk))
            assert message_ids(got) == list(range(1, count + 1))
            assert got[-1]["event"] == "end"
            # (StreamDeleted is a HistoryReset, told apart: the page says so.)
            assert got[-1]["data"]["reason"] == "stream_deleted"
            assert got[-1]["data"]["error"] == "StreamDeleted"
        assert bus.statistics().subscribers == 0

        gen = chatbus.sse.sse_stream(bus, "other", Cursor(last=0), flush=0)
        await gen.__anext__()
        got = []
        with trio.fail_after(10):
            while not (count and message_ids(got) and (not hub or on_hub(gen))):
                await bus.publish("other", "x")
                got.extend(parse(await gen.__anext__()))

            async def close_soon() -> None:
                await trio.sleep(0.05)
                await bus.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_soon)
                async for chunk in gen:
                    got.extend(parse(chunk))
        assert got[-1]["event"] == "end" and got[-1]["data"]["reason"] == "bus_closed"


async def test_streams_outlive_a_hub_that_stops_and_join_the_next(monkeypatch):
    """A hub whose subscription stops for no reason a stream ends with (here:
    cancelled) leaves its streams on subscriptions of their own, at their cursors,
    and they join the room's next hub, also one that was waiting to switch."""
    may_switch, held = chatbus.sse._may_switch, [False]
    monkeypatch.setattr(chatbus.sse, "_may_switch", lambda *a: not held[0] and may_switch(*a))
    async with chatbus.open_bus() as bus:
        on = chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0)
        await on.__anext__()
        got_on: list[dict[str, object]] = []
        count = 0
        with trio.fail_after(10):
            while not on_hub(on):
                count += 1
                await bus.publish("room", count)
                await follow(on, count, got_on)
        held[0] = True  # the next stream waits to switch (whenever its merge is done)
        waiting = chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0)
        await waiting.__anext__()
        got_waiting: list[dict[str, object]] = []

        async def pull() -> None:
            async for chunk in waiting:
                got_waiting.extend(parse(chunk))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull)
            await trio.testing.wait_all_tasks_blocked()  # it joined, waits for a message
            (first,) = chatbus._sse_hub._HUBS[bus].values()
            assert not on_hub(waiting) and first._members == 2
            held[0] = False
            first._scope.cancel()
            start = count
            with trio.fail_after(10):
                while not (on_hub(on) and on_hub(waiting)):
                    count += 1
                    await bus.publish("room", count)
                    await follow(on, count, got_on)
                    while count not in message_ids(got_waiting):  # noqa: ASYNC110
                        await trio.sleep(0.001)
            assert first.ended and first.error is None
            (second,) = chatbus._sse_hub._HUBS[bus].values()
            assert second is not first and second._members == 2
            nursery.cancel_scope.cancel()
        assert message_ids(got_on) == list(range(1, count + 1))
        assert message_ids(got_waiting) == list(range(start + 1, count + 1))
        await on.aclose()
        assert bus.statistics().subscribers == 0


class _SchedulerPasses(trio.abc.Instrument):
    """Counts trio's scheduler passes: each waits for I/O once (maybe for no time).

    (A task counting its own checkpoints cannot tell passes apart: trio runs a pass's
    tasks in one order or its reverse, at random, so two batches one pass apart could
    both see it before or after them.)
    """

    def __init__(self) -> None:
        self.count = 0

    def after_io_wait(self, timeout: float) -> None:
        self.count += 1


@contextlib.contextmanager
def _counting_passes() -> Iterator[_SchedulerPasses]:
    passes = _SchedulerPasses()
    trio.lowlevel.add_instrument(passes)
    try:
        yield passes
    finally:
        trio.lowlevel.remove_instrument(passes)


async def test_the_flush_clock_wakes_its_streams_a_batch_per_scheduler_pass():
    """Other tasks (a POST being answered) run between the batches, not after all
    1,000 streams of a room wrote."""
    clock = chatbus._flush_clock.FlushClock(0.01)
    batch = chatbus._flush_clock.WAKE_BATCH
    woken: list[int] = []

    with _counting_passes() as passes:

        async def stream() -> None:
            await clock.wait()
            woken.append(passes.count)

        async with trio.open_nursery() as nursery:
            for _ in range(10 * batch):
                nursery.start_soon(stream)
            with trio.fail_after(5):
                while len(woken) < 10 * batch:  # noqa: ASYNC110
                    await trio.sleep(0.01)
    per_pass = collections.Counter(woken)
    assert max(per_pass.values()) <= batch, per_pass  # others run between the batches
    assert len(per_pass) >= 10


async def test_the_hub_wakes_its_waiting_streams_a_batch_per_scheduler_pass():
    async with chatbus.open_bus() as bus:
        gens = [
            chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0, events=False)
            for _ in range(4 * chatbus._flush_clock.WAKE_BATCH)
        ]
        for gen in gens:
            await gen.__anext__()
        frames: list[list[dict[str, object]]] = [[] for _ in gens]
        count = 0
        with trio.fail_after(20):
            while not all(on_hub(g) for g in gens):
                count += 1
                await bus.publish("room", count)
                for gen, got in zip(gens, frames, strict=True):
                    await follow(gen, count, got)
        woken: list[int] = []
        with _counting_passes() as passes:

            async def pull(gen) -> None:
                await gen.__anext__()
                woken.append(passes.count)

            async with trio.open_nursery() as nursery:
                for gen in gens:
                    nursery.start_soon(pull, gen)
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                await bus.publish("room", "news")
                with trio.fail_after(5):
                    while len(woken) < len(gens):  # noqa: ASYNC110
                        await trio.sleep(0.01)
        per_pass = collections.Counter(woken)
        assert max(per_pass.values()) <= chatbus._flush_clock.WAKE_BATCH, per_pass
        assert len(per_pass) >= 4
        for gen in gens:
            await gen.aclose()
