"""Events: emit -> receipt rates and latency, and what events cost durable messages.

Four measurements, each next to what it is judged against:

* **memory events/s**: one bus, one ``events=True`` subscriber; the emitter emits
  ``events_memory`` events (a checkpoint every ``events_chunk``, so the subscriber
  and the outbox's flusher run), a durable end marker after them. Clock from the
  first emit to the last receipt. Baseline: one bare trio memory channel hop of the
  same count, interleaved.
* **Postgres events/s, cross-process**: the same emitter; the subscriber runs in
  another OS process (``benchmarks._latency_child --events``) on its own bus over the same
  schema. Clock from the first emit (``time.time()`` here) to the last receipt
  (``time.time()`` there). Events lost anywhere (the emitter's outbox, the child's
  subscription buffer, stale) are reported beside the rate.
* **Postgres event latency** at a fixed offered load (``events_rate``, 2,000/s):
  emits paced by an absolute schedule (``t0 + i / rate``, ``trio.sleep_until``;
  ``emit`` never waits, so the schedule is open loop), subscriber in another process;
  receipt minus the time ``emit()`` was called. Warm-up first, not counted.
* **durable throughput with events**: the pg-throughput workload (64 callers over 8
  streams, one subscriber per stream in this process) while a task emits
  ``events_rate`` events/s over the same streams on the same bus and the
  subscribers take events too, against the same workload without events (exactly
  pg-throughput), interleaved. The emitting task wakes every ``events_tick`` (2 ms)
  and emits what is due: a timer per event (2,000 wake-ups a second) costs this
  process more than the emits, and the pacer's cost is not the bus's. That variant
  runs too, interleaved, and its ratio is in the row's note.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

import chatbus

from . import _backends, _harness, _pg
from ._backends import CHATBUS_POSTGRES
from ._config import Sizes
from ._harness import subscriber_process
from ._report import Row, measured
from ._scenario import Context, Scenario
from .latency import summarize
from .throughput import PgShape, baseline_channel_rate, interleave, median_text

STREAM = "events"
#: The durable message that ends a run: a publish waits for the bus's emitted events
#: to be flushed, so every event reaches a subscriber before it (or was lost).
END = {"end": True}


@dataclasses.dataclass
class Received:
    """What a subscriber saw of one run (times in seconds on the run's clock)."""

    events: int = 0
    first: float = 0.0
    last: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)
    lags: list[float] = dataclasses.field(default_factory=list)
    #: The subscription's events_stale, events_dropped at the end.
    stale: int = 0
    dropped: int = 0


async def receive_events(
    subscriber: chatbus.Subscriber[chatbus.Message | chatbus.Event],
    clock: Callable[[], float],
) -> Received:
    """Consume events until the end marker (a message); time events that carry ``t``."""
    result = Received()
    async for item in subscriber:
        now = clock()
        if isinstance(item, chatbus.Message):
            if item.body == END:
                break
            continue
        if result.events == 0:
            result.first = now
        result.events += 1
        result.last = now
        body = item.body
        if "t" in body and not body.get("warmup"):
            result.latencies.append(now - body["t"])
            result.lags.append(body["t"] - body["s"])
    stats = subscriber.statistics()
    result.stale, result.dropped = stats.events_stale, stats.events_dropped
    return result


Emit = Callable[[object], Awaitable[chatbus.Event]]


async def emit_burst(emit: Emit, count: int, chunk: int) -> None:
    """Emit ``count`` small events as fast as possible, a checkpoint every ``chunk``."""
    for i in range(count):
        await emit({"i": i, "text": "hello"})
        if i % chunk == chunk - 1:
            await trio.lowlevel.checkpoint()


#: Events emit_paced sends back to back, when behind its schedule, between checkpoints.
_CATCH_UP_CHUNK: Final = 16


