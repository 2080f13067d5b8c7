"""chatbus.sse on its own: cursors, frames, the generator, store health, dropped generators."""

from __future__ import annotations

import gc
import json

import pytest
import trio
import trio.testing

import chatbus
import chatbus._flush_clock
import chatbus.memory
import chatbus.sse
from chatbus.sse import Cursor, InvalidCursor, parse_cursor


def parse(text: str) -> list[dict[str, object]]:
    """SSE text -> frames as {"id", "event", "data", "retry", "comment"} (as a browser)."""
    frames = []
    for block in text.split("\n\n"):
        if not block:
            continue
        frame: dict[str, object] = {}
        data = []
        for line in block.split("\n"):
            if line.startswith(":"):
                frame["comment"] = line[1:].strip()
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            else:
                frame[field] = value
        if data:
            frame["data"] = json.loads("\n".join(data))
        frames.append(frame)
    return frames


def mid(frame: dict[str, object]) -> str:
    """The message id of a frame's ``id:`` (``<id>:<epoch>``, or ``<id>`` alone)."""
    return str(frame["id"]).partition(":")[0]


async def take(gen, count: int, *, what=lambda f: "data" in f) -> list[dict[str, object]]:
    """Pull chunks from ``gen`` until ``count`` frames matching ``what`` came."""
    got: list[dict[str, object]] = []
    with trio.fail_after(10):
        while len(got) < count:
            got.extend(f for f in parse(await gen.__anext__()) if what(f))
    return got


# -- cursors -------------------------------------------------------------------------


def test_header_wins_over_query():
    assert parse_cursor(last_event_id="7", last="50") == Cursor(after=7, source="last-event-id")
    assert parse_cursor(last_event_id=" 7 ", after="3").after == 7


def test_empty_header_falls_back_to_query():
    assert parse_cursor(last_event_id="", last="50") == Cursor(last=50, source="last")
    assert parse_cursor(after="12") == Cursor(after=12, source="after")
    assert parse_cursor() == Cursor(after=0)
    assert parse_cursor(default=Cursor(last=5)) == Cursor(last=5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"after": "x"},
        {"after": "-1"},
        {"after": "1.5"},
        {"after": ""},
        {"after": "99999999999999999999"},
        {"last": "10001"},
        {"last": "+3"},
        {"last_event_id": "abc"},
        {"last_event_id": "1e3"},
        {"after": "1", "last": "2"},
        {"after": "\uff11\uff12"},  # full-width digits are not ASCII digits
    ],
)
def test_bad_cursor_is_invalid_cursor(kwargs):
    with pytest.raises(InvalidCursor):
        parse_cursor(**kwargs)
    assert issubclass(InvalidCursor, ValueError)


def test_resume_ids_carry_the_epoch_and_plain_ids_still_parse():
    cursor = parse_cursor(last_event_id="7:123", last="50")
    assert cursor == Cursor(after=7, epoch=123, source="last-event-id")
    assert parse_cursor(after=" 0:0 ") == Cursor(after=0, epoch=0, source="after")
    assert parse_cursor(after="12").epoch is None  # checked only against the head
    assert chatbus.sse.resume_id(7, 123) == "7:123"
    assert chatbus.sse.resume_id(7, None) == "7"


@pytest.mark.parametrize(
    "value", ["7:", ":5", "7:x", "7:1:2", "7: 1", "-7:1", "7:99999999999999999999", "7;1"]
)
def test_bad_resume_ids_are_invalid_cursor(value):
    with pytest.raises(InvalidCursor, match="Last-Event-ID"):
        parse_cursor(last_event_id=value)
    with pytest.raises(InvalidCursor, match="after"):
        parse_cursor(after=value)


# -- frames --------------------------------------------------------------------------


def test_frame_format():
    text = chatbus.sse.format_frame("a\nb", event="x", id=3, retry=100)
    assert text == "retry: 100\nid: 3\nevent: x\ndata: a\ndata: b\n\n"
    with pytest.raises(ValueError, match="one line"):
        chatbus.sse.format_frame("d", event="a\nb")
    with pytest.raises(ValueError, match="one line"):
        chatbus.sse.format_frame("d", id="1\r2")


