"""Fan-out: one stream, many subscribers in one process; deliveries per second.

All subscribers are open (and caught up on an empty stream) before the clock
starts; then one publisher with several concurrent callers publishes the messages,
and the clock stops when the last subscriber has received the last one.
"""

from __future__ import annotations

import time

import trio

from . import _backends, _harness, _redis
from ._backends import CHATBUS_POSTGRES, CHATBUS_REDIS
from ._report import Row, measured
from ._scenario import Context, Scenario

STREAM = "fanout"


async def _run(backend: str, dsn: str, subscribers: int, messages: int, callers: int) -> float:
    per_caller = max(1, messages // callers)
    total = per_caller * callers
    done: list[float] = []
    async with _backends.open_backend_bus(backend, dsn) as bus:
        async with trio.open_nursery() as nursery:
            for _ in range(subscribers):
                await nursery.start(_harness.count_until, bus, STREAM, total, done)
            start = time.perf_counter()
            await _harness.drive_publishers(bus, [STREAM], 1, callers, total)
        elapsed = max(done) - start
    return total * subscribers / elapsed


def run(context: Context, backend: str) -> list[Row]:
    """The fan-out row for ``backend``."""
    sizes = context.sizes
    messages = sizes.fanout_messages if backend == "memory" else sizes.fanout_pg_messages
    with _redis.url_for(backend, context.dsn) as url:
        samples = [
            trio.run(_run, backend, url, sizes.fanout_subscribers, messages, sizes.fanout_callers)
            for _ in range(sizes.repeats)
        ]
    return [
        measured(
            scenario="fanout",
            backend=backend,
            metric="deliveries/s",
            unit="msg/s",
            samples=samples,
            target="report",
            note=f"1 stream, {sizes.fanout_subscribers} subscribers, {messages} msgs,"
            f" {sizes.fanout_callers} callers",
        )
    ]


SCENARIO = Scenario(
    name="fanout",
    label="fanout",
    needs={"memory": (), "postgres": CHATBUS_POSTGRES, "redis": CHATBUS_REDIS},
    entry=run,
    summary="one stream, 1,000 subscribers in one process, deliveries/s",
)
