"""The Redis store under faults: lost replies, a server down or frozen, hostile names.

Each test starts the servers it needs (``support.redis_servers``) and is bounded by
an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import time

import coredis.exceptions
import pytest
import trio

import chatbus
from chatbus._message import make_draft

from support.redis_bus import (
    TOPOLOGIES,
    eventually,
    lose_reply,
    need_redis,
    open_redis_bus,
    open_redis_pair,
    open_topology,
    read_all,
    receive_across_resets,
    receive_in_order,
    stream_slot,
    unique_prefix,
)
from support.redis_servers import open_standalone

pytestmark = pytest.mark.redis
need_redis()


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_append_whose_reply_is_lost_is_never_run_twice(topology: str) -> None:
    """The server runs an unkeyed append, then kills the connection before replying.

    coredis retries a command after a connection error by default: for an append that
    is a second run, a second copy of each message. Whatever the store does about it,
    each body must be stored once (or, after a StoreError, not at all).
    """
    rounds = 6
    with trio.fail_after(60):
        async with open_topology(topology) as world:
            prefix = unique_prefix()
            async with open_redis_pair(world.url, prefix=prefix) as (store, _):
                await store.append("lost", [make_draft("first", None, max_body_bytes=1000)])
                server = world.standalone
                if world.cluster is not None:
                    server = world.cluster.master_for_slot(stream_slot(world.cluster, prefix))
                assert server is not None
                outcomes = []
                for round_ in range(rounds):
                    drafts = [
                        make_draft({"round": round_, "i": i}, None, max_body_bytes=1000)
                        for i in range(3)
                    ]
                    outcomes.append(
                        await lose_reply(server, lambda d=drafts: store.append("lost", d))
                    )
            async with open_redis_bus(world.url, prefix=prefix) as bus:
                stored = await read_all(bus, "lost")
    assert [m.id for m in stored] == list(range(1, len(stored) + 1))
    bodies = [m.body for m in stored[1:]]
    for round_, outcome in enumerate(outcomes):
        copies = [body for body in bodies if body["round"] == round_]
        if isinstance(outcome, list):  # acknowledged: stored once, as returned
            assert (
                [m.body for m in outcome]
                == copies
                == [{"round": round_, "i": i} for i in range(3)]
            )
            assert [m.id for m in outcome] == [m.id for m in stored if m.body in copies]
        elif isinstance(outcome, chatbus.OutcomeUnknown):  # once or not at all
            assert len(copies) in (0, 3), copies
        else:
            assert isinstance(outcome, chatbus.StoreError), repr(outcome)
            assert copies == [], f"round {round_}: StoreError, yet stored: {copies}"
        assert len(copies) == len({str(body) for body in copies}), f"round {round_} stored twice"


async def test_redis_down_is_a_clear_store_error_soon_and_recovery_needs_no_restart() -> None:
    with trio.fail_after(90):
        async with open_standalone(aof="everysec") as server:
            prefix = unique_prefix()
            async with (
                open_redis_bus(server.url, prefix=prefix) as bus,
                open_redis_bus(server.url, prefix=prefix) as watching,
                trio.open_nursery() as nursery,
            ):
                # Fast mode: a restart may start a new epoch (documented); a subscriber
                # then gets a HistoryReset, never a claim that the stream was deleted.
                resets: list[chatbus.HistoryReset] = []
                received = await nursery.start(
                    receive_across_resets, watching, "outage", 3, resets
                )
                await bus.publish("outage", "before", key="k1")
                await trio.to_thread.run_sync(server.stop)  # SHUTDOWN: the AOF is flushed
                # Down, not going down: the clients have had the server's FIN for a while
                # (a request racing the shutdown itself may rightly be OutcomeUnknown).
                await trio.sleep(0.5)
                attempts = {
                    "append": lambda: bus.publish("outage", "during", key="k2"),
                    "read": lambda: bus.read("outage"),
                }
                for operation, attempt in attempts.items():
                    started = time.monotonic()
                    with pytest.raises(chatbus.StoreError, match=operation):  # names it
                        await attempt()
                    elapsed = time.monotonic() - started
                    assert elapsed < 10, f"{operation}: StoreError after {elapsed:.1f} s"
                await trio.to_thread.run_sync(server.start)  # same port, same folder
                # The same buses recover: no restart, the history kept.
                with trio.fail_after(30):
                    while True:
                        try:
                            await bus.publish("outage", "during", key="k2")
                            break
                        except (chatbus.StoreError, chatbus.OutcomeUnknown):
                            await trio.sleep(0.1)
                await bus.publish("outage", "after", key="k3")
                with trio.fail_after(30):
                    await eventually(lambda: len(received) == 3)
            assert [m.body for m in received] == ["before", "during", "after"]
            for reset in resets:
                assert not isinstance(reset, chatbus.StreamDeleted), f"not deleted: {reset}"


async def test_frozen_redis_fails_a_publish_within_its_command_timeout() -> None:
    """A server that keeps the connection but never answers (SIGSTOP): no long hang.

    ``command_timeout`` is documented as the seconds a command's reply may take; a
    publish to a frozen server must give up about then (re-running the batch against
    a server that did not answer the first time only multiplies the wait).
    """
    timeout = 1.0
    with trio.fail_after(60):
        async with open_standalone() as server:
            options = {"command_timeout": timeout}
            async with open_redis_bus(
                server.url, prefix=unique_prefix(), redis_options=options
            ) as bus:
                await bus.publish("frozen", "before")
                server.pause()
                try:
                    started = time.monotonic()
                    with pytest.raises((chatbus.StoreError, chatbus.OutcomeUnknown)):
                        await bus.publish("frozen", "during")
                    elapsed = time.monotonic() - started
                    assert elapsed < 2 * timeout + 1, f"gave up after {elapsed:.1f} s"
                finally:
                    server.resume()
                with trio.fail_after(20):
                    while True:
                        try:
                            await bus.publish("frozen", "after")
                            break
                        except (chatbus.StoreError, chatbus.OutcomeUnknown):
                            await trio.sleep(0.1)


#: Valid names that break naive key building: hash tag braces (an empty tag, a tag
#: cut short, one in the middle), glob characters (SCAN/KEYS patterns), separators,
#: whitespace and control characters, quotes, multi-byte text, the longest name.
HOSTILE_NAMES = [
    "{",
    "}",
    "{}",
    "}{",
    "{a}",
    "{a}b",
    "a{b}c",
    "a}b{c",
    "x}:y",
    "{{a}}",
    "*",
    "a*",
    "ab",
    "a?",
    "a[b]",
    "a:b",
    "a b\tc\nd\re",
    "\\",
    "'\"; DROP",
    "ström ☃ 🎉",
    "\u202eevil",
    "ü" * 256,
    "🎉" * 256,
]


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_hostile_stream_names_are_separate_streams(topology: str) -> None:
    with trio.fail_after(90):
        async with open_topology(topology) as world:
            prefix = unique_prefix()
            async with (
                open_redis_bus(world.url, prefix=prefix) as bus,
                open_redis_bus(world.url, prefix=prefix, poll_interval=None) as other,
                trio.open_nursery() as nursery,
            ):
                received = {
                    name: await nursery.start(receive_in_order, other, name, 3)
                    for name in HOSTILE_NAMES
                }
                for round_ in range(3):
                    async with trio.open_nursery() as publishers:
                        for index, name in enumerate(HOSTILE_NAMES):
                            publishers.start_soon(bus.publish, name, [index, round_])
                with trio.fail_after(30):
                    await eventually(lambda: all(len(r) == 3 for r in received.values()))
                for index, name in enumerate(HOSTILE_NAMES):
                    stored = await read_all(bus, name)
                    expected = [[index, round_] for round_ in range(3)]
                    assert [m.body for m in stored] == expected, name
                    assert [(m.id, m.body) for m in received[name]] == [
                        (m.id, m.body) for m in stored
                    ]
                    assert {m.stream for m in stored} == {name}
                # Deleting a name that is a glob pattern deletes that stream only.
                await bus.delete_stream("a*")
                assert await read_all(bus, "a*") == []
                for name in ("ab", "a?", "a[b]", "*"):
                    assert len(await read_all(bus, name)) == 3, name


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_connections_killed_while_lent_out_leave_the_store_usable(topology: str) -> None:
    """Connections of the store's coredis client killed mid-command, more times than
    it may hold connections: every one comes back as a new connection (coredis 6.9's
    pools lose a dead connection's place for good, and then wait forever: a
    durable-mode Cluster, whose commands all take this path, stopped for good)."""
    with trio.fail_after(60):
        async with open_topology(topology) as world:
            # One connection per server: a single lost place is a store that hangs.
            per_server = 1 if world.cluster is None else len(world.nodes())
            async with open_redis_pair(
                world.url, prefix=unique_prefix(), max_connections=per_server
            ) as (store, _):
                client = store._client  # type: ignore[attr-defined]
                for round_ in range(3):
                    async with trio.open_nursery() as nursery:

                        async def blocked(key: str) -> None:
                            with pytest.raises(coredis.exceptions.ConnectionError):
                                await client.blpop([key], timeout=5)

                        nursery.start_soon(blocked, f"idle{round_}")
                        await trio.sleep(0.3)
                        assert world.kill_clients("TYPE", "normal") >= 1
                    with trio.fail_after(10):
                        assert await client.ping() in (b"PONG", "PONG", True)
                with trio.fail_after(10):
                    await store.stream_info("after")