async def test_message_frame_keeps_text_with_newlines_and_markup():
    async with chatbus.open_bus() as bus:
        text = "line1\nline2\r\n<script>alert(1)</script>"
        msg = await bus.publish("s", {"text": text})
        (frame,) = parse(chatbus.sse.message_frame(msg))
        assert frame["id"] == "1" and frame["event"] == "message"  # no epoch given
        assert frame["data"]["body"] == {"text": text}


# -- the generator -------------------------------------------------------------------


async def test_stream_messages_then_live_then_events_without_ids():
    async with chatbus.open_bus() as bus:
        for i in range(1, 4):
            await bus.publish("room", i)
        gen = chatbus.sse.sse_stream(bus, "room", parse_cursor(last="2"), heartbeat=0.2)
        first = parse(await gen.__anext__())
        assert first[0]["retry"] == str(chatbus.sse.DEFAULT_RETRY_MS)
        epoch = (await bus.stream_info("room")).epoch
        assert first[0]["id"] == f"1:{epoch}" and "data" not in first[0]  # last=2 of 3
        frames = await take(gen, 2)
        assert [(f["id"], f["data"]["body"]) for f in frames] == [
            (f"2:{epoch}", 2),
            (f"3:{epoch}", 3),
        ]
        event = await bus.emit("room", {"typing": "al"}, key="typing:al", ttl=5)
        await bus.publish("room", 4)
        frames = await take(gen, 2)
        assert frames[0]["event"] == "event" and "id" not in frames[0]
        assert frames[0]["data"]["key"] == "typing:al" and frames[0]["data"]["ttl"] == 5
        # What a page that reconnects (and gets retained events again) skips by:
        assert (frames[0]["data"]["emitter"], frames[0]["data"]["seq"]) == event.origin
        assert frames[1]["event"] == "message" and frames[1]["id"] == f"4:{epoch}"
        pings = await take(gen, 1, what=lambda f: f.get("comment") == "ping")
        assert pings
        await gen.aclose()
        assert bus.statistics().subscribers == 0


async def test_resume_from_last_event_id_gets_each_message_once():
    async with chatbus.open_bus() as bus:
        for i in range(1, 11):
            await bus.publish("room", i)
        gen = chatbus.sse.sse_stream(bus, "room", parse_cursor(last_event_id="6", last="50"))
        frames = await take(gen, 4)
        assert [mid(f) for f in frames] == ["7", "8", "9", "10"]
        await gen.aclose()


@pytest.mark.parametrize(
    ("cursor", "start"),
    [(Cursor(last=0), "7"), (Cursor(last=50), "0"), (Cursor(after=3), "3"), (None, "0")],
)
async def test_first_chunk_names_where_the_stream_starts(cursor, start):
    """Its ``id:`` is the browser's Last-Event-ID until a message comes: a reconnect
    then resumes at the start, not at a newer tail."""
    async with chatbus.open_bus() as bus:
        for i in range(1, 8):
            await bus.publish("room", i)
        epoch = (await bus.stream_info("room")).epoch
        gen = chatbus.sse.sse_stream(bus, "room", cursor)
        (first,) = parse(await gen.__anext__())
        assert first == {"comment": "chatbus", "retry": "2000", "id": f"{start}:{epoch}"}
        await gen.aclose()


async def test_a_client_that_stops_reading_holds_a_bounded_backlog():
    """A slow client: while the framework does not pull, nothing piles up for it."""
    async with chatbus.open_bus() as bus:
        gen = chatbus.sse.sse_stream(bus, "room", Cursor(last=0), events=False)
        await gen.__anext__()
        sub = gen.ag_frame.f_locals["sub"]  # the generator's own subscription
        async with bus.open_publisher("room") as pub:
            for i in range(3000):
                await pub.publish(i)
        await trio.testing.wait_all_tasks_blocked()
        held = sub.statistics()  # a buffer of one read batch, one more run in hand
        assert held.cursor == 0 and held.buffered <= 256 and held.fetched <= 2 * 256
        frames = await take(gen, 3000)  # and then it gets every one, in order
        assert [int(mid(f)) for f in frames] == list(range(1, 3001))
        await gen.aclose()