async def emit_paced(
    emitters: Sequence[Emit],
    *,
    rate: float,
    count: int | None,
    warmup: int = 0,
    clock: Callable[[], float] = time.time,
    emitted: list[int] | None = None,
    tick: float = 0.0,
) -> int:
    """Emit at ``rate``/s by absolute schedule, round robin over ``emitters``.

    ``count=None``: until cancelled. Each body holds ``t`` (when emit() was called)
    and ``s`` (when it was scheduled). Returns how many were emitted; ``emitted[0]``
    counts them as they go (for a caller that cancels this).

    ``tick``: sleep at least this long between wake-ups, emitting what is due at
    each (the rate holds; events go out in small bursts). A timer per event costs
    this process more than the emit does: where the process's CPU is what is
    measured (durable throughput beside events), the pacer's own cost is not the
    bus's.
    """
    counter = emitted if emitted is not None else [0]
    start_trio = trio.current_time() + 0.05
    start_clock = clock() + 0.05
    i = 0
    while count is None or i < warmup + count:
        offset = i / rate
        now = trio.current_time()
        if start_trio + offset > now:
            await trio.sleep_until(max(start_trio + offset, now + tick))
        elif i % _CATCH_UP_CHUNK == 0:
            # Due already (a wake-up comes at most once a millisecond or so): emit
            # what is due without a timer each (a sleep's cancel scope costs this
            # process more than the emit), yielding now and then.
            await trio.lowlevel.checkpoint()
        body = {"t": clock(), "s": start_clock + offset, "warmup": i < warmup}
        await emitters[i % len(emitters)](body)
        i += 1
        counter[0] = i
    return i


# ---- (a) memory ----


async def _memory_run(count: int, chunk: int) -> tuple[float, Received]:
    async with chatbus.open_bus() as bus:
        async with bus.open_subscriber(STREAM, events=True) as subscriber:
            result = Received()

            async def consume() -> None:
                nonlocal result
                result = await receive_events(subscriber, time.perf_counter)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await trio.sleep(0.01)  # the subscription has caught up (empty stream)
                async with bus.open_publisher(STREAM) as publisher:
                    start = time.perf_counter()
                    await emit_burst(publisher.emit, count, chunk)
                    await publisher.publish(END)
    return result.events / (result.last - start), result


def memory_events(context: Context, backend: str) -> list[Row]:
    """Events/s emit -> subscriber on the in-memory bus vs one bare channel hop."""
    sizes = context.sizes
    runs: list[Received] = []

    def chatbus_run() -> float:
        rate, received = trio.run(_memory_run, sizes.events_memory, sizes.events_chunk)
        runs.append(received)
        return rate

    samples = interleave(
        sizes.repeats,
        {
            "channel hop": lambda: baseline_channel_rate(
                sizes.events_memory, sizes.baseline_channel_buffer
            ),
            "chatbus": chatbus_run,
        },
    )
    lost = [sizes.events_memory - run.events for run in runs]
    return [
        measured(
            scenario="events",
            backend="memory",
            metric="events/s",
            unit="ev/s",
            samples=samples["chatbus"],
            baseline_name="channel hop",
            baseline_samples=samples["channel hop"],
            target=">= 100,000 ev/s",
            min_value=100_000,
            note=f"emit -> 1 subscriber, {sizes.events_memory} events, checkpoint every"
            f" {sizes.events_chunk}; lost per run {lost}",
            extra={"lost": lost},
        )
    ]


# ---- (b), (c) Postgres, subscriber in another process ----


@dataclasses.dataclass(frozen=True, kw_only=True)
class PgEventsRun:
    """One cross-process run: the child's view and the emitting bus's statistics."""

    received: Received
    start: float
    emitted: int
    bus: chatbus.BusStatistics

    @property
    def rate(self) -> float:
        """Events received per second, first emit to last receipt."""
        return self.received.events / (self.received.last - self.start)

    @property
    def lost(self) -> int:
        """Emitted events the child never got."""
        return self.emitted - self.received.events


async def _postgres_burst(dsn: str, count: int, chunk: int) -> PgEventsRun:
    schema = _pg.scratch_schema("ev")
    async with (
        _backends.open_backend_bus("postgres", dsn, schema=schema) as bus,
        subscriber_process(dsn, schema, STREAM, events=True) as child,
    ):
        async with bus.open_publisher(STREAM) as publisher:
            start = time.time()
            await emit_burst(publisher.emit, count, chunk)
            await publisher.publish(END)
        received = Received(**await child.result())  # type: ignore[arg-type]
        stats = bus.statistics()
    return PgEventsRun(received=received, start=start, emitted=count, bus=stats)


async def _postgres_latency(dsn: str, sizes: Sizes) -> PgEventsRun:
    rate = sizes.events_rate
    warmup = int(sizes.events_latency_warmup_seconds * rate)
    count = int(sizes.events_latency_seconds * rate)
    schema = _pg.scratch_schema("evl")
    async with (
        _backends.open_backend_bus("postgres", dsn, schema=schema) as bus,
        subscriber_process(dsn, schema, STREAM, events=True) as child,
    ):
        async with bus.open_publisher(STREAM) as publisher:
            start = time.time()
            emitted = await emit_paced([publisher.emit], rate=rate, count=count, warmup=warmup)
            await publisher.publish(END)
        received = Received(**await child.result())  # type: ignore[arg-type]
        stats = bus.statistics()
    return PgEventsRun(received=received, start=start, emitted=emitted, bus=stats)


