"""Publisher and subscriber OS processes for the Redis cross-process tests.

Run from the ``tests`` folder (``python -m support.redis_child …``):

* ``publish URL PREFIX STREAM NAME TASKS PER_TASK``: TASKS concurrent tasks share one
  publisher (so the producer batches) and each publishes PER_TASK keyed messages,
  waiting for each; prints ``{"acked": [[key, id], …]}``.
* ``subscribe URL PREFIX STREAM COUNT``: subscribes from 0, prints ``ready``, then
  receives COUNT messages (failing at the first id out of order) and prints
  ``{"received": [[id, key, body], …]}``.
"""

from __future__ import annotations

import json
import sys

import trio

from .redis_bus import open_redis_bus


async def publish(url: str, prefix: str, stream: str, name: str, tasks: int, per: int) -> None:
    """Publish ``tasks * per`` keyed messages from ``tasks`` concurrent tasks."""
    acked: list[tuple[str, int]] = []
    async with (
        open_redis_bus(url, prefix=prefix) as bus,
        bus.open_publisher(stream) as pub,
    ):

        async def task(t: int) -> None:
            for seq in range(per):
                key = f"{name}-{t}-{seq}"
                message = await pub.publish({"proc": name, "task": t, "seq": seq}, key=key)
                acked.append((key, message.id))

        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(task, t)
    print(json.dumps({"acked": acked}), flush=True)


async def subscribe(url: str, prefix: str, stream: str, count: int) -> None:
    """Receive ``count`` messages from 0, in order, and print them."""
    received: list[tuple[int, str | None, object]] = []
    async with (
        open_redis_bus(url, prefix=prefix, poll_interval=None) as bus,
        bus.open_subscriber(stream, after=0) as sub,
    ):
        print("ready", flush=True)
        async for message in sub:
            if message.id != len(received) + 1:
                raise SystemExit(f"got id {message.id} after {len(received)}")
            received.append((message.id, message.key, message.body))
            if len(received) == count:
                break
    print(json.dumps({"received": received}), flush=True)


def main(argv: list[str]) -> None:
    """Dispatch on the first argument."""
    mode, url, prefix, stream, *rest = argv
    if mode == "publish":
        name, tasks, per = rest
        trio.run(publish, url, prefix, stream, name, int(tasks), int(per))
    elif mode == "subscribe":
        trio.run(subscribe, url, prefix, stream, int(rest[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
