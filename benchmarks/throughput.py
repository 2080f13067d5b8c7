"""Throughput: memory (P publishers -> S subscribers) and Postgres (durable, 64 callers).

Memory baseline: one bare trio memory channel hop, one producer and one consumer,
awaited send/receive of the same message count. Postgres baselines: raw psycopg with
as many connections as chatbus's pool, one message per transaction and 100 per
transaction (see ``_pg``). ``pg-keyed`` is the Postgres workload with an idempotency
key on every publish (and a variant where some publishes are retries), next to the
unkeyed chatbus runs and both raw baselines of the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from collections.abc import Callable, Mapping, Sequence

import trio

from . import _backends, _harness, _pg
from ._backends import CHATBUS_POSTGRES
from ._config import Sizes
from ._report import Row, measured
from ._scenario import Context, Scenario


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


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One end-to-end chatbus run."""

    deliveries_per_s: float
    publishes_per_s: float
    #: Publishes per store append (the publishers' group commit).
    batch: float
    #: Process CPU (user + system, this process: publishers, store client and
    #: subscribers; the server excluded) per publish, µs.
    cpu_us: float
    #: Publishes per append statement (Postgres: the cross-stream group commit);
    #: None where the store does not say.
    per_statement: float | None


async def _chatbus_run(
    backend: str,
    dsn: str,
    *,
    streams: int,
    publishers: int,
    subscribers: int,
    callers: int,
    total: int,
    keys: _harness.KeyPlan = _harness.NO_KEYS,
) -> RunResult:
    """One end-to-end run.

    Without retries every publish is a new message; with them (``keys``) the
    subscribers wait for the new messages only, and the rate counts every
    acknowledged publish.
    """
    names = [f"chat-{i}" for i in range(streams)]
    per_stream = _harness.per_stream_total(total, streams, publishers, callers)
    per_caller = per_stream // (publishers * callers)
    last_id = keys.new_messages(per_caller) * publishers * callers
    done: list[float] = []
    async with _backends.open_backend_bus(backend, dsn) as bus:
        store_stats = getattr(bus.store, "statistics", None)
        statements_before = _round_trips(store_stats)
        async with trio.open_nursery() as nursery:
            for name in names:
                for _ in range(subscribers):
                    await nursery.start(_harness.count_until, bus, name, last_id, done)
            cpu_start = time.process_time()
            start = time.perf_counter()
            stats = await _harness.drive_publishers(
                bus, names, publishers, callers, per_stream * streams, keys
            )
        elapsed = max(done) - start
        cpu = time.process_time() - cpu_start
        statements = _round_trips(store_stats) - statements_before
    messages = per_stream * streams
    batches = sum(s.batches for s in stats)
    deliveries = last_id * streams * subscribers
    return RunResult(
        deliveries_per_s=deliveries / elapsed,
        publishes_per_s=messages / elapsed,
        batch=messages / max(1, batches),
        cpu_us=cpu / messages * 1e6,
        per_statement=messages / statements if statements else None,
    )


def _round_trips(statistics: Callable[[], object] | None) -> int:
    """Append round trips so far: a Postgres store's statements, a Redis one's round trips."""
    if statistics is None:
        return 0
    record = statistics()
    count = getattr(record, "statements", None)
    if count is None:
        count = getattr(record, "round_trips", 0)
    return int(count)


def interleave(
    repeats: int, runs: Mapping[str, Callable[[], float | None]]
) -> dict[str, list[float]]:
    """Run each named callable ``repeats`` times, interleaved (ABAB…), so noise hits all.

    Returns the samples by name. A run that returns None (its system turned out to
    be unavailable) adds no sample.
    """
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            gc.collect()
            if (sample := run()) is not None:
                samples[name].append(sample)
    return samples


