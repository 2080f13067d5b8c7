"""Test support for the Redis backend's fault tests: buses on our own servers, ledgers.

* :func:`need_redis` skips a test module when local servers cannot be started here or
  ``chatbus.redis`` cannot be imported — or fails it when ``CHATBUS_REQUIRE_REDIS=1``.
* :func:`open_redis_bus` opens one bus (one "process": its own connections and
  listener) on a URL under a key prefix; :func:`unique_prefix` makes a fresh prefix.
* :class:`Ledger` publishes with retries (same key) and remembers what was
  acknowledged; :meth:`Ledger.check` compares it with the stored stream.
* :func:`lose_reply` runs a call whose request the server executes and whose reply
  it never sends (the client's connection is killed in between).
* :func:`open_topology` starts a standalone server or a 3-master cluster by name.
* :func:`receive_across_resets` does the same, resuming after a HistoryReset.
* :func:`receive_in_order` consumes a subscription, failing at the first id out of
  order; :func:`stream_slot` finds the cluster slot a stream's keys live in.
"""

from __future__ import annotations

import functools
import importlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

import chatbus

from .redis_servers import (
    AdminConnection,
    Aof,
    RedisCluster,
    RedisServer,
    binaries_problem,
    open_cluster,
    open_standalone,
)

#: Errors after which a keyed publish is retried with the same key (safe by design).
RETRYABLE = (chatbus.StoreError, chatbus.OutcomeUnknown)


@functools.cache
def _redis_problem() -> str | None:
    if (problem := binaries_problem()) is not None:
        return problem
    try:
        importlib.import_module("chatbus.redis")
    except ImportError as exc:
        return f"chatbus.redis cannot be imported: {exc}"
    return None


def need_redis() -> None:
    """Skip the calling test module if local Redis servers or ``chatbus.redis`` are missing.

    Called at module level (a skip raised inside a pytest-trio test loses its
    reason); with ``CHATBUS_REQUIRE_REDIS=1`` (CI) the module fails to collect instead.
    """
    problem = _redis_problem()
    if problem is not None:
        if os.environ.get("CHATBUS_REQUIRE_REDIS") == "1":
            pytest.fail(f"Redis required (CHATBUS_REQUIRE_REDIS=1): {problem}", pytrace=False)
        pytest.skip(problem, allow_module_level=True)


def unique_prefix() -> str:
    """A fresh key prefix, unique across processes and runs (no glob characters)."""
    return f"cbtest_{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def open_redis_pair(
    url: str, *, prefix: str, **options: Any
) -> AsyncIterator[tuple[chatbus.Store, chatbus.Notifier]]:
    """``chatbus.redis.open_redis(url, prefix=prefix, **options)``."""
    from chatbus.redis import open_redis

    async with open_redis(url, prefix=prefix, **options) as pair:
        yield pair


@asynccontextmanager
async def open_redis_bus(
    url: str,
    *,
    prefix: str,
    redis_options: dict[str, Any] | None = None,
    **bus_options: Any,
) -> AsyncIterator[chatbus.Bus]:
    """A bus with its own Redis connections and listener: another "process"."""
    async with (
        open_redis_pair(url, prefix=prefix, **(redis_options or {})) as (store, notifier),
        chatbus.open_bus(store=store, notifier=notifier, **bus_options) as bus,
    ):
        yield bus


@attrs.frozen(kw_only=True)
class Topology:
    """A running standalone server or cluster: its URL and how to reach every node."""

    url: str
    standalone: RedisServer | None = None
    cluster: RedisCluster | None = None

    def nodes(self) -> list[RedisServer]:
        """Every running server."""
        if self.cluster is not None:
            return [node for node in self.cluster.nodes if node.running]
        assert self.standalone is not None
        return [self.standalone]

    def kill_clients(self, *filters: object) -> int:
        """``CLIENT KILL <filters>`` on every node; how many connections were killed."""
        return sum(int(node.command("CLIENT", "KILL", *filters)) for node in self.nodes())


TOPOLOGIES = ("standalone", "cluster")


@asynccontextmanager
async def open_topology(name: str, *, aof: Aof = "no") -> AsyncIterator[Topology]:
    """``"standalone"``: one server; ``"cluster"``: 3 masters. Stopped afterwards."""
    if name == "standalone":
        async with open_standalone(aof=aof) as server:
            yield Topology(url=server.url, standalone=server)
    else:
        async with open_cluster(masters=3, aof=aof) as nodes:
            yield Topology(url=nodes.url, cluster=nodes)


