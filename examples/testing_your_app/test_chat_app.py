"""The tests of chat_app, written once, run on every chatbus backend.

``python -m pytest`` runs them on the in-memory bus; ``python -m pytest
--chatbus-backend postgres`` runs the same tests on PostgreSQL, each on a fresh schema.
"""

from __future__ import annotations

import pytest
import trio
from chat_app import remind, run_shouter

import chatbus
from chatbus.testing import BusFactory


async def next_bodies(sub: chatbus.Subscriber, count: int) -> list[object]:
    return [(await sub.receive()).body for _ in range(count)]


async def test_shouter_answers(chatbus_bus: chatbus.Bus, nursery: trio.Nursery) -> None:
    await nursery.start(run_shouter, chatbus_bus, "room")
    with trio.fail_after(10):
        async with chatbus_bus.open_subscriber("room") as sub:
            await chatbus_bus.publish("room", {"role": "user", "text": "hi"})
            assert await next_bodies(sub, 2) == [
                {"role": "user", "text": "hi"},
                {"role": "bot", "text": "HI"},
            ]


@pytest.mark.chatbus(poll_interval=0.05)  # lost notices are found within 50 ms
async def test_two_shouters_on_a_lossy_network_reply_once(
    chatbus_bus: chatbus.Bus, chatbus_bus_factory: BusFactory, nursery: trio.Nursery
) -> None:
    # Two bot processes whose notifications are dropped, duplicated and reordered.
    for seed in (1, 2):
        bot_bus = await chatbus_bus_factory(drop=0.3, duplicate=0.3, reorder=0.3, seed=seed)
        await nursery.start(run_shouter, bot_bus, "room")
    with trio.fail_after(20):
        for n in range(5):
            await chatbus_bus.publish("room", {"role": "user", "text": f"message {n}"})
        async with chatbus_bus.open_subscriber("room") as sub:
            bodies = await next_bodies(sub, 10)
        await trio.sleep(0.2)  # time for a duplicate reply to show up, if there were one
    replies = [b for b in bodies if isinstance(b, dict) and b["role"] == "bot"]
    assert sorted(r["text"] for r in replies) == [f"MESSAGE {n}" for n in range(5)]
    page = await chatbus_bus.read("room", after=0)
    assert len(page) == 10  # five messages, five replies: no bot answered twice


async def test_reminder_an_hour_later(
    chatbus_bus: chatbus.Bus, autojump_clock: trio.abc.Clock
) -> None:
    # A mock clock: the hour passes at once. On a networked backend the plugin skips
    # this test (an auto-jumping clock would also jump over waits for the server).
    async with chatbus_bus.open_subscriber("room") as sub:
        start = trio.current_time()
        await remind(chatbus_bus, "room", "stand-up", delay=3600)
        message = await sub.receive()
    assert message.body == {"role": "reminder", "text": "stand-up"}
    assert trio.current_time() - start >= 3600
