"""Shared chatbus plumbing: a bus per backend, consumers that count to a target."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

import chatbus

from . import _pg


@asynccontextmanager
async def open_backend_bus(
    backend: str, dsn: str, *, schema: str | None = None, **options: Any
) -> AsyncIterator[chatbus.Bus]:
    """Open a bus on ``backend``; for Postgres in a fresh schema dropped afterwards.

    Pass ``schema`` to use (and still drop) a given schema, e.g. one a child process
    will join.
    """
    if backend == "memory":
        async with chatbus.open_bus(**options) as bus:
            yield bus
        return
    from chatbus.postgres import open_postgres

    schema = schema or _pg.scratch_schema("cb")
    try:
        async with (
            open_postgres(dsn, schema=schema) as (store, notifier),
            chatbus.open_bus(store=store, notifier=notifier, **options) as bus,
        ):
            yield bus
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_pg.drop_schema, dsn, schema)


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


async def publish_many(publisher: chatbus.Publisher, count: int, tag: int) -> None:
    """Publish ``count`` small chat-like messages, one awaited publish at a time."""
    for i in range(count):
        await publisher.publish({"n": tag, "i": i, "text": "hello"})


async def drive_publishers(
    bus: chatbus.Bus, streams: list[str], publishers_per_stream: int, callers: int, total: int
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
                    nursery.start_soon(publish_many, publisher, per_caller, tag)
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
