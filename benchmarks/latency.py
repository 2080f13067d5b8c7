"""Latency: publish -> subscriber receipt at a fixed offered load (open loop).

Publishes are paced by an absolute schedule (``t0 + i / rate`` with
``trio.sleep_until``), each in its own task, so a slow commit never delays the next
publish and backlog cannot hide latency. Each body carries the time ``publish()`` was
called (``t``) and its scheduled time (``s``); latency is receipt time minus ``t``.
``t - s`` (the load generator's own lag: timer granularity, a busy loop) is reported
separately. A warm-up period is published first and left out of the figures. For
Postgres, receipt minus the row's ``created_at`` (the append transaction's start) is
reported too.

Memory: publisher and subscriber share one process and ``time.perf_counter``.
Postgres: the subscriber runs in another OS process (``benchmarks._latency_child``)
and both stamp ``time.time()`` (same machine clock).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

import chatbus

from . import _harness, _pg
from ._config import Sizes
from ._report import Row, measured, percentile, skipped

STREAM = "latency"
REPO_ROOT = Path(__file__).resolve().parent.parent


def summarize(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds, plus the count."""
    ordered = sorted(latencies_s)
    return {
        "count": float(len(ordered)),
        "p50": percentile(ordered, 0.50) * 1e3,
        "p90": percentile(ordered, 0.90) * 1e3,
        "p99": percentile(ordered, 0.99) * 1e3,
        "max": (ordered[-1] if ordered else float("nan")) * 1e3,
    }


async def offer_load(
    publisher: chatbus.Publisher,
    *,
    rate: float,
    warmup: int,
    count: int,
    clock: Callable[[], float],
) -> None:
    """Publish ``warmup + count`` messages at ``rate``/s, then an end marker.

    Every body holds ``t``, the time on ``clock`` at which publish() was called,
    and ``s``, the time it was scheduled for.
    """

    async def publish_one(i: int, scheduled: float) -> None:
        await publisher.publish({"i": i, "t": clock(), "s": scheduled, "warmup": i < warmup})

    start_trio = trio.current_time() + 0.05
    start_clock = clock() + 0.05
    async with trio.open_nursery() as nursery:
        for i in range(warmup + count):
            offset = i / rate
            await trio.sleep_until(start_trio + offset)
            nursery.start_soon(publish_one, i, start_clock + offset)
    await publisher.publish({"end": True})


@dataclasses.dataclass
class Collected:
    """What a subscriber measured (seconds)."""

    seen: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    lags: list[float] = dataclasses.field(default_factory=list)
    since_commit: list[float] = dataclasses.field(default_factory=list)


async def collect(subscriber: chatbus.Subscriber, clock: Callable[[], float]) -> Collected:
    """Receive until the end marker, measuring every non-warm-up message."""
    result = Collected()
    async for message in subscriber:
        now = clock()
        body = message.body
        if body.get("end"):
            break
        result.seen += 1
        if not body["warmup"]:
            result.latencies.append(now - body["t"])
            result.lags.append(body["t"] - body["s"])
            result.since_commit.append(now - message.created_at.timestamp())
    return result


async def _memory_run(sizes: Sizes) -> Collected:
    rate = sizes.latency_rate
    warmup = int(sizes.latency_warmup_seconds * rate)
    count = int(sizes.latency_seconds * rate)
    async with chatbus.open_bus() as bus, bus.open_subscriber(STREAM) as subscriber:
        result = Collected()

        async def consume() -> None:
            nonlocal result
            result = await collect(subscriber, time.perf_counter)

        async with trio.open_nursery() as nursery, bus.open_publisher(STREAM) as publisher:
            nursery.start_soon(consume)
            await offer_load(
                publisher, rate=rate, warmup=warmup, count=count, clock=time.perf_counter
            )
    return result


async def _postgres_run(sizes: Sizes, dsn: str) -> Collected:
    rate = sizes.latency_rate
    warmup = int(sizes.latency_warmup_seconds * rate)
    count = int(sizes.latency_seconds * rate)
    schema = _pg.scratch_schema("lat")
    async with _harness.open_backend_bus("postgres", dsn, schema=schema) as bus:
        command = [
            sys.executable,
            "-m",
            "benchmarks._latency_child",
            "--dsn",
            dsn,
            "--schema",
            schema,
            "--stream",
            STREAM,
        ]
        child = await trio.lowlevel.open_process(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        assert child.stdout is not None
        try:
            output = b""
            with trio.fail_after(30):
                while b"ready\n" not in output:
                    chunk = await child.stdout.receive_some()
                    if not chunk:
                        raise RuntimeError("latency child exited before subscribing")
                    output += chunk
            async with bus.open_publisher(STREAM) as publisher:
                await offer_load(publisher, rate=rate, warmup=warmup, count=count, clock=time.time)
            with trio.fail_after(60):
                while True:
                    chunk = await child.stdout.receive_some()
                    if not chunk:
                        break
                    output += chunk
                await child.wait()
        finally:
            if child.returncode is None:
                child.kill()
                with trio.CancelScope(shield=True):
                    await child.wait()
    result = Collected(**json.loads(output.split(b"ready\n", 1)[1]))
    if result.seen != warmup + count:
        raise RuntimeError(f"child saw {result.seen} messages, expected {warmup + count}")
    return result


def _rows(backend: str, runs: list[Collected], target_ms: float, note: str) -> list[Row]:
    per_run = [summarize(run.latencies) for run in runs]
    lags = [summarize(run.lags) for run in runs]
    rows = []
    for metric in ("p50", "p90", "p99", "max"):
        is_p99 = metric == "p99"
        rows.append(
            measured(
                scenario="latency",
                backend=backend,
                metric=metric,
                unit="ms",
                samples=[summary[metric] for summary in per_run],
                target=f"<= {target_ms:g} ms" if is_p99 else "",
                max_value=target_ms if is_p99 else None,
                note=(
                    f"{note}; median of {len(runs)} runs, {int(per_run[0]['count'])} msgs each"
                    if metric == "p50"
                    else ""
                ),
            )
        )
    rows.append(
        measured(
            scenario="latency",
            backend=backend,
            metric="sender lag p99",
            unit="ms",
            samples=[lag["p99"] for lag in lags],
            note="load generator lateness (publish() call minus schedule), not in the above",
        )
    )
    if backend == "postgres":
        since_commit = [summarize(run.since_commit) for run in runs]
        for metric in ("p50", "p99"):
            rows.append(
                measured(
                    scenario="latency",
                    backend=backend,
                    metric=f"after txn start {metric}",
                    unit="ms",
                    samples=[summary[metric] for summary in since_commit],
                    note="receipt minus created_at (= now() of the append transaction)"
                    if metric == "p50"
                    else "",
                )
            )
    return rows


def run(sizes: Sizes, backends: list[str], dsn: str, pg_problem: str | None) -> list[Row]:
    """Latency rows for each backend in ``backends``."""
    rows: list[Row] = []
    offered = f"{sizes.latency_rate:g} msg/s offered"
    if "memory" in backends:
        runs = [trio.run(_memory_run, sizes) for _ in range(sizes.repeats)]
        rows += _rows("memory", runs, 1.0, offered)
    if "postgres" in backends:
        if pg_problem is not None:
            rows.append(skipped("latency", "postgres", pg_problem))
        else:
            runs = [trio.run(_postgres_run, sizes, dsn) for _ in range(sizes.repeats)]
            rows += _rows("postgres", runs, 10.0, offered + ", subscriber in another process")
    return rows