async def test_bad_stream_raises_before_any_response():
    async with chatbus.open_bus() as bus:
        with pytest.raises(chatbus.InvalidStream):
            chatbus.sse.sse_stream(bus, "", Cursor(after=0))
        with pytest.raises(ValueError, match="heartbeat"):
            chatbus.sse.sse_stream(bus, "s", heartbeat=0)
        with pytest.raises(ValueError, match="retry_ms"):
            chatbus.sse.sse_stream(bus, "s", retry_ms=-1)


async def test_cursor_ahead_ends_the_stream_with_a_reason():
    async with chatbus.open_bus() as bus:
        await bus.publish("room", 1)
        gen = chatbus.sse.sse_stream(bus, "room", Cursor(after=5))
        frames = await take(gen, 1)
        assert frames[0]["event"] == "end" and frames[0]["data"]["reason"] == "cursor_ahead"
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
        assert bus.statistics().subscribers == 0


async def test_a_resume_id_from_another_history_ends_the_stream_and_splices_nothing():
    """Review B, D8: an in-memory server restarted under a page (a new history with
    as many messages as the page had seen, or more) resumed after id n of the NEW
    history and spliced it onto the old. The id carries the epoch: it ends instead."""
    async with chatbus.open_bus() as old:
        for i in range(5):
            await old.publish("room", f"old{i}")
        gen = chatbus.sse.sse_stream(old, "room", Cursor(last=50))
        await gen.__anext__()
        last_event_id = (await take(gen, 5))[-1]["id"]
        await gen.aclose()
    async with chatbus.open_bus() as new:  # the restarted server
        for i in range(8):
            await new.publish("room", f"new{i}")
        cursor = parse_cursor(last_event_id=last_event_id, last="50")
        gen = chatbus.sse.sse_stream(new, "room", cursor)
        frames = []
        with trio.move_on_after(5):  # (it ends by itself: the end frame)
            async for chunk in gen:
                frames.extend(parse(chunk))
        assert [f.get("event") for f in frames] == ["end"]  # no message, no start id
        assert frames[0]["data"]["reason"] == "history_reset"
        # An old client's plain id is checked only against the head, as before.
        gen = chatbus.sse.sse_stream(new, "room", parse_cursor(last_event_id="5"))
        epoch = (await new.stream_info("room")).epoch
        assert [f["id"] for f in await take(gen, 3)] == [f"{i}:{epoch}" for i in (6, 7, 8)]
        await gen.aclose()


async def test_a_stream_deleted_and_created_again_is_not_resumed_across():
    async with chatbus.open_bus() as bus:
        for i in range(3):
            await bus.publish("room", i)
        gen = chatbus.sse.sse_stream(bus, "room")
        await gen.__anext__()
        last_event_id = (await take(gen, 3))[-1]["id"]
        await gen.aclose()
        await bus.delete_stream("room")
        for i in range(5):
            await bus.publish("room", i)
        gen = chatbus.sse.sse_stream(bus, "room", parse_cursor(last_event_id=last_event_id))
        (frame,) = await take(gen, 1)
        assert frame["event"] == "end" and frame["data"]["reason"] == "history_reset"
        # (0, 0): nothing seen before the stream existed fits any history.
        gen = chatbus.sse.sse_stream(bus, "room", parse_cursor(last_event_id="0:0"))
        assert [mid(f) for f in await take(gen, 5)] == ["1", "2", "3", "4", "5"]
        await gen.aclose()


async def test_bus_closing_ends_the_stream():
    async with chatbus.open_bus() as bus:
        gen = chatbus.sse.sse_stream(bus, "room")
        await gen.__anext__()
        async with trio.open_nursery() as nursery:

            async def pull() -> None:
                frames = await take(gen, 1)
                assert frames[0]["data"]["reason"] == "bus_closed"

            nursery.start_soon(pull)
            await trio.sleep(0.05)
            await bus.aclose()


