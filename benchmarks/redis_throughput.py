"""Redis throughput: the pg-throughput workload on chatbus Redis, next to Redis Streams.

The workload is the pg-throughput shape (64 ``publish()`` callers over 8 streams, one
publisher per stream, every message committed and received by a subscriber of its
stream in the same process; msgs/s from the first publish to the last receipt). The
suite starts its own servers (``_redis``): a standalone server with AOF ``everysec``
and a 3-master Cluster with the same setting, on ports of their own. Interleaved in
one rotation:

* chatbus Redis standalone, unkeyed and with a unique key on every publish;
* the Redis Streams peer on the same standalone server: one ``XADD`` per publish,
  one ``XREAD BLOCK`` reader per stream (``_peer_child.py``, redis-py asyncio, in its
  own process), the baseline of the issue's ">= 5x" target;
* chatbus Redis on the Cluster, unkeyed, with each master's load (script calls, all
  commands, server CPU from ``INFO commandstats`` and ``INFO cpu``) measured around
  every run: how the work spreads over masters, i.e. how throughput would grow with
  machines.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Callable

import trio

from . import _harness, _redis
from ._backends import CHATBUS_REDIS
from ._config import Sizes
from ._report import Row, measured, skipped
from ._scenario import Context, Scenario
from .peers import PeerRun
from .throughput import PgShape, _chatbus_run, interleave, median_text

PEER = "Redis Streams (1 XADD/publish)"


def chatbus_redis_run(
    url: str,
    shape: PgShape,
    messages: int,
    batches: list[float],
    keys: _harness.KeyPlan = _harness.NO_KEYS,
    cpu: list[float] | None = None,
) -> Callable[[], float]:
    """One chatbus Redis run of the workload under a fresh key prefix; publishes/s.

    ``cpu``: gets the bus process's CPU µs per message of each run (publishers,
    subscribers and store in one process: on this machine its CPU, not the server's,
    bounds the rate)."""

    def run() -> float:
        result = trio.run(
            functools.partial(
                _chatbus_run,
                "redis",
                url,
                streams=shape.streams,
                publishers=1,
                subscribers=1,
                callers=shape.callers,
                total=messages,
                keys=keys,
            )
        )
        batches.append(result.batch)
        if cpu is not None:
            cpu.append(result.cpu_us)
        return result.publishes_per_s

    return run


def with_load(
    run: Callable[[], float], servers: list[object], loads: list[list[_redis.Load]]
) -> Callable[[], float]:
    """``run``, appending each server's load during it to ``loads``."""

    def measured_run() -> float:
        with _redis.measure_load(servers) as load:
            rate = run()
        loads.append(load)
        return rate

    return measured_run


def _shard_note(loads: list[list[_redis.Load]]) -> str:
    """Per-master share of script calls and server CPU, medians over the runs."""
    if not loads:
        return ""
    masters = len(loads[0])
    shares, cpus = [], []
    for index in range(masters):
        shares.append(
            statistics.median(
                run[index].scripts / max(1, sum(load.scripts for load in run)) for run in loads
            )
        )
        cpus.append(statistics.median(run[index].cpu for run in loads))
    busiest = max(shares)
    return (
        f"per master: script calls {' / '.join(f'{s:.0%}' for s in shares)},"
        f" server CPU {' / '.join(f'{c:.2f}' for c in cpus)} s per run;"
        f" the busiest master carries {busiest:.0%}, so with one master per machine"
        f" throughput grows until that one saturates (about {1 / busiest:.1f}x one master's"
        " rate for these 8 streams; more streams spread more evenly)"
    )


