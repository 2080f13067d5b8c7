"""The race that loses messages in a naive chat server, and chatbus not losing them.

An agent worker is paused mid-conversation. While it is paused the user sends a
message, which is queued. Then two things happen at once on the same stream:

* the queued user message is *promoted* (published) by the request handler, and
* the resumed worker publishes its reply.

Two publishers race. Whichever commits first gets the lower id, and the other's
post-commit work (cache fill, wake-up, notice) may well land first, so a naive
"deliver everything after the last id I sent" subscriber would skip the lower id
for good. Here the subscriber's view is checked: complete and in order.

Run: python examples/promote_race.py
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio

import chatbus
from chatbus.memory import MemoryStore

STREAM = "chat-7"
ROUNDS = 50


class NetworkedStore:
    """Commits at once but answers after a random delay, like a database over a network.

    That delay is what lets the later id's post-commit work overtake the earlier one's.
    A wrapper (any :class:`chatbus.Store` will do), not a subclass: stores are final.
    """

    def __init__(self, inner: chatbus.Store) -> None:
        self._inner = inner

    async def append(self, stream: str, drafts: Sequence[chatbus.Draft]) -> list[chatbus.Message]:
        committed = await self._inner.append(stream, drafts)
        await trio.sleep(random.uniform(0, 0.003))
        return committed

    async def read(self, stream: str, after: int, limit: int) -> list[chatbus.Message]:
        return await self._inner.read(stream, after, limit)

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        return await self._inner.heads(streams)


async def main() -> None:
    expected = 1 + 2 * ROUNDS
    seen: list[chatbus.Message] = []
    async with chatbus.open_bus(store=NetworkedStore(MemoryStore())) as bus:
        await bus.publish(STREAM, {"role": "user", "text": "write me a poem"})
        async with (
            bus.open_subscriber(STREAM, after=0) as sub,
            bus.open_publisher(STREAM) as handler,
            bus.open_publisher(STREAM) as worker,
            trio.open_nursery() as nursery,
        ):

            async def watch() -> None:
                with trio.fail_after(30):
                    async for message in sub:
                        seen.append(message)
                        if message.id == expected:
                            return

            nursery.start_soon(watch)
            for round_ in range(ROUNDS):
                queued = {"role": "user", "text": f"(queued while paused) tweak #{round_}"}
                reply = {"role": "assistant", "text": f"stanza {round_}"}
                async with trio.open_nursery() as race:
                    # The handler promotes the queued message; the worker replies.
                    race.start_soon(handler.publish, queued)
                    race.start_soon(worker.publish, reply)
        stats = sub.statistics()

    ids = [m.id for m in seen]
    first_user = sum(1 for m in seen[1::2] if m.body["role"] == "user")
    for m in seen[:7]:
        print(f"  #{m.id:<3} {m.body['role']:>9}: {m.body['text']}")
    print(f"  … {len(seen) - 7} more")
    print()
    print(f"{ROUNDS} rounds of two racing publishers on one stream")
    print(f"promoted user message won the race in {first_user} of {ROUNDS} rounds")
    complete = ids == list(range(1, expected + 1))
    print(f"subscriber saw ids 1..{expected}, in order, each once: {complete}")
    print(
        f"overtaken lower ids recovered from the store: {stats.gaps} "
        f"(cache hits {stats.cache_hits}, store reads {stats.store_reads})"
    )
    assert complete


if __name__ == "__main__":
    trio.run(main)
