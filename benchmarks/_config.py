"""Run configuration: sizes for the quick (CI smoke) and full modes."""

from __future__ import annotations

import dataclasses
import os

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def default_peer_url(peer: str, default: str) -> str:
    """The URL of ``peer`` from CHATBUS_BENCH_<PEER>_URL, else ``default``."""
    return os.environ.get(f"CHATBUS_BENCH_{peer.upper()}_URL") or default


def default_dsn() -> str:
    """The DSN from CHATBUS_BENCH_DSN, else CHATBUS_TEST_DSN, else the local test DB."""
    return os.environ.get("CHATBUS_BENCH_DSN") or os.environ.get("CHATBUS_TEST_DSN") or DEFAULT_DSN


@dataclasses.dataclass(kw_only=True)
class Sizes:
    """Every tunable size of the suite; ``--set name=value`` overrides one."""

    #: Repeats per measurement (the table reports medians).
    repeats: int = 5
    # memory throughput
    memory_messages: int = 100_000
    memory_publishers: int = 4
    memory_subscribers: int = 4
    memory_streams: int = 1
    #: Concurrent publish() callers per publisher (group commit needs concurrency).
    memory_callers_per_publisher: int = 16
    #: Buffer size of the baseline trio memory channel.
    baseline_channel_buffer: int = 256
    # postgres throughput
    pg_messages: int = 20_000
    pg_streams: int = 8
    pg_callers: int = 64
    pg_baseline_single_messages: int = 6_000
    pg_baseline_batch_messages: int = 100_000
    pg_baseline_batch_size: int = 100
    # pg-keyed: the pg-throughput shape with a key on every publish
    pg_keyed_messages: int = 20_000
    #: In the retry variant every n-th publish of a caller repeats its previous key.
    pg_retry_every: int = 10
    # peers: the same shape on NATS JetStream and Redis Streams, each in a subprocess
    peers_messages: int = 20_000
    #: Most seconds one peer run (subprocess) may take.
    peers_timeout_seconds: float = 120.0
    # redis: the same shape on chatbus Redis (servers of the suite's own)
    redis_messages: int = 20_000
    # statement: one-row reads timed per way of talking to Postgres
    statement_count: int = 3_000
    #: The merged append statement timed keyed and unkeyed: streams x drafts each.
    statement_streams: int = 4
    statement_drafts: int = 16
    # latency
    latency_rate: float = 1_000.0
    latency_seconds: float = 5.0
    latency_warmup_seconds: float = 1.0
    # fan-out
    fanout_subscribers: int = 1_000
    fanout_messages: int = 1_000
    fanout_pg_messages: int = 96
    fanout_callers: int = 16
    # scale
    scale_subscriptions: int = 10_000
    scale_pg_subscriptions: int = 10_000
    #: How long the scale scenario waits for every subscription's start-up read.
    scale_settle_seconds: float = 60.0
    # events: emit -> receipt (memory; Postgres cross-process), latency, durable alongside
    events_memory: int = 200_000
    events_postgres: int = 100_000
    #: The emitter of a burst checkpoints after this many emits (emit never waits).
    events_chunk: int = 64
    #: Offered events/s of the latency run and of the events beside durable messages.
    events_rate: float = 2_000.0
    events_latency_seconds: float = 5.0
    events_latency_warmup_seconds: float = 1.0
    events_durable_messages: int = 20_000
    #: The pacer of the events beside durable messages wakes at most this often
    #: (seconds), emitting what is due (see benchmarks.events.emit_paced).
    events_tick: float = 0.002


def quick_sizes() -> Sizes:
    """Small sizes for the CI smoke run (well under two minutes in total)."""
    return Sizes(
        repeats=3,
        memory_messages=20_000,
        pg_messages=8_000,
        pg_baseline_single_messages=1_000,
        pg_baseline_batch_messages=40_000,
        pg_keyed_messages=2_000,
        peers_messages=1_000,
        peers_timeout_seconds=30.0,
        redis_messages=2_000,
        statement_count=1_000,
        latency_seconds=2.0,
        latency_warmup_seconds=0.5,
        fanout_messages=200,
        fanout_pg_messages=32,
        scale_subscriptions=10_000,
        scale_pg_subscriptions=2_000,
        scale_settle_seconds=20.0,
        events_memory=20_000,
        events_postgres=10_000,
        events_latency_seconds=1.0,
        events_latency_warmup_seconds=0.25,
        events_durable_messages=4_000,
    )


def apply_override(sizes: Sizes, assignment: str) -> None:
    """Apply one ``name=value`` override to ``sizes``, converting to the field's type."""
    name, sep, text = assignment.partition("=")
    name = name.strip()
    fields = {field.name: field for field in dataclasses.fields(sizes)}
    if not sep or name not in fields:
        raise ValueError(f"unknown size {name!r}; known: {', '.join(sorted(fields))}")
    current = getattr(sizes, name)
    value = type(current)(text.strip().replace("_", ""))
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    setattr(sizes, name, value)
