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
Postgres and Redis: the subscriber runs in another OS process
(``benchmarks._latency_child``) and both stamp ``time.time()`` (same machine clock).
Redis runs on a standalone server of the suite's own with AOF ``everysec``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import trio

import chatbus

from . import _backends, _pg, _redis
from ._backends import CHATBUS_POSTGRES, CHATBUS_REDIS
from ._config import Sizes
from ._harness import subscriber_process
from ._report import Row, measured, percentile
from ._scenario import Context, Scenario

STREAM = "latency"


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
    keyed: bool = False,
) -> None:
    """Publish ``warmup + count`` messages at ``rate``/s, then an end marker.

    Every body holds ``t``, the time on ``clock`` at which publish() was called,
    and ``s``, the time it was scheduled for. ``keyed``: each publish carries a
    unique idempotency key (the end marker too).
    """

    async def publish_one(i: int, scheduled: float) -> None:
        body = {"i": i, "t": clock(), "s": scheduled, "warmup": i < warmup}
        await publisher.publish(body, key=f"lat-{i}" if keyed else None)

    start_trio = trio.current_time() + 0.05
    start_clock = clock() + 0.05
    async with trio.open_nursery() as nursery:
        for i in range(warmup + count):
            offset = i / rate
            await trio.sleep_until(start_trio + offset)
            nursery.start_soon(publish_one, i, start_clock + offset)
    await publisher.publish({"end": True}, key="lat-end" if keyed else None)


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


async def _remote_run(
    sizes: Sizes, backend: str, url: str, keyed: bool, plain: bool = False
) -> Collected:
    """One run with the subscriber in another OS process (Postgres or Redis at ``url``);
    ``plain``: the subscriber takes no messages from notices (reads the store)."""
    rate = sizes.latency_rate
    warmup = int(sizes.latency_warmup_seconds * rate)
    count = int(sizes.latency_seconds * rate)
    schema = _pg.scratch_schema("lat")  # the Postgres schema, or the Redis key prefix
    async with (
        _backends.open_backend_bus(backend, url, schema=schema) as bus,
        subscriber_process(url, schema, STREAM, backend=backend, plain_notices=plain) as child,
    ):
        async with bus.open_publisher(STREAM) as publisher:
            await offer_load(
                publisher, rate=rate, warmup=warmup, count=count, clock=time.time, keyed=keyed
            )
        report = await child.result()
    result = Collected(**report)  # type: ignore[arg-type]
    if result.seen != warmup + count:
        raise RuntimeError(f"child saw {result.seen} messages, expected {warmup + count}")
    return result


def _rows(
    backend: str,
    runs: list[Collected],
    target_ms: float | None,
    note: str,
    *,
    prefix: str = "",
    metrics: Sequence[str] = ("p50", "p90", "p99", "max"),
    baseline: Sequence[Collected] = (),
    baseline_name: str = "",
) -> list[Row]:
    """Percentile rows of ``runs``; with ``baseline``, each next to the same percentile."""
    per_run = [summarize(run.latencies) for run in runs]
    per_baseline = [summarize(run.latencies) for run in baseline]
    rows = []
    for metric in metrics:
        is_p99 = metric == "p99" and target_ms is not None
        rows.append(
            measured(
                scenario="latency",
                backend=backend,
                metric=prefix + metric,
                unit="ms",
                samples=[summary[metric] for summary in per_run],
                baseline_name=baseline_name,
                baseline_samples=[summary[metric] for summary in per_baseline],
                target=f"<= {target_ms:g} ms" if is_p99 else "",
                max_value=target_ms if is_p99 else None,
                note=(
                    f"{note}; median of {len(runs)} runs, {int(per_run[0]['count'])} msgs each"
                    if metric == metrics[0]
                    else ""
                ),
            )
        )
    return rows


def _side_rows(backend: str, runs: list[Collected]) -> list[Row]:
    """The load generator's lag and, for Postgres, latency after the transaction start."""
    lags = [summarize(run.lags) for run in runs]
    rows = [
        measured(
            scenario="latency",
            backend=backend,
            metric="sender lag p99",
            unit="ms",
            samples=[lag["p99"] for lag in lags],
            note="load generator lateness (publish() call minus schedule), not in the above",
        )
    ]
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


#: p99 targets (ms): memory in-process; Postgres and Redis cross-process.
TARGET_MS = {"memory": 1.0, "postgres": 10.0, "redis": 2.0}


def run(context: Context, backend: str) -> list[Row]:
    """Latency rows for ``backend``; cross-process ones unkeyed and keyed, interleaved."""
    sizes = context.sizes
    offered = f"{sizes.latency_rate:g} msg/s offered"
    if backend == "memory":
        runs = [trio.run(_memory_run, sizes) for _ in range(sizes.repeats)]
        return _rows("memory", runs, TARGET_MS["memory"], offered) + _side_rows("memory", runs)
    if backend == "redis":
        offered += ", standalone AOF everysec"
    with _redis.url_for(backend, context.dsn) as url:
        return _remote_rows(sizes, backend, url, offered)


def _remote_rows(sizes: Sizes, backend: str, url: str, offered: str) -> list[Row]:
    unkeyed: list[Collected] = []
    keyed: list[Collected] = []
    plain: list[Collected] = []
    for _ in range(sizes.repeats):
        unkeyed.append(trio.run(_remote_run, sizes, backend, url, False))
        keyed.append(trio.run(_remote_run, sizes, backend, url, True))
        plain.append(trio.run(_remote_run, sizes, backend, url, False, True))
    offered += ", subscriber in another process"
    target = TARGET_MS[backend]
    return [
        *_rows(backend, unkeyed, target, offered),
        *_side_rows(backend, unkeyed),
        *_rows(
            backend,
            keyed,
            target,
            offered + ", a unique key on every publish (runs interleaved with the above)",
            prefix="keyed ",
            metrics=("p50", "p99", "max"),
            baseline=unkeyed,
            baseline_name="unkeyed",
        ),
        measured(
            scenario="latency",
            backend=backend,
            metric="keyed sender lag p99",
            unit="ms",
            samples=[summarize(run.lags)["p99"] for run in keyed],
        ),
        *_rows(
            backend,
            plain,
            None,
            offered + ", unkeyed, the subscriber reading the store after every notice"
            " (no messages taken from notices; runs interleaved with the above)",
            prefix="plain notices ",
            metrics=("p50", "p99"),
            baseline=unkeyed,
            baseline_name="committed notices",
        ),
    ]


SCENARIO = Scenario(
    name="latency",
    label="latency",
    needs={"memory": (), "postgres": CHATBUS_POSTGRES, "redis": CHATBUS_REDIS},
    entry=run,
    summary="publish -> receipt at 1,000 msg/s offered (Postgres, Redis: cross-process,"
    " also keyed)",
)