def memory_throughput(context: Context, backend: str) -> list[Row]:
    """P publishers -> S subscribers on the in-memory bus vs one bare channel hop."""
    sizes = context.sizes
    batch_sizes: list[float] = []
    messages_per_s: list[float] = []

    def chatbus_run() -> float:
        result = trio.run(
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
        batch_sizes.append(result.batch)
        messages_per_s.append(result.publishes_per_s)
        return result.deliveries_per_s

    samples = interleave(
        sizes.repeats,
        {
            "channel hop": lambda: baseline_channel_rate(
                sizes.memory_messages, sizes.baseline_channel_buffer
            ),
            "chatbus": chatbus_run,
        },
    )
    baseline, chatbus_rates = samples["channel hop"], samples["chatbus"]
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


# ---- Postgres: the pg-throughput workload, its raw baselines, the keyed variants ----


@dataclasses.dataclass(frozen=True, kw_only=True)
class PgShape:
    """The pg-throughput workload: callers per stream over streams, one publisher each."""

    streams: int
    callers: int
    #: Connections of the raw baselines: as many as chatbus's pool.
    connections: int

    @classmethod
    def from_sizes(cls, sizes: Sizes) -> PgShape:
        """64 callers over 8 streams unless ``--set`` says otherwise."""
        streams = sizes.pg_streams
        return cls(
            streams=streams,
            callers=max(1, sizes.pg_callers // streams),
            connections=_pg.chatbus_pool_size(),
        )

    def describe(self, messages: int) -> str:
        """The workload in a few words, for a row's note."""
        return (
            f"{self.streams * self.callers} callers over {self.streams} streams, {messages} msgs"
        )


def median_text(samples: Sequence[float]) -> str:
    """The (upper) median of ``samples`` with one decimal, for notes."""
    return f"{sorted(samples)[len(samples) // 2]:.1f}" if samples else "-"


@dataclasses.dataclass
class RunNotes:
    """What the chatbus runs of one variant said besides their rate (one item per run)."""

    batch: list[float] = dataclasses.field(default_factory=list)
    per_statement: list[float] = dataclasses.field(default_factory=list)
    cpu_us: list[float] = dataclasses.field(default_factory=list)

    def add(self, result: RunResult) -> None:
        """Record one run."""
        self.batch.append(result.batch)
        self.cpu_us.append(result.cpu_us)
        if result.per_statement is not None:
            self.per_statement.append(result.per_statement)

    def describe(self) -> str:
        """Medians for a row's note."""
        return (
            f"median batch {median_text(self.batch)}, {median_text(self.per_statement)} msgs"
            f" per statement, client CPU {median_text(self.cpu_us)} µs/msg"
        )

    def extra(self) -> dict[str, object]:
        """Every sample, for the JSON."""
        return {
            "mean_batch": self.batch,
            "msgs_per_statement": self.per_statement,
            "client_cpu_us_per_msg": self.cpu_us,
        }


def chatbus_pg_run(
    dsn: str,
    shape: PgShape,
    messages: int,
    notes: RunNotes,
    keys: _harness.KeyPlan = _harness.NO_KEYS,
) -> Callable[[], float]:
    """One chatbus Postgres run of the workload in a fresh schema; returns publishes/s.

    Each run adds its batch size, statements and client CPU to ``notes``.
    """

    def run() -> float:
        result = trio.run(
            functools.partial(
                _chatbus_run,
                "postgres",
                dsn,
                streams=shape.streams,
                publishers=1,
                subscribers=1,
                callers=shape.callers,
                total=messages,
                keys=keys,
            )
        )
        notes.add(result)
        return result.publishes_per_s

    return run


RAW_SINGLE = "raw 1/txn"


def raw_batch_name(sizes: Sizes) -> str:
    """The batched ceiling's name: ``raw 100/txn``."""
    return f"raw {sizes.pg_baseline_batch_size}/txn"


def raw_pg_runs(sizes: Sizes, dsn: str, shape: PgShape) -> dict[str, Callable[[], float]]:
    """The raw baselines by name: one message per transaction, and the batched ceiling."""

    def run(messages: int, per_transaction: int) -> float:
        return _pg.raw_throughput(
            dsn,
            messages=messages,
            per_transaction=per_transaction,
            connections=shape.connections,
            streams=shape.streams,
        )

    return {
        RAW_SINGLE: functools.partial(run, sizes.pg_baseline_single_messages, 1),
        raw_batch_name(sizes): functools.partial(
            run, sizes.pg_baseline_batch_messages, sizes.pg_baseline_batch_size
        ),
    }


def compare(
    *,
    scenario: str,
    metric: str,
    samples: Sequence[float],
    baselines: Mapping[str, Sequence[float]],
    note: str,
    extra: dict[str, object] | None = None,
) -> list[Row]:
    """One row per baseline for the same chatbus samples; the note goes on the first."""
    rows = []
    for index, (name, baseline_samples) in enumerate(baselines.items()):
        rows.append(
            measured(
                scenario=scenario,
                backend="postgres",
                metric=metric,
                unit="msg/s",
                samples=samples,
                baseline_name=name,
                baseline_samples=baseline_samples,
                target="report",
                note=note if index == 0 else "same chatbus runs",
                extra=extra if index == 0 else None,
            )
        )
    return rows


def postgres_throughput(context: Context, backend: str) -> list[Row]:
    """64 publish() callers over 8 streams vs raw psycopg, 1 and 100 msgs per txn."""
    sizes = context.sizes
    shape = PgShape.from_sizes(sizes)
    missing = context.problem("chatbus.postgres")
    notes = RunNotes()
    runs: dict[str, Callable[[], float | None]] = dict(raw_pg_runs(sizes, context.dsn, shape))
    if missing is None:
        runs["chatbus"] = chatbus_pg_run(context.dsn, shape, sizes.pg_messages, notes)
    samples = interleave(sizes.repeats, runs)
    return _pg_throughput_rows(sizes, shape, samples, notes, missing)


def _pg_throughput_rows(
    sizes: Sizes,
    shape: PgShape,
    samples: dict[str, list[float]],
    notes: RunNotes,
    missing: str | None,
) -> list[Row]:
    note = (
        f"{shape.describe(sizes.pg_messages)}, baseline: sync psycopg x {shape.connections} conns"
    )
    if notes.batch:
        note += f"; {notes.describe()}"
    if missing is not None:
        note = f"chatbus skipped: {missing}"
    chatbus_rates = samples.get("chatbus", [])
    batch_name = raw_batch_name(sizes)
    return [
        measured(
            scenario="pg-throughput",
            backend="postgres",
            metric="durable msgs/s",
            unit="msg/s",
            samples=chatbus_rates,
            baseline_name=RAW_SINGLE,
            baseline_samples=samples[RAW_SINGLE],
            target=">= 5x",
            min_ratio=5.0,
            note=note,
            extra={**notes.extra(), "connections": shape.connections},
        ),
        measured(
            scenario="pg-batch-ceiling",
            backend="postgres",
            metric="durable msgs/s",
            unit="msg/s",
            samples=chatbus_rates,
            baseline_name=batch_name,
            baseline_samples=samples[batch_name],
            target=">= 0.3x (aim)",
            min_ratio=0.3,
            note="same chatbus runs as pg-throughput",
        ),
    ]


def raw_same_concurrency_name(shape: PgShape) -> str:
    """The name of the raw baseline with the workload's own concurrency."""
    return f"raw {shape.streams} conns x {shape.callers}/txn"


def pg_keyed(context: Context, backend: str) -> list[Row]:
    """The pg-throughput workload keyed (and with retries) vs unkeyed and the raw baselines.

    Besides raw 1/txn and the batched ceiling (100/txn, 10 connections: 1,000
    messages in flight), a third raw baseline has the workload's own concurrency:
    one connection per stream, each transaction carrying one message per caller of
    the stream (64 in flight), which is what group commit could at best make of 64
    callers that each wait for their acknowledgement.
    """
    sizes, dsn = context.sizes, context.dsn
    shape = PgShape.from_sizes(sizes)
    retries = _harness.KeyPlan(keyed=True, retry_every=sizes.pg_retry_every)
    notes = {"unkeyed": RunNotes(), "keyed": RunNotes(), "retries": RunNotes()}
    same = raw_same_concurrency_name(shape)
    runs: dict[str, Callable[[], float | None]] = {
        **raw_pg_runs(sizes, dsn, shape),
        same: functools.partial(
            _pg.raw_throughput,
            dsn,
            messages=sizes.pg_keyed_messages,
            per_transaction=shape.callers,
            connections=shape.streams,
            streams=shape.streams,
        ),
        "unkeyed": chatbus_pg_run(dsn, shape, sizes.pg_keyed_messages, notes["unkeyed"]),
        "keyed": chatbus_pg_run(
            dsn, shape, sizes.pg_keyed_messages, notes["keyed"], _harness.KeyPlan(keyed=True)
        ),
        "retries": chatbus_pg_run(dsn, shape, sizes.pg_keyed_messages, notes["retries"], retries),
    }
    samples = interleave(sizes.repeats, runs)
    raw = {name: samples[name] for name in (RAW_SINGLE, raw_batch_name(sizes), same)}
    percent = 100 / sizes.pg_retry_every if sizes.pg_retry_every > 1 else 0
    workload = shape.describe(sizes.pg_keyed_messages)
    return [
        *compare(
            scenario="pg-keyed",
            metric="unkeyed msgs/s",
            samples=samples["unkeyed"],
            baselines=raw,
            note=f"{workload}, no keys (the same count as keyed); {notes['unkeyed'].describe()}",
            extra=notes["unkeyed"].extra(),
        ),
        *compare(
            scenario="pg-keyed",
            metric="keyed msgs/s",
            samples=samples["keyed"],
            baselines={"chatbus unkeyed": samples["unkeyed"], **raw},
            note=f"{workload}, a unique key on every publish; {notes['keyed'].describe()}",
            extra=notes["keyed"].extra(),
        ),
        *compare(
            scenario="pg-keyed",
            metric="retried publishes/s",
            samples=samples["retries"],
            baselines={"chatbus unkeyed": samples["unkeyed"], **raw},
            note=f"as keyed, but {percent:g} % of publishes repeat the caller's previous key"
            f" (each checked to return the original id); {notes['retries'].describe()}",
            extra=notes["retries"].extra(),
        ),
    ]


MEMORY = Scenario(
    name="memory",
    label="throughput",
    needs={"memory": ()},
    entry=memory_throughput,
    summary="in-memory bus, 4 publishers x 16 callers -> 4 subscribers vs a channel hop",
)
POSTGRES = Scenario(
    name="postgres",
    label="pg-throughput",
    needs={"postgres": ("postgres",)},  # the raw baselines run even without chatbus.postgres
    entry=postgres_throughput,
    summary="64 callers over 8 streams, durable, vs raw psycopg 1/txn and 100/txn",
)
PG_KEYED = Scenario(
    name="pg-keyed",
    label="pg-keyed",
    needs={"postgres": CHATBUS_POSTGRES},
    entry=pg_keyed,
    summary="the postgres workload with a key on every publish (and 10 % retries)",
)