def _losses(runs: list[PgEventsRun]) -> str:
    parts = [
        f"{run.lost} (outbox {run.bus.events_dropped}, buffer {run.received.dropped},"
        f" stale {run.received.stale})"
        for run in runs
    ]
    return "; ".join(parts)


def _per_flush(runs: list[PgEventsRun]) -> str:
    return median_text([run.emitted / max(1, run.bus.event_flushes) for run in runs])


def postgres_events(context: Context, backend: str) -> list[Row]:
    """Cross-process events/s, and latency at the offered load, interleaved."""
    sizes, dsn = context.sizes, context.dsn
    bursts: list[PgEventsRun] = []
    paced: list[PgEventsRun] = []
    for _ in range(sizes.repeats):
        bursts.append(trio.run(_postgres_burst, dsn, sizes.events_postgres, sizes.events_chunk))
        paced.append(trio.run(_postgres_latency, dsn, sizes))
    summaries = [summarize(run.received.latencies) for run in paced]
    rows = [
        measured(
            scenario="events",
            backend="postgres",
            metric="events/s cross-process",
            unit="ev/s",
            samples=[run.rate for run in bursts],
            target=">= 20,000 ev/s",
            min_value=20_000,
            note=f"{sizes.events_postgres} events, subscriber in another process; median"
            f" events per flush {_per_flush(bursts)}; lost per run: {_losses(bursts)}",
            extra={
                "lost": [run.lost for run in bursts],
                "flushes": [run.bus.event_flushes for run in bursts],
            },
        )
    ]
    offered = f"{sizes.events_rate:g} ev/s offered, subscriber in another process"
    for metric in ("p50", "p90", "p99", "max"):
        is_p99 = metric == "p99"
        rows.append(
            measured(
                scenario="events",
                backend="postgres",
                metric=f"latency {metric}",
                unit="ms",
                samples=[summary[metric] for summary in summaries],
                target="<= 5 ms" if is_p99 else "",
                max_value=5.0 if is_p99 else None,
                note=(
                    f"{offered}; {int(summaries[0]['count'])} events per run; median"
                    f" events per flush {_per_flush(paced)}; lost: {_losses(paced)}"
                    if metric == "p50"
                    else ""
                ),
            )
        )
    rows.append(
        measured(
            scenario="events",
            backend="postgres",
            metric="sender lag p99",
            unit="ms",
            samples=[summarize(run.received.lags)["p99"] for run in paced],
            note="emit() call minus schedule, not in the above",
        )
    )
    return rows


# ---- (d) durable throughput while events flow ----