def run(context: Context, backend: str) -> list[Row]:
    """Standalone unkeyed and keyed vs the one-XADD peer; 3-master Cluster vs standalone."""
    sizes = context.sizes
    shape = PgShape.from_sizes(sizes)
    messages = sizes.redis_messages
    with _redis.standalone() as server, _redis.cluster(masters=3) as nodes:
        batches: dict[str, list[float]] = {"unkeyed": [], "keyed": [], "cluster": []}
        cpu: dict[str, list[float]] = {"unkeyed": [], "keyed": [], "cluster": []}
        loads: list[list[_redis.Load]] = []
        peer = PeerRun("redis", context, shape, messages, url=server.url)
        runs: dict[str, Callable[[], float | None]] = {
            "unkeyed": chatbus_redis_run(
                server.url, shape, messages, batches["unkeyed"], cpu=cpu["unkeyed"]
            ),
            "keyed": chatbus_redis_run(
                server.url,
                shape,
                messages,
                batches["keyed"],
                _harness.KeyPlan(keyed=True),
                cpu=cpu["keyed"],
            ),
            PEER: peer,
            "cluster": with_load(
                chatbus_redis_run(
                    nodes.url, shape, messages, batches["cluster"], cpu=cpu["cluster"]
                ),
                nodes.masters(),
                loads,
            ),
        }
        samples = interleave(sizes.repeats, runs)
        settings = _redis.persistence(server)
    return _rows(sizes, shape, samples, batches, cpu, loads, peer, settings)


def _rows(
    sizes: Sizes,
    shape: PgShape,
    samples: dict[str, list[float]],
    batches: dict[str, list[float]],
    cpu: dict[str, list[float]],
    loads: list[list[_redis.Load]],
    peer: PeerRun,
    settings: dict[str, str],
) -> list[Row]:
    workload = shape.describe(sizes.redis_messages)
    aof = f"AOF appendfsync {settings.get('appendfsync', '?')}"
    rows: list[Row] = []
    if peer.problem:
        rows.append(skipped("redis-throughput", "Redis Streams", peer.problem))
    for variant, keys in (("unkeyed", "no keys"), ("keyed", "a unique key on every publish")):
        note = (
            f"chatbus Redis standalone ({aof}), {workload}, {keys};"
            f" median batch {median_text(batches[variant])};"
            f" bus CPU {median_text(cpu[variant])} µs/msg"
        )
        rows.append(
            measured(
                scenario="redis-throughput",
                backend="redis",
                metric=f"{variant} msgs/s",
                unit="msg/s",
                samples=samples[variant],
                target=">= 30,000",
                min_value=30_000,
                note=note,
                extra={"mean_batch": batches[variant], "cpu_us": cpu[variant], "server": settings},
            )
        )
        rows.append(
            measured(
                scenario="redis-throughput",
                backend="redis",
                metric=f"{variant} vs peer",
                unit="msg/s",
                samples=samples[variant],
                baseline_name=PEER,
                baseline_samples=samples[PEER],
                target=">= 5x",
                min_ratio=5.0,
                note="same chatbus runs; the peer on the same server, in its own process"
                if variant == "unkeyed"
                else "",
                extra={"peer_info": peer.infos} if variant == "unkeyed" else None,
            )
        )
    rows.append(
        measured(
            scenario="redis-cluster",
            backend="redis",
            metric="unkeyed msgs/s",
            unit="msg/s",
            samples=samples["cluster"],
            baseline_name="standalone",
            baseline_samples=samples["unkeyed"],
            target=">= 0.7x",
            min_ratio=0.7,
            note=f"3 masters ({aof}) on this machine, {workload};"
            f" median batch {median_text(batches['cluster'])};"
            f" bus CPU {median_text(cpu['cluster'])} µs/msg; {_shard_note(loads)}",
            extra={
                "loads": [[dataclasses.asdict(load) for load in run] for run in loads],
                "cpu_us": cpu["cluster"],
            },
        )
    )
    return rows


SCENARIO = Scenario(
    name="redis",
    label="redis-throughput",
    needs={"redis": CHATBUS_REDIS},
    entry=run,
    summary="the postgres workload on chatbus Redis (standalone AOF everysec, keyed and"
    " unkeyed) vs one XADD per publish; a 3-master Cluster vs standalone, per-shard load",
)