async def test_cancelled_consumer_closes_the_subscription_at_once():
    async with chatbus.open_bus() as bus:
        gen = chatbus.sse.sse_stream(bus, "room")
        with trio.move_on_after(0.2):
            async for _ in gen:
                pass
        # The framework's task was cancelled inside the generator: it is finished.
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
        assert bus.statistics().subscribers == 0


async def test_generator_dropped_mid_stream_does_not_crash_or_leak():
    """A framework that drops the generator without aclose(): trio finalises it."""
    async with chatbus.open_bus() as bus:
        for i in range(1, 6):
            await bus.publish("room", i)
        gen = chatbus.sse.sse_stream(bus, "room", heartbeat=0.1)
        await gen.__anext__()
        await take(gen, 2)
        # Its own subscription, and the room's hub's if it joined it (see _sse_hub).
        assert 1 <= bus.statistics().subscribers <= 2
        del gen
        gc.collect()
        with trio.fail_after(5):
            while bus.statistics().subscribers:  # noqa: ASYNC110 (no event to wait on)
                await trio.sleep(0.01)
        await bus.publish("room", 6)
    # Leaving the bus (and trio.run) raised nothing: no TrioInternalError.


async def test_plain_user_generator_dropped_mid_stream_is_safe():
    """The obvious user code, yielding inside ``async with bus.open_subscriber``."""

    async def user_stream(bus):
        async with bus.open_subscriber("room", events=True) as sub:
            async for item in sub:
                yield item

    async with chatbus.open_bus() as bus:
        await bus.publish("room", 1)
        gen = user_stream(bus)
        assert (await gen.__anext__()).id == 1
        del gen
        gc.collect()
        with trio.fail_after(5):
            while bus.statistics().subscribers:  # noqa: ASYNC110 (no event to wait on)
                await trio.sleep(0.01)


def test_generators_left_suspended_past_the_bus_and_the_run():
    """The reported crash: a generator abandoned mid-stream inside ``async with
    bus.open_subscriber`` (not closed, not collected) while the bus closes and the run
    ends. Holding a nursery across the yield, as subscriptions once did, makes this
    ``trio.run`` raise (nursery stack corrupted / TrioInternalError)."""
    kept: list[object] = []

    async def main() -> None:
        async with chatbus.open_bus() as bus:
            await bus.publish("room", 1)

            async def user_stream():
                async with bus.open_subscriber("room", events=True) as sub:
                    async for item in sub:
                        yield item

            gen = user_stream()
            assert (await gen.__anext__()).id == 1
            frames = chatbus.sse.sse_stream(bus, "room")
            await frames.__anext__()
            kept.extend((gen, frames))  # alive past the bus and the run

    trio.run(main)  # trio finalises both at the end of the run: no error


# -- store health --------------------------------------------------------------------


class FlakyReads:
    """A memory store whose reads fail while ``broken``."""

    def __init__(self) -> None:
        self.inner = chatbus.memory.MemoryStore()
        self.broken = False

    async def append(self, stream, drafts):
        return await self.inner.append(stream, drafts)

    async def read(self, stream, after, limit):
        if self.broken:
            raise chatbus.StoreError("store unreachable")
        return await self.inner.read(stream, after, limit)

    async def heads(self, streams):
        if self.broken:
            raise chatbus.StoreError("store unreachable")
        return await self.inner.heads(streams)


async def test_status_reconnecting_then_ok_when_the_store_comes_back():
    store = FlakyReads()
    async with chatbus.open_bus(store=store) as writer:
        for i in range(1, 4):
            await writer.publish("room", i)
    async with chatbus.open_bus(store=store) as bus:
        store.broken = True
        gen = chatbus.sse.sse_stream(bus, "room", events=False)
        await gen.__anext__()
        (frame,) = await take(gen, 1)
        assert frame["event"] == "status" and frame["data"]["state"] == "reconnecting"
        store.broken = False
        frames = await take(gen, 4)  # the messages, and ok once the probe got an answer
        assert [f["data"]["state"] for f in frames if f["event"] == "status"] == ["ok"]
        assert [f["id"] for f in frames if f["event"] == "message"] == ["1", "2", "3"]
        await gen.aclose()


