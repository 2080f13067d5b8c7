"""A small live chat on the embedded in-memory bus.

Three people talk in one room through their own publishers; two clients watch from
the start, a third joins late with ``after=0`` and catches up on the history before
following live. Every client prints what it sees: the same messages, in the same
order, exactly once.

Run: python examples/chat_room.py
"""

from __future__ import annotations

import random

import trio

import chatbus

ROOM = "room-42"
SCRIPT = {
    "alice": ["hi all", "anyone seen the deploy logs?", "thanks!", "bye"],
    "bob": ["hey alice", "they're in #ops", "np"],
    "bot": ["build 1841 passed", "build 1842 passed", "deploy finished"],
}
TOTAL = sum(len(lines) for lines in SCRIPT.values())


async def person(bus: chatbus.Bus, name: str) -> None:
    async with bus.open_publisher(ROOM) as pub:
        for n, text in enumerate(SCRIPT[name]):
            await trio.sleep(random.uniform(0.01, 0.08))
            await pub.publish({"from": name, "text": text}, key=f"{name}-{n}")


async def client(
    bus: chatbus.Bus,
    name: str,
    views: dict[str, list[int]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with bus.open_subscriber(ROOM, after=0) as sub:
        task_status.started()
        views[name] = []
        async for message in sub:
            views[name].append(message.id)
            print(
                f"  [{name:>8}] #{message.id:<2} {message.body['from']:>5}: {message.body['text']}"
            )
            if message.id == TOTAL:
                return


async def main() -> None:
    views: dict[str, list[int]] = {}
    async with chatbus.open_bus() as bus:
        print(f"chat room {ROOM!r}: {len(SCRIPT)} people, 3 clients (one joins late)\n")
        async with trio.open_nursery() as nursery:
            await nursery.start(client, bus, "phone", views)
            await nursery.start(client, bus, "laptop", views)
            for name in SCRIPT:
                nursery.start_soon(person, bus, name)
            await trio.sleep(0.12)
            print("  -- tablet joins late and catches up --")
            await nursery.start(client, bus, "tablet", views)
        history = await bus.read(ROOM, after=0, limit=100)
    print()
    for name, ids in views.items():
        ok = ids == list(range(1, TOTAL + 1))
        print(f"{name:>8} saw {len(ids)} messages, ids 1..{TOTAL} in order, once each: {ok}")
        assert ok
    assert [m.id for m in history] == list(range(1, TOTAL + 1))


if __name__ == "__main__":
    trio.run(main)