async def _count_with_events(
    bus: chatbus.Bus,
    stream: str,
    last_id: int,
    done: list[float],
    events_seen: list[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`_harness.count_until` with ``events=True``: messages checked, events counted."""
    async with bus.open_subscriber(stream, events=True) as subscriber:
        task_status.started()
        expected, events = 1, 0
        async for item in subscriber:
            if isinstance(item, chatbus.Event):
                events += 1
                continue
            if item.id != expected:
                raise AssertionError(f"{stream}: got id {item.id}, expected {expected}")
            expected += 1
            if item.id >= last_id:
                break
    done.append(time.perf_counter())
    events_seen.append(events)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DurableRun:
    """One pg-throughput run, with or without events."""

    rate: float
    events_per_s: float
    events_received: int
    batch: float
    #: This process's CPU per durable message (µs, time.process_time over the run):
    #: on a shared machine a steadier measure of what events cost the client.
    cpu_per_message: float
    #: Events per transaction that carried events (an append's or a flush's).
    events_per_flush: float


async def _durable_run(
    dsn: str, shape: PgShape, total: int, rate: float | None, tick: float = 0.0
) -> DurableRun:
    names = [f"chat-{i}" for i in range(shape.streams)]
    per_stream = _harness.per_stream_total(total, shape.streams, 1, shape.callers)
    done: list[float] = []
    events_seen: list[int] = []
    emitted = [0]
    async with _backends.open_backend_bus("postgres", dsn) as bus:
        # The subscribers hold the streams' topics, so bus.emit knows their heads.
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as inner:
                for name in names:
                    if rate is None:
                        await inner.start(_harness.count_until, bus, name, per_stream, done)
                    else:
                        await inner.start(
                            _count_with_events, bus, name, per_stream, done, events_seen
                        )
                if rate is not None:
                    emitters = [functools.partial(bus.emit, name) for name in names]
                    outer.start_soon(
                        functools.partial(
                            emit_paced,
                            emitters,
                            rate=rate,
                            count=None,
                            emitted=emitted,
                            tick=tick,
                        )
                    )
                    await trio.sleep(0.1)  # events are flowing before the clock starts
                start = time.perf_counter()
                cpu_start, emitted_start = time.process_time(), emitted[0]
                flushes_start = bus.statistics().event_flushes
                stats = await _harness.drive_publishers(
                    bus, names, 1, shape.callers, per_stream * shape.streams
                )
            end = max(done)
            cpu = time.process_time() - cpu_start
            flushes = bus.statistics().event_flushes - flushes_start
            events = emitted[0] - emitted_start
            outer.cancel_scope.cancel()
    messages = per_stream * shape.streams
    elapsed = end - start
    batches = sum(s.batches for s in stats)
    return DurableRun(
        rate=messages / elapsed,
        events_per_s=emitted[0] / (elapsed + 0.05) if rate is not None else 0.0,
        events_received=sum(events_seen),
        batch=messages / max(1, batches),
        cpu_per_message=cpu / messages * 1e6,
        events_per_flush=events / max(1, flushes),
    )


def durable_with_events(context: Context, backend: str) -> list[Row]:
    """The pg-throughput workload with events at the offered rate vs without, interleaved."""
    sizes, dsn = context.sizes, context.dsn
    shape = PgShape.from_sizes(sizes)
    runs: dict[str, list[DurableRun]] = {"without": [], "with": [], "timer each": []}

    def run(name: str, rate: float | None, tick: float = 0.0) -> float:
        total = sizes.events_durable_messages
        result = trio.run(_durable_run, dsn, shape, total, rate, tick)
        runs[name].append(result)
        return result.rate

    samples = interleave(
        sizes.repeats,
        {
            "without": functools.partial(run, "without", None),
            "with": functools.partial(run, "with", sizes.events_rate, sizes.events_tick),
            "timer each": functools.partial(run, "timer each", sizes.events_rate),
        },
    )
    with_runs = runs["with"]
    per_event_timer = statistics.median(samples["timer each"]) / statistics.median(
        samples["without"]
    )
    return [
        measured(
            scenario="events",
            backend="postgres",
            metric="durable msgs/s with events",
            unit="msg/s",
            samples=samples["with"],
            baseline_name="no events",
            baseline_samples=samples["without"],
            target=">= 0.9x",
            min_ratio=0.9,
            note=f"pg-throughput ({shape.describe(sizes.events_durable_messages)}) while"
            f" {sizes.events_rate:g} ev/s are emitted over its streams by a task waking"
            f" every {sizes.events_tick * 1000:g} ms (a timer per event instead, in the same"
            f" process: {per_event_timer:.2f}x; achieved"
            f" {median_text([r.events_per_s for r in with_runs])}/s, subscribers take"
            f" them: median {median_text([r.events_received for r in with_runs])} received"
            f" per run); median batch with {median_text([r.batch for r in with_runs])},"
            f" without {median_text([r.batch for r in runs['without']])}; client CPU"
            f" per message with {median_text([r.cpu_per_message for r in with_runs])} µs,"
            f" without {median_text([r.cpu_per_message for r in runs['without']])} µs;"
            f" events per outbox flush (an append carrying some counts one)"
            f" {median_text([r.events_per_flush for r in with_runs])}",
            extra={
                "events_per_s": [r.events_per_s for r in with_runs],
                "events_received": [r.events_received for r in with_runs],
                "cpu_per_message_with": [r.cpu_per_message for r in with_runs],
                "cpu_per_message_without": [r.cpu_per_message for r in runs["without"]],
                "events_per_flush": [r.events_per_flush for r in with_runs],
                "timer_each": samples["timer each"],
            },
        )
    ]


def run(context: Context, backend: str) -> list[Row]:
    """Every events row for ``backend``."""
    if backend == "memory":
        return memory_events(context, backend)
    return postgres_events(context, backend) + durable_with_events(context, backend)


SCENARIO = Scenario(
    name="events",
    label="events",
    needs={"memory": (), "postgres": CHATBUS_POSTGRES},
    entry=run,
    summary="events/s emit -> receipt (memory; Postgres cross-process), latency at 2,000"
    " ev/s, durable throughput with events alongside",
)

__all__ = ["SCENARIO", "Received", "receive_events"]