async def test_status_while_idle_when_the_store_goes_away_and_comes_back(autojump_clock):
    """A caught-up subscription reads nothing: the bus's polls must tell it."""
    store = FlakyReads()
    async with chatbus.open_bus(store=store, poll_interval=1.0) as bus:
        await bus.publish("room", 1)
        gen = chatbus.sse.sse_stream(bus, "room", events=False)
        await gen.__anext__()
        assert [f["id"] for f in await take(gen, 1)] == ["1"]
        store.broken = True
        (frame,) = await take(gen, 1)
        assert frame["event"] == "status" and frame["data"]["state"] == "reconnecting"
        store.broken = False
        (frame,) = await take(gen, 1)
        assert frame["event"] == "status" and frame["data"]["state"] == "ok"
        await gen.aclose()


async def test_an_outage_long_over_is_not_news_to_a_new_stream(autojump_clock):
    store = FlakyReads()
    async with chatbus.open_bus(store=store, poll_interval=1.0) as bus:
        await bus.publish("room", 1)
        async with bus.open_subscriber("room"):  # the bus polls while one is open
            store.broken = True
            with trio.fail_after(10):
                while not bus.statistics().poll_errors:  # noqa: ASYNC110 (no event)
                    await trio.sleep(0.1)
            store.broken = False
            await trio.sleep(5)
        gen = chatbus.sse.sse_stream(bus, "room", events=False, heartbeat=1.0)
        await gen.__anext__()
        frames = []
        with trio.move_on_after(4):  # messages, pings, and no status at all
            while True:
                frames.extend(parse(await gen.__anext__()))
        assert [f["id"] for f in frames if "data" in f] == ["1"]
        assert not [f for f in frames if f.get("event") == "status"]
        assert sum(f.get("comment") == "ping" for f in frames) >= 2


def test_store_health_is_ok_only_after_an_answer_to_a_call_begun_after_the_failure():
    health = chatbus.sse._StoreHealth()
    assert health.observe(False, 0.0) is None
    assert health.observe(True, 0.0) == "reconnecting"
    assert health.observe(True, 0.0) is None
    assert health.observe(False, 5.0) == "ok"
    assert health.failed(began=10.0) == "reconnecting"  # opening failed
    assert health.observe(False, 9.0) is None  # an answer to an older call: stale
    assert health.observe(False, 10.5) == "ok"
    assert health.failed(began=11.0) == "reconnecting"
    assert health.failed(began=12.0) is None


async def test_probe_in_flight_past_its_deadline_counts_as_down():
    async with chatbus.open_bus() as bus:
        probe = chatbus.sse._HealthProbe(bus, deadline=3.0)
        assert not probe.down(0.0)
        probe._began = 10.0  # a probe that hangs
        assert not probe.down(12.9)
        assert probe.down(13.0)


class Outage:
    """A memory store (with its stream lifecycle) whose calls, while ``mode`` is
    ``"refuse"``, fail after ``fail_after`` seconds (a pool timeout), and while it is
    ``"freeze"`` hang until the mode changes (a TCP black hole)."""

    def __init__(self, fail_after: float = 5.0) -> None:
        self.inner = chatbus.memory.MemoryStore()
        self.mode = "up"
        self.fail_after = fail_after
        self.changed = trio.Event()

    def set(self, mode: str) -> None:
        self.mode = mode
        self.changed.set()
        self.changed = trio.Event()

    async def _gate(self) -> None:
        while self.mode == "freeze":
            await self.changed.wait()
        if self.mode == "refuse":
            await trio.sleep(self.fail_after)
            raise chatbus.StoreError("couldn't get a connection after 5.00 sec")

    async def append(self, stream, drafts):
        await self._gate()
        return await self.inner.append(stream, drafts)

    async def read(self, stream, after, limit):
        await self._gate()
        return await self.inner.read(stream, after, limit)

    async def heads(self, streams):
        await self._gate()
        return await self.inner.heads(streams)

    async def stream_info(self, stream):
        await self._gate()
        return await self.inner.stream_info(stream)


