"""A subscriber whose consumer stops reading costs O(1) memory and slows nobody.

Each measurement runs in a fresh child process (this file run as a script), so the
resident-set growth of a run with a parked subscriber can be compared with a control
run without one: the store's own growth is the same in both.
"""

from __future__ import annotations

import json
import resource
import sys

import attrs
import trio
import trio.testing

import chatbus
from chatbus.memory import MemoryNotifier, MemoryStore

N = 100_000
READ_BATCH = 256


class DatabaseLikeStore(MemoryStore):
    """Reads return fresh objects, as a database's would: buffering them costs memory."""

    async def read(self, stream, after, limit):
        page = await super().read(stream, after, limit)
        return [attrs.evolve(m, body=json.loads(json.dumps(m.body))) for m in page]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def run(mode: str) -> dict[str, object]:
    """Publish N messages with a parked subscriber (or none); report growth."""
    result: dict[str, object] = {"mode": mode}
    store, notifier = DatabaseLikeStore(), MemoryNotifier()
    # The publisher is "another process" (its own bus), so the subscriber's messages
    # come from store reads: fresh objects, like a database's rows.
    async with (
        chatbus.open_bus(store=store, notifier=notifier) as publishing_bus,
        chatbus.open_bus(store=store, notifier=notifier, read_batch=READ_BATCH) as bus,
    ):
        async with (
            bus.open_subscriber("busy") as sub,
            publishing_bus.open_publisher("busy") as pub,
        ):
            if mode == "control":
                sub._stop()  # no reader at all
            await trio.testing.wait_all_tasks_blocked()
            before = rss_bytes()
            started = trio.current_time()

            async def worker(offset: int) -> None:
                for i in range(offset, N, 64):
                    await pub.publish({"i": i, "text": "some chat text, long enough to matter"})

            async with trio.open_nursery() as nursery:
                for offset in range(64):
                    nursery.start_soon(worker, offset)
            result["publish_seconds"] = trio.current_time() - started
            await trio.testing.wait_all_tasks_blocked()
            result["growth"] = rss_bytes() - before
            result["buffered"] = sub.statistics().buffered
            if mode == "parked":
                # Now the consumer reads everything: all of it, once, in order.
                expected = 1
                async for message in sub:
                    assert message.id == expected, (message.id, expected)
                    expected += 1
                    if expected > N:
                        break
                result["delivered_in_order"] = sub.statistics().delivered
    return result


async def measure(mode: str) -> dict[str, object]:
    done = await trio.run_process([sys.executable, __file__, mode], capture_stdout=True)
    return json.loads(done.stdout)


async def test_parked_subscriber_memory_stays_flat():
    results: dict[str, dict[str, object]] = {}

    async def one(mode: str) -> None:
        results[mode] = await measure(mode)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "control")
            nursery.start_soon(one, "parked")
    control, parked = results["control"], results["parked"]
    print(
        f"\nRSS growth over {N} messages: control {control['growth'] / 1e6:.1f} MB, "
        f"parked subscriber {parked['growth'] / 1e6:.1f} MB"
    )
    assert parked["delivered_in_order"] == N
    assert parked["buffered"] <= 2 * READ_BATCH
    # Bounded buffering costs a couple of batches whatever N is; an unbounded queue
    # would hold all N fresh copies (about 40 MB here).
    assert parked["growth"] - control["growth"] < 10_000_000


if __name__ == "__main__":
    print(json.dumps(trio.run(run, sys.argv[1])))