async def receive_in_order(
    bus: chatbus.Bus,
    stream: str,
    count: int,
    *,
    task_status: trio.TaskStatus[list[chatbus.Message]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Subscribe from 0; keep messages until ``count``, failing at the first out of order.

    Started with ``nursery.start``: hands the (growing) list over once subscribed.
    """
    received: list[chatbus.Message] = []
    async with bus.open_subscriber(stream, after=0) as sub:
        task_status.started(received)
        async for message in sub:
            expected = len(received) + 1
            assert message.id == expected, f"{stream}: got id {message.id}, expected {expected}"
            received.append(message)
            if len(received) == count:
                return


async def receive_across_resets(
    bus: chatbus.Bus,
    stream: str,
    count: int,
    resets: list[chatbus.HistoryReset],
    *,
    task_status: trio.TaskStatus[list[chatbus.Message]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`receive_in_order`, resuming after a :class:`chatbus.HistoryReset`.

    What a client does with a reset it can afford to trust its cursor through (only
    when nothing was lost, as in a slot migration): note it in ``resets``, then
    subscribe again after the last id it got, in the stream's new epoch.
    """
    received: list[chatbus.Message] = []
    started = False
    epoch: int | None = None
    while len(received) < count:
        try:
            async with bus.open_subscriber(stream, after=len(received), epoch=epoch) as sub:
                if not started:
                    task_status.started(received)
                    started = True
                async for message in sub:
                    expected = len(received) + 1
                    assert message.id == expected, f"got id {message.id}, expected {expected}"
                    received.append(message)
                    if len(received) == count:
                        return
        except chatbus.HistoryReset as reset:
            resets.append(reset)
            epoch = (await bus.stream_info(stream)).epoch


@attrs.define(eq=False)
class Ledger:
    """Keyed publishes retried until acknowledged; what was acknowledged, by key."""

    #: key -> (id, body) as acknowledged.
    acked: dict[str, tuple[int, Any]] = attrs.Factory(dict)
    #: Publishes that failed at least once (and were retried).
    retries: int = 0

    async def publish(self, pub: chatbus.Publisher, body: Any, key: str) -> chatbus.Message:
        """Publish with ``key`` until acknowledged (the test's ``fail_after`` bounds it)."""
        while True:
            try:
                message = await pub.publish(body, key=key)
            except RETRYABLE:
                self.retries += 1
                await trio.sleep(0.05)
                continue
            assert message.key == key and message.body == body, message
            self.acked[key] = (message.id, body)
            return message

    def check(self, stored: list[chatbus.Message]) -> None:
        """Dense ids; every key stored once; every acknowledged publish at its id."""
        assert [m.id for m in stored] == list(range(1, len(stored) + 1)), "ids not dense"
        keys = [m.key for m in stored if m.key is not None]
        assert len(keys) == len(set(keys)), "a key stored twice"
        by_id = {m.id: m for m in stored}
        for key, (message_id, body) in self.acked.items():
            message = by_id.get(message_id)
            assert message is not None, f"acknowledged {key} (id {message_id}) lost"
            assert (message.key, message.body) == (key, body), (
                f"id {message_id} was acknowledged as {key}, stored as {message.key}"
            )


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds; bound it with the test's ``trio.fail_after``."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def read_all(bus: chatbus.Bus, stream: str) -> list[chatbus.Message]:
    """Every message of ``stream``, in pages."""
    messages: list[chatbus.Message] = []
    while page := await bus.read(stream, after=len(messages), limit=1000):
        messages += page
    return messages


def stream_slot(nodes: RedisCluster, prefix: str) -> int:
    """The slot of the keys under ``prefix`` (one stream's): there must be exactly one.

    All of a stream's keys must share one hash slot (its script touches them all);
    a prefix holding one stream therefore has keys in exactly one slot.
    """
    keys = nodes.keys(f"{prefix}*")
    assert keys, f"no keys under {prefix}"
    slots = {nodes.keyslot(key) for key in keys}
    assert len(slots) == 1, f"one stream's keys in several slots: {sorted(slots)}"
    return slots.pop()


async def lose_reply(server: RedisServer, call: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``call()`` so that ``server`` executes its request but never replies.

    The server is stopped (SIGSTOP) while ``call`` sends its request and while an
    already open admin connection sends ``CLIENT KILL TYPE normal SKIPME yes``; once
    resumed, the server reads both in one event-loop turn, runs the request, then
    kills the client's connections before the reply is written. The client sees its
    connection lost after its command ran: what a retrying client turns into a second
    run. Returns ``call()``'s result, or the exception it raised. (The kill can land
    before the request is read, rarely; callers repeat the dance a few times.)
    """
    admin = AdminConnection(server.port)
    outcome: list[Any] = []

    async def run() -> None:
        try:
            outcome.append(await call())
        except Exception as exc:
            outcome.append(exc)

    try:
        server.pause()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await trio.sleep(0.1)  # the request is in the server's socket buffer
                nursery.start_soon(
                    trio.to_thread.run_sync,
                    admin.command,
                    "CLIENT",
                    "KILL",
                    "TYPE",
                    "normal",
                    "SKIPME",
                    "yes",
                )
                await trio.sleep(0.1)
                server.resume()
        finally:
            server.resume()
    finally:
        admin.close()
    return outcome[0]
