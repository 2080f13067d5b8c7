"""Shared chatbus plumbing: consumers that count to a target, publisher drivers, keys.

Buses come from ``_backends.open_backend_bus``.
"""

from __future__ import annotations

import dataclasses
import time

import trio

import chatbus


async def count_until(
    bus: chatbus.Bus,
    stream: str,
    last_id: int,
    done: list[float],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Subscribe to ``stream`` from 0, consume up to ``last_id``, append the finish time.

    Started with ``nursery.start``: returns to the starter once subscribed.
    """
    async with bus.open_subscriber(stream) as subscriber:
        task_status.started()
        expected = 1
        async for message in subscriber:
            if message.id != expected:
                raise AssertionError(f"{stream}: got id {message.id}, expected {expected}")
            expected += 1
            if message.id >= last_id:
                break
    done.append(time.perf_counter())


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyPlan:
    """Which idempotency key each publish carries.

    ``keyed=False``: none. ``keyed=True``: a key unique to the caller and index,
    except that with ``retry_every=n`` every n-th publish of a caller repeats the key
    (and body) of that caller's previous publish, already committed: a retry after
    a lost reply, which must return the original message and store nothing.
    """

    keyed: bool = False
    retry_every: int = 0

    def source(self, i: int) -> int:
        """The index whose key and body publish ``i`` carries."""
        if self.retry_every > 1 and i % self.retry_every == self.retry_every - 1:
            return i - 1
        return i

    def new_messages(self, count: int) -> int:
        """How many of ``count`` publishes of one caller store a new message."""
        return len({self.source(i) for i in range(count)})


NO_KEYS = KeyPlan()


async def publish_many(
    publisher: chatbus.Publisher, count: int, tag: int, keys: KeyPlan = NO_KEYS
) -> None:
    """Publish ``count`` small chat-like messages, one awaited publish at a time."""
    if not keys.keyed:
        for i in range(count):
            await publisher.publish({"n": tag, "i": i, "text": "hello"})
        return
    previous: chatbus.Message | None = None
    for i in range(count):
        j = keys.source(i)
        message = await publisher.publish({"n": tag, "i": j, "text": "hello"}, key=f"{tag}-{j}")
        if j != i and (previous is None or message.id != previous.id):
            raise AssertionError(f"retry of key {tag}-{j} got id {message.id}, not the original")
        previous = message


async def drive_publishers(
    bus: chatbus.Bus,
    streams: list[str],
    publishers_per_stream: int,
    callers: int,
    total: int,
    keys: KeyPlan = NO_KEYS,
) -> list[chatbus.PublisherStatistics]:
    """Open publishers and run ``callers`` concurrent publish loops per publisher.

    ``total`` messages are spread evenly over streams, publishers and callers (the
    caller must make it divisible). Returns each publisher's final statistics.
    """
    per_caller = total // (len(streams) * publishers_per_stream * callers)
    stats: list[chatbus.PublisherStatistics] = []

    async def run_publisher(stream: str) -> None:
        async with bus.open_publisher(stream) as publisher:
            async with trio.open_nursery() as nursery:
                for tag in range(callers):
                    nursery.start_soon(publish_many, publisher, per_caller, tag, keys)
            stats.append(publisher.statistics())

    async with trio.open_nursery() as nursery:
        for stream in streams:
            for _ in range(publishers_per_stream):
                nursery.start_soon(run_publisher, stream)
    return stats


def per_stream_total(total: int, streams: int, publishers: int, callers: int) -> int:
    """Round ``total`` down so it splits evenly; return the messages per stream."""
    per_caller = max(1, total // (streams * publishers * callers))
    return per_caller * publishers * callers
