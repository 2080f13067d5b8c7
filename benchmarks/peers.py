"""Peers: the pg-throughput workload shape on NATS JetStream and Redis Streams.

Same shape as ``pg-throughput``: 64 callers over 8 streams, each publish
acknowledged before the caller's next one, one subscriber per stream receiving
everything; msgs/s from the first publish to the last receipt. Each peer run is a
subprocess (``benchmarks/_peer_child.py``, asyncio, started without importing this
package), so no event loop is shared with chatbus. Interleaved in the same rotation:
the raw psycopg baselines, chatbus Postgres unkeyed and chatbus Postgres keyed; each
chatbus figure is reported against every one of them. A third chatbus variant is a
diagnostic: unkeyed with ``synchronous_commit = off`` (acknowledged before the WAL
flush, as the peers acknowledge), to show what waiting for the flush costs.

A peer whose client is not installed or whose server is down is reported as
``skipped: <reason>`` and left out of the rotation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from psycopg.conninfo import make_conninfo

from . import _harness
from ._report import Row, skipped
from ._scenario import Context, Scenario
from .throughput import PgShape, RunNotes, chatbus_pg_run, compare, interleave, raw_pg_runs

CHILD = Path(__file__).resolve().with_name("_peer_child.py")

NO_FLUSH_WAIT = "unkeyed, synchronous_commit off"
#: The chatbus variants of the rotation, and how a row's note says what they are.
VARIANTS = {
    "unkeyed": "no keys",
    "keyed": "a unique key on every publish",
    NO_FLUSH_WAIT: "no keys, acknowledged before the WAL flush (diagnostic: what the"
    " flush costs; chatbus runs with the server's synchronous_commit)",
}

#: Peer name -> (what it needs, the baseline's name in the table).
PEERS = {
    "nats": (("nats-py", "nats"), "NATS JetStream"),
    "redis": (("redis-py", "redis"), "Redis Streams"),
}


class PeerRun:
    """Runs one peer's subprocess per call; after one skip, returns None for good."""

    def __init__(
        self,
        peer: str,
        context: Context,
        shape: PgShape,
        messages: int,
        *,
        url: str | None = None,
    ) -> None:
        """``url``: a server of the suite's own instead of the peer's configured one
        (then only the peer's client is checked)."""
        self.peer = peer
        self.url = url or context.peer_urls[peer]
        self.shape = shape
        self.per_caller = max(1, messages // (shape.streams * shape.callers))
        self.timeout = context.sizes.peers_timeout_seconds
        needs = PEERS[peer][0] if url is None else PEERS[peer][0][:1]
        self.problem: str | None = context.problem(*needs)
        self.infos: list[dict[str, object]] = []

    def __call__(self) -> float | None:
        if self.problem is not None:
            return None
        command = [
            sys.executable,
            "-I",  # not this package: its __init__ imports trio_asyncio, which patches asyncio
            str(CHILD),
            self.peer,
            self.url,
            f"--streams={self.shape.streams}",
            f"--callers={self.shape.callers}",
            f"--per-caller={self.per_caller}",
            f"--timeout={self.timeout}",
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=self.timeout + 30, check=False
            )
        except subprocess.TimeoutExpired:
            self.problem = f"{self.peer} run exceeded {self.timeout + 30:g} s"
            return None
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{self.peer} child failed ({done.returncode}): {error}") from None
        if "skipped" in result:
            self.problem = str(result["skipped"])
            return None
        self.infos.append(result["info"])
        return float(result["rate"])


def run(context: Context, backend: str) -> list[Row]:
    """chatbus Postgres unkeyed and keyed next to NATS, Redis and the raw baselines."""
    sizes, dsn = context.sizes, context.dsn
    shape = PgShape.from_sizes(sizes)
    messages = sizes.peers_messages
    peers = {name: PeerRun(name, context, shape, messages) for name in PEERS}
    pg_problem = context.problem("postgres")
    chatbus_problem = pg_problem or context.problem("chatbus.postgres")
    notes = {variant: RunNotes() for variant in VARIANTS}
    runs: dict[str, Callable[[], float | None]] = {}
    if pg_problem is None:
        runs.update(raw_pg_runs(sizes, dsn, shape))
    if chatbus_problem is None:
        runs["unkeyed"] = chatbus_pg_run(dsn, shape, messages, notes["unkeyed"])
        runs["keyed"] = chatbus_pg_run(
            dsn, shape, messages, notes["keyed"], _harness.KeyPlan(keyed=True)
        )
        # Diagnostic, not a way to run chatbus: the same, acknowledged before the WAL
        # flush, as a JetStream PubAck (and a Redis XADD reply) is. The gap between
        # this row and "unkeyed" is what waiting for the flush costs this workload.
        no_flush_wait = make_conninfo(dsn, options="-c synchronous_commit=off")
        runs[NO_FLUSH_WAIT] = chatbus_pg_run(no_flush_wait, shape, messages, notes[NO_FLUSH_WAIT])
    runs.update({PEERS[name][1]: peer for name, peer in peers.items()})
    samples = interleave(sizes.repeats, runs)
    return _rows(context, shape, samples, notes, peers, chatbus_problem)


def _rows(
    context: Context,
    shape: PgShape,
    samples: dict[str, list[float]],
    notes: dict[str, RunNotes],
    peers: dict[str, PeerRun],
    chatbus_problem: str | None,
) -> list[Row]:
    rows = [skipped("peers", name, peer.problem) for name, peer in peers.items() if peer.problem]
    variants = list(VARIANTS)
    if chatbus_problem is not None:  # the peers' own figures still show, as baselines
        rows.append(skipped("peers", "postgres", chatbus_problem))
        variants = ["unkeyed"]
    baselines = {
        name: values for name, values in samples.items() if name not in VARIANTS and values
    }
    workload = shape.describe(context.sizes.peers_messages)
    for variant in variants:
        note = (
            f"chatbus Postgres, {workload}, {VARIANTS[variant]}; {notes[variant].describe()};"
            " peers unkeyed, each in its own process"
        )
        rows += compare(
            scenario="peers",
            metric=f"{variant} msgs/s",
            samples=samples.get(variant, []),
            baselines=baselines,
            note=note if chatbus_problem is None else "chatbus skipped (above)",
            extra={
                **notes[variant].extra(),
                "peer_info": {name: peer.infos for name, peer in peers.items()},
            },
        )
    return rows


SCENARIO = Scenario(
    name="peers",
    label="peers",
    needs={"postgres": ()},  # each part checks its own needs: a missing peer is one row
    entry=run,
    summary="the postgres workload on NATS JetStream and Redis Streams (each part skips alone)",
)
