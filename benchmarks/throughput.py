"""Throughput: memory (P publishers -> S subscribers) and Postgres (durable, 64 callers).

Memory baseline: one bare trio memory channel hop, one producer and one consumer,
awaited send/receive of the same message count. Postgres baselines: raw psycopg with
as many connections as chatbus's pool, one message per transaction and 100 per
transaction (see ``_pg``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import trio

from . import _harness, _pg
from ._config import Sizes
from ._report import Row, measured, skipped


async def _channel_hop(messages: int, buffer: int) -> float:
    send, receive = trio.open_memory_channel[dict[str, object]](buffer)
    body: dict[str, object] = {"n": 0, "i": 0, "text": "hello"}

    async def produce() -> None:
        async with send:
            for _ in range(messages):
                await send.send(body)

    async def consume() -> None:
        async with receive:
            async for _ in receive:
                pass

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        nursery.start_soon(consume)
    return messages / (time.perf_counter() - start)


def baseline_channel_rate(messages: int, buffer: int) -> float:
    """Messages per second through one bare trio memory channel hop."""
    return trio.run(_channel_hop, messages, buffer)


async def _chatbus_run(
    backend: str,
    dsn: str,
    *,
    streams: int,
    publishers: int,
    subscribers: int,
    callers: int,
    total: int,
) -> tuple[float, float, float]:
    """One end-to-end run; returns (deliveries/s, messages/s, mean batch size)."""
    names = [f"chat-{i}" for i in range(streams)]
    per_stream = _harness.per_stream_total(total, streams, publishers, callers)
    done: list[float] = []
    async with _harness.open_backend_bus(backend, dsn) as bus:
        async with trio.open_nursery() as nursery:
            for name in names:
                for _ in range(subscribers):
                    await nursery.start(_harness.count_until, bus, name, per_stream, done)
            start = time.perf_counter()
            stats = await _harness.drive_publishers(
                bus, names, publishers, callers, per_stream * streams
            )
        elapsed = max(done) - start
    messages = per_stream * streams
    batches = sum(s.batches for s in stats)
    return messages * subscribers / elapsed, messages / elapsed, messages / max(1, batches)


def _alternate(repeats: int, *runs: Callable[[], float]) -> list[list[float]]:
    """Run each callable ``repeats`` times, interleaved (ABAB…), so noise hits all."""
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for index, run in enumerate(runs):
            gc.collect()
            samples[index].append(run())
    return samples


def memory_throughput(sizes: Sizes) -> list[Row]:
    """P publishers -> S subscribers on the in-memory bus vs one bare channel hop."""
    batch_sizes: list[float] = []
    messages_per_s: list[float] = []

    def chatbus_run() -> float:
        deliveries, messages, batch = trio.run(
            lambda: _chatbus_run(
                "memory",
                "",
                streams=sizes.memory_streams,
                publishers=sizes.memory_publishers,
                subscribers=sizes.memory_subscribers,
                callers=sizes.memory_callers_per_publisher,
                total=sizes.memory_messages,
            )
        )
        batch_sizes.append(batch)
        messages_per_s.append(messages)
        return deliveries

    baseline, chatbus_rates = _alternate(
        sizes.repeats,
        lambda: baseline_channel_rate(sizes.memory_messages, sizes.baseline_channel_buffer),
        chatbus_run,
    )
    shape = (
        f"P={sizes.memory_publishers} x {sizes.memory_callers_per_publisher} callers,"
        f" S={sizes.memory_subscribers}, streams={sizes.memory_streams},"
        f" {sizes.memory_messages} msgs"
    )
    return [
        measured(
            scenario="throughput",
            backend="memory",
            metric="deliveries/s",
            unit="msg/s",
            samples=chatbus_rates,
            baseline_name="channel hop",
            baseline_samples=baseline,
            target=">= 0.5x",
            min_ratio=0.5,
            note=f"{shape}; median batch {sorted(batch_sizes)[len(batch_sizes) // 2]:.1f}",
            extra={"messages_per_s": messages_per_s, "mean_batch": batch_sizes},
        )
    ]


def postgres_throughput(sizes: Sizes, dsn: str, pg_problem: str | None) -> list[Row]:
    """64 publish() callers over 8 streams vs raw psycopg, 1 and 100 msgs per txn."""
    if pg_problem is not None:
        return [skipped("pg-throughput", "postgres", pg_problem)]
    connections = _pg.chatbus_pool_size()
    missing = _pg.chatbus_postgres_missing()
    batch_sizes: list[float] = []
    streams = sizes.pg_streams
    callers = max(1, sizes.pg_callers // streams)

    def chatbus_run() -> float:
        _, messages, batch = trio.run(
            lambda: _chatbus_run(
                "postgres",
                dsn,
                streams=streams,
                publishers=1,
                subscribers=1,
                callers=callers,
                total=sizes.pg_messages,
            )
        )
        batch_sizes.append(batch)
        return messages

    def single() -> float:
        return _pg.raw_throughput(
            dsn,
            messages=sizes.pg_baseline_single_messages,
            per_transaction=1,
            connections=connections,
            streams=streams,
        )

    def batched() -> float:
        return _pg.raw_throughput(
            dsn,
            messages=sizes.pg_baseline_batch_messages,
            per_transaction=sizes.pg_baseline_batch_size,
            connections=connections,
            streams=streams,
        )

    runs: list[Callable[[], float]] = [single, batched]
    if missing is None:
        runs.append(chatbus_run)
    samples = _alternate(sizes.repeats, *runs)
    single_rates, batch_rates = samples[0], samples[1]
    chatbus_rates = samples[2] if missing is None else []
    note = (
        f"{streams * callers} callers over {streams} streams, {sizes.pg_messages} msgs,"
        f" baseline: sync psycopg x {connections} conns"
    )
    if batch_sizes:
        note += f"; median batch {sorted(batch_sizes)[len(batch_sizes) // 2]:.1f}"
    if missing is not None:
        note = f"chatbus skipped: {missing}"
    return [
        measured(
            scenario="pg-throughput",
            backend="postgres",
            metric="durable msgs/s",
            unit="msg/s",
            samples=chatbus_rates,
            baseline_name="raw 1/txn",
            baseline_samples=single_rates,
            target=">= 5x",
            min_ratio=5.0,
            note=note,
            extra={"mean_batch": batch_sizes, "connections": connections},
        ),
        measured(
            scenario="pg-batch-ceiling",
            backend="postgres",
            metric="durable msgs/s",
            unit="msg/s",
            samples=chatbus_rates,
            baseline_name=f"raw {sizes.pg_baseline_batch_size}/txn",
            baseline_samples=batch_rates,
            target=">= 0.3x (aim)",
            min_ratio=0.3,
            note="same chatbus runs as pg-throughput",
        ),
    ]
