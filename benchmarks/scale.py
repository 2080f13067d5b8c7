"""Scale: many open, idle subscriptions on distinct streams.

Memory per subscription is measured two ways: tracemalloc (Python allocations made
while opening them, divided by their number: the figure the target applies to) and
the process RSS delta (allocator-dependent, reported alongside). For Postgres the
scenario also counts this process's server connections in ``pg_stat_activity``
(matched by client port), by application name: one ``chatbus-listen`` in total is
the target.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from contextlib import AsyncExitStack
from pathlib import Path

import trio
import trio.testing

import chatbus

from . import _backends, _pg, _redis
from ._backends import CHATBUS_POSTGRES, CHATBUS_REDIS
from ._report import Row, measured
from ._scenario import Context, Scenario


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _started(subscriber: chatbus.Subscriber) -> bool:
    """Whether the subscription's start-up read has succeeded (not just been tried)."""
    stats = subscriber.statistics()
    return stats.store_reads > stats.store_errors


async def _settle(subscribers: list[chatbus.Subscriber], deadline: float) -> int:
    """Wait (at most ``deadline`` s) until every start-up read succeeded.

    Returns how many subscriptions had not started by then.
    """
    pending = subscribers
    with trio.move_on_after(deadline):
        # No event to wait on: chatbus exposes start-up progress only as statistics.
        while pending:
            pending = [s for s in pending if not _started(s)]
            await trio.sleep(0.1)
    pending = [s for s in pending if not _started(s)]
    with trio.move_on_after(2):
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    return len(pending)


async def _run(backend: str, dsn: str, count: int, settle_deadline: float) -> dict[str, float]:
    async with _backends.open_backend_bus(backend, dsn) as bus:
        gc.collect()
        rss_before = _rss_bytes()
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        start = time.perf_counter()
        subscribers: list[chatbus.Subscriber] = []
        async with AsyncExitStack() as stack:
            for i in range(count):
                subscriber = await stack.enter_async_context(bus.open_subscriber(f"idle-{i}"))
                subscribers.append(subscriber)
            opened = time.perf_counter() - start
            not_started = await _settle(subscribers, deadline=settle_deadline)
            settled = time.perf_counter() - start
            gc.collect()
            after, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rss_after = _rss_bytes()
            result = {
                "traced_per_sub": (after - before) / count,
                "rss_per_sub": (rss_after - rss_before) / count,
                "open_seconds": opened,
                "settle_seconds": settled,
                "store_errors": float(sum(s.statistics().store_errors for s in subscribers)),
                "not_started": float(not_started),
            }
            if backend == "postgres":
                connections = await trio.to_thread.run_sync(_pg.own_connections, dsn)
                result["listen_connections"] = float(connections.get("chatbus-listen", 0))
                result["all_connections"] = float(sum(connections.values()))
        return result


def run(context: Context, backend: str) -> list[Row]:
    """Scale rows for ``backend`` (one run: it is not a rate)."""
    sizes = context.sizes
    rows: list[Row] = []
    count = sizes.scale_subscriptions if backend == "memory" else sizes.scale_pg_subscriptions
    with _redis.url_for(backend, context.dsn) as url:
        result = trio.run(_run, backend, url, count, sizes.scale_settle_seconds)
    note = (
        f"{count} idle subscriptions on distinct streams; opened in"
        f" {result['open_seconds']:.1f} s, started in {result['settle_seconds']:.1f} s"
    )
    if result["not_started"]:
        note = (
            f"{count} idle subscriptions; {int(result['not_started'])} still without a"
            f" successful start-up read after {sizes.scale_settle_seconds:g} s"
        )
    if result["store_errors"]:
        note += f"; {int(result['store_errors'])} failed start-up reads (retried)"
    rows.append(
        measured(
            scenario="scale",
            backend=backend,
            metric="bytes/sub (tracemalloc)",
            unit="B",
            samples=[result["traced_per_sub"]],
            target="<= 10 KB",
            max_value=10_240,
            note=note,
            extra=result,
        )
    )
    rows.append(
        measured(
            scenario="scale",
            backend=backend,
            metric="bytes/sub (RSS delta)",
            unit="B",
            samples=[result["rss_per_sub"]],
            note="allocator-dependent; tracemalloc is the reference",
        )
    )
    if backend == "postgres":
        rows.append(
            measured(
                scenario="scale",
                backend=backend,
                metric="LISTEN connections",
                unit="conns",
                samples=[result["listen_connections"]],
                target="== 1",
                max_value=1,
                min_value=1,
                note=f"this process holds {int(result['all_connections'])} connections"
                " in all (pool + LISTEN)",
            )
        )
    return rows


SCENARIO = Scenario(
    name="scale",
    label="scale",
    needs={"memory": (), "postgres": CHATBUS_POSTGRES, "redis": CHATBUS_REDIS},
    entry=run,
    summary="10,000 idle subscriptions: bytes each, and connections held",
)