async def statuses(gen, seconds: float) -> list[tuple[float, str]]:
    """(time, state) of each status frame within ``seconds`` (pings keep chunks coming:
    cancelling a pull would end the generator)."""
    got = []
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        for frame in parse(await gen.__anext__()):
            if frame.get("event") == "status":
                got.append((trio.current_time(), frame["data"]["state"]))
    return got


@pytest.mark.parametrize("mode", ["refuse", "freeze"])
async def test_status_holds_through_an_outage_and_says_ok_once_after(autojump_clock, mode):
    """Review B, D2 and D3: "reconnecting" from shortly after the cut until the store
    answers again, then "ok" once. Counting attempts (not answers) flapped to "ok"
    while attempts were in flight; a frozen store, whose calls never return, was not
    reported at all."""
    store = Outage()
    async with chatbus.open_bus(store=store, poll_interval=1.0) as bus:
        await bus.publish("room", 1)
        gen = chatbus.sse.sse_stream(bus, "room", events=False, heartbeat=1.0)
        await gen.__anext__()
        assert [mid(f) for f in await take(gen, 1)] == ["1"]
        await trio.sleep(2)
        cut = trio.current_time()
        store.set(mode)
        during = await statuses(gen, 30)
        assert [state for _, state in during] == ["reconnecting"]
        assert during[0][0] - cut <= 5.0  # within a few seconds, even when frozen
        restored = trio.current_time()
        store.set("up")
        after = await statuses(gen, 20)
        assert [state for _, state in after] == ["ok"]
        # A probe in flight at the restore may still fail: the next one answers.
        assert (
            after[0][0] - restored <= chatbus.sse.PROBE_DEADLINE + chatbus.sse.PROBE_INTERVAL + 1
        )
        await gen.aclose()


async def test_a_stream_opened_while_the_store_is_down_says_so_and_recovers(autojump_clock):
    """Review B, D4: opening with a cursor to check while the store is down must not
    abort the response with the StoreError: status "reconnecting", pings, and once
    the store answers the stream's start and its messages."""
    store = Outage()
    async with chatbus.open_bus(store=store, poll_interval=1.0) as bus:
        for i in range(1, 4):
            await bus.publish("room", i)
        epoch = (await bus.stream_info("room")).epoch
        store.set("refuse")
        gen = chatbus.sse.sse_stream(bus, "room", parse_cursor(last="2"), heartbeat=1.0)
        frames = []
        while trio.current_time() < 20:
            frames.extend(parse(await gen.__anext__()))
        assert frames[0] == {"comment": "chatbus", "retry": "2000"}
        assert frames[1]["event"] == "status" and frames[1]["data"]["state"] == "reconnecting"
        assert not [f for f in frames if "id" in f]  # nothing to resume from yet
        assert sum(f.get("comment") == "ping" for f in frames) >= 2  # between tries
        store.set("up")
        frames = []
        while trio.current_time() < 30:
            frames.extend(f for f in parse(await gen.__anext__()) if "id" in f or "data" in f)
        assert frames[0] == {"id": f"1:{epoch}"}  # where it starts: last=2 of 3
        assert [f["data"]["state"] for f in frames if f.get("event") == "status"] == ["ok"]
        assert [f["id"] for f in frames if f.get("event") == "message"] == [
            f"2:{epoch}",
            f"3:{epoch}",
        ]
        await gen.aclose()


@pytest.mark.parametrize("mode", ["refuse", "freeze"])
async def test_a_stream_opened_during_an_outage_says_so_as_soon_as_the_probe_knows(
    autojump_clock, mode
):
    """Review: alone in its process, a stream opened while the store was down said
    nothing until its open gave up (5 s for a pool timeout, 10 s for a frozen store);
    the probe knew after PROBE_DEADLINE. Then once the store answers: its messages."""
    store = Outage(fail_after=5.0)
    async with chatbus.open_bus(store=store, poll_interval=1.0) as bus:
        await bus.publish("room", 1)
        store.set(mode)
        opened = trio.current_time()
        gen = chatbus.sse.sse_stream(bus, "room", parse_cursor(after="0"), heartbeat=1.0)
        during = await statuses(gen, 15)
        assert [state for _, state in during] == ["reconnecting"]
        assert during[0][0] - opened <= chatbus.sse.PROBE_DEADLINE + 0.5
        store.set("up")
        frames = []
        while not any(f.get("event") == "message" for f in frames):
            frames.extend(parse(await gen.__anext__()))
        assert [f["data"]["state"] for f in frames if f.get("event") == "status"] == ["ok"]
        assert [mid(f) for f in frames if f.get("event") == "message"] == ["1"]
        await gen.aclose()


