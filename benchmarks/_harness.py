"""Shared chatbus plumbing: consumers that count to a target, publisher drivers, keys.

Buses come from ``_backends.open_backend_bus``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

import chatbus

#: The repository root: where ``python -m benchmarks.…`` children start.
REPO_ROOT = Path(__file__).resolve().parent.parent


async def count_until(
    bus: chatbus.Bus,
    stream: str,
    last_id: int,
    done: list[float],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Subscribe to ``stream`` from 0, consume up to ``last_id``, append the finish time.

    Started with ``nursery.start``: returns to the starter once subscribed.
    """
    async with bus.open_subscriber(stream) as subscriber:
        task_status.started()
        expected = 1
        async for message in subscriber:
            if message.id != expected:
                raise AssertionError(f"{stream}: got id {message.id}, expected {expected}")
            expected += 1
            if message.id >= last_id:
                break
    done.append(time.perf_counter())


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyPlan:
    """Which idempotency key each publish carries.

    ``keyed=False``: none. ``keyed=True``: a key unique to the caller and index,
    except that with ``retry_every=n`` every n-th publish of a caller repeats the key
    (and body) of that caller's previous publish, already committed: a retry after
    a lost reply, which must return the original message and store nothing.
    """

    keyed: bool = False
    retry_every: int = 0

    def source(self, i: int) -> int:
        """The index whose key and body publish ``i`` carries."""
        if self.retry_every > 1 and i % self.retry_every == self.retry_every - 1:
            return i - 1
        return i

    def new_messages(self, count: int) -> int:
        """How many of ``count`` publishes of one caller store a new message."""
        return len({self.source(i) for i in range(count)})


NO_KEYS = KeyPlan()


async def publish_many(
    publisher: chatbus.Publisher, count: int, tag: int, keys: KeyPlan = NO_KEYS
) -> None:
    """Publish ``count`` small chat-like messages, one awaited publish at a time."""
    if not keys.keyed:
        for i in range(count):
            await publisher.publish({"n": tag, "i": i, "text": "hello"})
        return
    previous: chatbus.Message | None = None
    for i in range(count):
        j = keys.source(i)
        message = await publisher.publish({"n": tag, "i": j, "text": "hello"}, key=f"{tag}-{j}")
        if j != i and (previous is None or message.id != previous.id):
            raise AssertionError(f"retry of key {tag}-{j} got id {message.id}, not the original")
        previous = message


async def drive_publishers(
    bus: chatbus.Bus,
    streams: list[str],
    publishers_per_stream: int,
    callers: int,
    total: int,
    keys: KeyPlan = NO_KEYS,
) -> list[chatbus.PublisherStatistics]:
    """Open publishers and run ``callers`` concurrent publish loops per publisher.

    ``total`` messages are spread evenly over streams, publishers and callers (the
    caller must make it divisible). Returns each publisher's final statistics.
    """
    per_caller = total // (len(streams) * publishers_per_stream * callers)
    stats: list[chatbus.PublisherStatistics] = []

    async def run_publisher(stream: str) -> None:
        async with bus.open_publisher(stream) as publisher:
            async with trio.open_nursery() as nursery:
                for tag in range(callers):
                    nursery.start_soon(publish_many, publisher, per_caller, tag, keys)
            stats.append(publisher.statistics())

    async with trio.open_nursery() as nursery:
        for stream in streams:
            for _ in range(publishers_per_stream):
                nursery.start_soon(run_publisher, stream)
    return stats


def per_stream_total(total: int, streams: int, publishers: int, callers: int) -> int:
    """Round ``total`` down so it splits evenly; return the messages per stream."""
    per_caller = max(1, total // (streams * publishers * callers))
    return per_caller * publishers * callers


@dataclasses.dataclass
class SubscriberProcess:
    """A running ``benchmarks._latency_child``; :meth:`result` waits for its report."""

    process: trio.Process
    output: bytes = b""

    async def result(self) -> dict[str, object]:
        """Read to the end (the child exits after the end marker); its JSON report."""
        assert self.process.stdout is not None
        with trio.fail_after(60):
            while chunk := await self.process.stdout.receive_some():
                self.output += chunk
            await self.process.wait()
        report: dict[str, object] = json.loads(self.output.split(b"ready\n", 1)[1])
        return report


@contextlib.asynccontextmanager
async def subscriber_process(
    dsn: str,
    schema: str,
    stream: str,
    *,
    events: bool = False,
    backend: str = "postgres",
    plain_notices: bool = False,
) -> AsyncIterator[SubscriberProcess]:
    """Start the subscriber child on ``stream`` and wait until it is subscribed.

    ``backend`` is ``postgres`` (``dsn`` and ``schema``) or ``redis`` (``dsn`` is the
    server's URL, ``schema`` the key prefix). ``plain_notices``: the child takes no
    messages from notices (it reads the store after each).

    The child is killed on the way out if it is still running.
    """
    command = [
        sys.executable,
        "-m",
        "benchmarks._latency_child",
        "--dsn",
        dsn,
        "--schema",
        schema,
        "--stream",
        stream,
        "--backend",
        backend,
        *(["--events"] if events else []),
        *(["--plain-notices"] if plain_notices else []),
    ]
    process = await trio.lowlevel.open_process(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    child = SubscriberProcess(process)
    try:
        assert process.stdout is not None
        with trio.fail_after(30):
            while b"ready\n" not in child.output:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError("subscriber child exited before subscribing")
                child.output += chunk
        yield child
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
