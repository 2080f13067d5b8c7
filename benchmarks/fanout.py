"""Fan-out: one stream, many subscribers in one process; deliveries per second.

All subscribers are open (and caught up on an empty stream) before the clock
starts; then one publisher with several concurrent callers publishes the messages,
and the clock stops when the last subscriber has received the last one.
"""

from __future__ import annotations

import time

import trio

from . import _harness
from ._config import Sizes
from ._report import Row, measured, skipped

STREAM = "fanout"


async def _run(backend: str, dsn: str, subscribers: int, messages: int, callers: int) -> float:
    per_caller = max(1, messages // callers)
    total = per_caller * callers
    done: list[float] = []
    async with _harness.open_backend_bus(backend, dsn) as bus:
        async with trio.open_nursery() as nursery:
            for _ in range(subscribers):
                await nursery.start(_harness.count_until, bus, STREAM, total, done)
            start = time.perf_counter()
            await _harness.drive_publishers(bus, [STREAM], 1, callers, total)
        elapsed = max(done) - start
    return total * subscribers / elapsed


def run(sizes: Sizes, backends: list[str], dsn: str, pg_problem: str | None) -> list[Row]:
    """Fan-out rows for each backend in ``backends``."""
    rows: list[Row] = []
    for backend in backends:
        if backend == "postgres" and pg_problem is not None:
            rows.append(skipped("fanout", backend, pg_problem))
            continue
        messages = sizes.fanout_messages if backend == "memory" else sizes.fanout_pg_messages
        samples = [
            trio.run(_run, backend, dsn, sizes.fanout_subscribers, messages, sizes.fanout_callers)
            for _ in range(sizes.repeats)
        ]
        rows.append(
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
        )
    return rows