async def test_a_stream_opened_after_an_outage_ended_unwatched_starts_without_a_status(
    autojump_clock,
):
    """Review: the probe stopped (its last stream closed) while the store was down and
    kept that; a stream opened after the store came back began with "reconnecting"."""
    store = Outage(fail_after=1.0)
    async with chatbus.open_bus(store=store, poll_interval=1.0) as bus:
        await bus.publish("room", 1)
        store.set("refuse")
        gen = chatbus.sse.sse_stream(bus, "room", parse_cursor(after="0"), heartbeat=1.0)
        assert [state for _, state in await statuses(gen, 8)] == ["reconnecting"]
        await gen.aclose()
        await trio.sleep(10)  # nobody watches: the probe stops
        store.set("up")
        await bus.publish("room", 2)
        gen = chatbus.sse.sse_stream(bus, "room", parse_cursor(after="0"), heartbeat=1.0)
        frames = []
        while len([f for f in frames if f.get("event") == "message"]) < 2:
            frames.extend(parse(await gen.__anext__()))
        for _ in range(3):  # pings, and any status the probe has to give
            frames.extend(parse(await gen.__anext__()))
        assert not [f for f in frames if f.get("event") == "status"]
        await gen.aclose()


async def test_nothing_lost_when_the_idle_poll_expires_around_a_burst(monkeypatch):
    """The poll timeout must never cancel a receive() that has taken a message."""
    monkeypatch.setattr(chatbus.sse, "_STATUS_POLL", 1e-4)
    async with chatbus.open_bus() as bus, trio.open_nursery() as nursery:
        gen = chatbus.sse.sse_stream(bus, "burst", Cursor(last=0), events=False)
        await gen.__anext__()

        async def publish_bursts() -> None:
            async with bus.open_publisher("burst") as pub, trio.open_nursery() as inner:
                for _ in range(40):
                    for _ in range(10):
                        inner.start_soon(pub.publish, 0)
                    await trio.sleep(0.002)

        nursery.start_soon(publish_bursts)
        frames = await take(gen, 400)
        assert [int(mid(f)) for f in frames] == list(range(1, 401))
        await gen.aclose()


# -- writes: a busy room's messages are gathered, a quiet room's go out at once -------


async def _publish_every(bus, stream: str, count: int, interval: float, sent: dict) -> None:
    async with bus.open_publisher(stream) as pub:
        for i in range(count):
            sent[i + 1] = trio.current_time()
            await pub.publish(i)
            await trio.sleep(interval)


async def _chunks_until(gen, count: int) -> list[tuple[float, list[int]]]:
    """(time, message ids) of each chunk that carried messages, until ``count`` came."""
    chunks: list[tuple[float, list[int]]] = []
    got = 0
    while got < count:
        ids = [int(mid(f)) for f in parse(await gen.__anext__()) if "data" in f]
        if ids:
            chunks.append((trio.current_time(), ids))
            got += len(ids)
    return chunks


@pytest.mark.parametrize("make", [chatbus.sse.sse_stream, chatbus.sse.sse_bytes])
async def test_a_busy_room_goes_out_in_one_write_per_flush_interval(autojump_clock, make):
    """200 msgs/s for 1 s, flush 20 ms: about 50 writes, not 200, each message late by
    at most the flush interval, all of them once, in order."""
    async with chatbus.open_bus() as bus, trio.open_nursery() as nursery:
        gen = make(bus, "busy", Cursor(last=0), events=False, flush=0.02)
        await gen.__anext__()
        sent: dict[int, float] = {}
        nursery.start_soon(_publish_every, bus, "busy", 200, 0.005, sent)
        chunks = await _chunks_until(gen if make is chatbus.sse.sse_stream else _text(gen), 200)
        assert [i for _, ids in chunks for i in ids] == list(range(1, 201))
        assert 40 <= len(chunks) <= 60, len(chunks)
        assert max(at - sent[i] for at, ids in chunks for i in ids) <= 0.02 + 1e-9
        await gen.aclose()


