"""chatbus.sse: a stream that falls behind its room's hub and goes back to a
subscription of its own is a stream that continues, not a joiner: the events it gets
stay in their places (never a second "retained" block in the middle of the stream)."""

from __future__ import annotations

import trio
from test_sse import mid
from test_sse_hub import follow, message_ids, on_hub

import chatbus
import chatbus._sse_hub
import chatbus.sse
from chatbus.sse import Cursor


def placed(frames: list[dict[str, object]]) -> list[tuple[int, int, object]]:
    """Each event as (the id of the message before it, its ``after``, its key and body)."""
    last, out = 0, []
    for frame in frames:
        if frame.get("event") == "message":
            last = int(mid(frame))
        elif frame.get("event") == "event":
            data = frame["data"]
            assert isinstance(data, dict)
            out.append((last, data["after"], (data["key"], repr(data["body"]))))
    return out


async def test_a_client_that_falls_behind_the_hub_gets_no_retained_block_mid_stream(
    monkeypatch,
):
    monkeypatch.setattr(chatbus._sse_hub, "RING_SIZE", 64)
    async with chatbus.open_bus() as bus:
        slow = chatbus.sse.sse_stream(bus, "room", Cursor(last=0), flush=0)
        await slow.__anext__()
        got: list[dict[str, object]] = []
        with trio.fail_after(10):
            while not on_hub(slow):
                await bus.publish("room", "more")
                await follow(slow, len(message_ids(got)) + 1, got)
            # Keyed state (retained for joiners) and a part, both in place.
            await bus.emit("room", {"typing": "al"}, key="typing:al", ttl=60)
            await bus.emit("room", {"part": 1})
            await bus.publish("room", "after the events")
            await follow(slow, len(message_ids(got)) + 1, got)
        head = len(message_ids(got))
        hub = slow.ag_frame.f_locals["hub"]
        # The client stops reading while the ring moves on past it, with events.
        async with bus.open_publisher("room") as pub:
            for i in range(300):
                await pub.publish(i)
                if i % 50 == 0:
                    await bus.emit("room", {"typing": f"al{i}"}, key=f"typing:al{i}", ttl=60)
        assert hub.base > head  # fell behind: a subscription of its own again

        async def keep_publishing() -> None:
            async with bus.open_publisher("room") as pub:
                for i in range(300):
                    await pub.publish(i)
                    await trio.sleep(0.001)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_publishing)
                await follow(slow, head + 600, got)
        assert message_ids(got) == list(range(1, head + 601))
        events = placed(got)
        assert events, "the events before it fell behind came"
        assert [(before, after) for before, after, _ in events if before != after] == []
        seqs = [seq for _, _, seq in events]
        assert len(seqs) == len(set(seqs)), "an event came twice"
        await slow.aclose()
        assert bus.statistics().subscribers == 0