async def _text(gen):
    async for chunk in gen:
        assert isinstance(chunk, bytes)
        yield chunk.decode()


async def test_a_quiet_room_writes_each_message_at_once(autojump_clock):
    async with chatbus.open_bus() as bus, trio.open_nursery() as nursery:
        gen = chatbus.sse.sse_stream(bus, "quiet", Cursor(last=0), events=False, flush=0.02)
        await gen.__anext__()
        sent: dict[int, float] = {}
        nursery.start_soon(_publish_every, bus, "quiet", 5, 0.1, sent)
        chunks = await _chunks_until(gen, 5)
        assert [ids for _, ids in chunks] == [[1], [2], [3], [4], [5]]
        assert all(at == sent[ids[0]] for at, ids in chunks)
        await gen.aclose()


async def test_flush_zero_writes_whatever_is_ready_at_once(autojump_clock):
    async with chatbus.open_bus() as bus, trio.open_nursery() as nursery:
        gen = chatbus.sse.sse_stream(bus, "busy", Cursor(last=0), events=False, flush=0)
        await gen.__anext__()
        sent: dict[int, float] = {}
        nursery.start_soon(_publish_every, bus, "busy", 50, 0.005, sent)
        chunks = await _chunks_until(gen, 50)
        assert len(chunks) == 50 and all(at == sent[ids[0]] for at, ids in chunks)
        await gen.aclose()


async def test_streams_of_a_busy_room_share_one_flush_clock(autojump_clock, monkeypatch):
    """100 clients: they wake together, once per interval (one timer, not 100)."""
    clock_class = chatbus._flush_clock.FlushClock
    wait = clock_class.wait
    timers = [0]

    async def counting_wait(self: chatbus._flush_clock.FlushClock) -> None:
        timers[0] += self._due is None  # this wait starts a timer of its own
        await wait(self)

    monkeypatch.setattr(clock_class, "wait", counting_wait)
    async with chatbus.open_bus() as bus, trio.open_nursery() as nursery:
        gens = [
            chatbus.sse.sse_stream(bus, "busy", Cursor(last=0), events=False, flush=0.02)
            for _ in range(100)
        ]
        for gen in gens:
            await gen.__anext__()
        sent: dict[int, float] = {}
        nursery.start_soon(_publish_every, bus, "busy", 100, 0.005, sent)
        times: list[set[float]] = [set() for _ in gens]

        async def pull(gen, into: set[float]) -> None:
            into.update(at for at, _ in await _chunks_until(gen, 100))
            await gen.aclose()

        async with trio.open_nursery() as pullers:
            for gen, into in zip(gens, times, strict=True):
                pullers.start_soon(pull, gen, into)
        assert len(set.union(*times)) <= 30  # every client flushed at the same instants
    # One timer per interval for all 100 streams (a timer per stream: about 100 times).
    assert 1 <= timers[0] <= 30, timers


async def test_a_stream_leaving_mid_flush_does_not_hold_the_others():
    clock = chatbus._flush_clock.FlushClock(3600.0)
    async with trio.open_nursery() as nursery:
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                await clock.wait()

        nursery.start_soon(lead)
        await trio.testing.wait_all_tasks_blocked()
        done = trio.Event()

        async def follow() -> None:
            await clock.wait()
            done.set()

        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        leader.cancel()  # its client left: the follower flushes now, not in an hour
        with trio.fail_after(1):
            await done.wait()


async def test_bad_flush_raises_before_any_response():
    async with chatbus.open_bus() as bus:
        for make in (chatbus.sse.sse_stream, chatbus.sse.sse_bytes):
            with pytest.raises(ValueError, match="flush"):
                make(bus, "s", flush=-0.01)
            with pytest.raises(ValueError, match="flush"):
                make(bus, "s", flush=float("nan"))
