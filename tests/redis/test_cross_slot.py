"""One APPEND_SLOTS call per Cluster primary for streams of several slots (fast mode).

Slots migrating under it, a refused call, a lost reply: every stream stays dense,
every key is stored once, every acknowledged publish is at its id. Each test starts
the cluster it needs (``support.redis_servers``).
"""

from __future__ import annotations

from typing import Any

import coredis.exceptions
import pytest
import trio
import trio.testing

from chatbus._message import make_draft
from chatbus.redis import _append
from chatbus.redis._lua import APPEND_SLOTS

from support.redis_bus import (
    Ledger,
    need_redis,
    open_redis_bus,
    open_redis_pair,
    read_all,
    unique_prefix,
)
from support.redis_servers import open_cluster

pytestmark = pytest.mark.redis
need_redis()


async def test_cross_slot_calls_survive_slot_migrations() -> None:
    """Slots migrate while keyed publishes to 16 streams flow (one in flight per
    primary, so their streams share calls): calls that meet a moving slot go out
    again per slot."""
    streams = [f"s{i}" for i in range(16)]
    per_stream = 240
    ledgers = {stream: Ledger() for stream in streams}
    with trio.fail_after(120):
        async with open_cluster(masters=3) as nodes:
            prefix = unique_prefix()
            async with open_redis_bus(
                nodes.url, prefix=prefix, redis_options={"max_in_flight": 1}
            ) as bus:
                store: object = bus.store
                appender: _append.Appender = store._appender  # type: ignore[attr-defined]
                slots = [appender.slot(stream) for stream in streams]
                done = trio.Event()

                async def flow(stream: str, tag: int) -> None:
                    async with bus.open_publisher(stream) as pub:
                        for i in range(per_stream // 3):
                            key = f"{stream}-{tag}-{i}"
                            await ledgers[stream].publish(pub, {"i": i}, key)

                async def migrate() -> None:
                    await trio.sleep(0.2)
                    for round_ in range(6):
                        slot = slots[round_ % len(slots)]
                        owner = nodes.master_for_slot(slot)
                        target = next(m for m in nodes.masters() if m is not owner)
                        await trio.to_thread.run_sync(nodes.migrate_slot, slot, target)
                        await trio.sleep(0.05)
                    done.set()

                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        for tag in range(3):
                            nursery.start_soon(flow, stream, tag)
                    nursery.start_soon(migrate)
                assert done.is_set()
                for stream in streams:
                    stored = await read_all(bus, stream)
                    ledgers[stream].check(stored)
                    assert len(stored) == per_stream // 3 * 3
                assert appender.cross_slot_calls > 0


async def test_a_refused_cross_slot_call_writes_nothing() -> None:
    """APPEND_SLOTS reads every key before it writes: a key its server may not serve
    (here the token order of a stream whose slot is migrating, already moved) aborts
    it before the streams before it in the call were written. (Seen failing with the
    reads removed: the first stream was appended to, yet the call raised.)"""
    with trio.fail_after(60):
        async with open_cluster(masters=3) as nodes:
            prefix = unique_prefix()
            async with open_redis_bus(nodes.url, prefix=prefix) as bus:
                store: Any = bus.store
                appender: _append.Appender = store._appender
                by_owner: dict[str, list[str]] = {}
                for i in range(64):
                    stream = f'hostile {{}} " ✓ {i}'
                    slot = appender.slot(stream)
                    owner = nodes.master_for_slot(slot).address
                    if all(appender.slot(s) != slot for s in by_owner.get(owner, [])):
                        by_owner.setdefault(owner, []).append(stream)
                a, b = next(streams for streams in by_owner.values() if len(streams) >= 2)[:2]
                for stream in (a, b):
                    await bus.publish(stream, "first")
                keys_a, keys_b = appender.keys(a), appender.keys(b)
                slot = appender.slot(b)
                source = nodes.master_for_slot(slot)
                target = next(m for m in nodes.masters() if m is not source)
                target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", nodes.node_id(source))
                source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", nodes.node_id(target))
                source.command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", keys_b.token_order
                )
                args: list[str | int] = [0, 0, 64, 2]
                for stream, keys in ((a, keys_a), (b, keys_b)):
                    args += [appender.token(), keys.channel, stream, 1, 1, "", '"x"']
                for keys in (keys_a, keys_b):
                    args += [keys.meta, keys.entries, keys.keys, keys.tokens]
                    args += [keys.token_order, keys.redactions]
                with pytest.raises(coredis.exceptions.ResponseError, match="non local key"):
                    await store._script(APPEND_SLOTS, [keys_a.meta], args)
                assert source.command("HGET", keys_a.meta, "head") == "1"
                assert source.command("HGET", keys_b.meta, "head") == "1"
                # Appends go on meanwhile (per slot for b, once its slot has moved).
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(bus.publish, a, "second")
                    nursery.start_soon(bus.publish, b, "second")
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(nodes.migrate_slot, slot, target)
                for stream in (a, b):
                    stored = await read_all(bus, stream)
                    assert [(m.id, m.body) for m in stored] == [(1, "first"), (2, "second")]


def _two_slots_of_one_primary(appender: _append.Appender, nodes: Any) -> tuple[str, str]:
    """Two streams in different hash slots of one Cluster primary."""
    by_owner: dict[str, list[str]] = {}
    for i in range(64):
        stream = f"s{i}"
        slot = appender.slot(stream)
        owner = nodes.master_for_slot(slot).address
        if all(appender.slot(s) != slot for s in by_owner.get(owner, [])):
            by_owner.setdefault(owner, []).append(stream)
            if len(by_owner[owner]) == 2:
                return by_owner[owner][0], by_owner[owner][1]
    raise AssertionError("no primary with two streams")


async def test_a_cross_slot_call_whose_reply_is_lost_is_never_run_twice() -> None:
    """One APPEND_SLOTS call for two streams runs, and its reply is lost (here: it is
    dropped after it came): the calls per slot that follow re-run it with its tokens,
    so each body is stored once, and the callers get the first run's outcome. (Seen
    failing with the fallback sending new tokens: every round stored twice.)"""
    rounds = 4
    with trio.fail_after(60):
        async with open_cluster(masters=3) as nodes:
            prefix = unique_prefix()
            async with open_redis_pair(nodes.url, prefix=prefix) as (store, _):
                appender: _append.Appender = store._appender
                a, b = _two_slots_of_one_primary(appender, nodes)
                for stream in (a, b):
                    await store.append(stream, [make_draft("first", None, max_body_bytes=100)])
                group = appender._group_of(a)
                assert appender._group_of(b) is group
                run_script = appender._script

                async def lose_cross_slot_replies(script: Any, *args: Any, **kw: Any) -> Any:
                    reply = await run_script(script, *args, **kw)
                    if script is APPEND_SLOTS:
                        raise coredis.exceptions.ConnectionError("the reply was lost")
                    return reply

                appender._script = lose_cross_slot_replies
                outcomes: list[dict[str, Any]] = []
                for round_ in range(rounds):
                    results: dict[str, Any] = {}

                    async def one(
                        stream: str, round_: int = round_, results: dict[str, Any] = results
                    ) -> None:
                        drafts = [
                            make_draft({"round": round_, "i": i}, None, max_body_bytes=100)
                            for i in range(3)
                        ]
                        results[stream] = await store.append(stream, drafts)

                    group.in_flight += 1  # both queue, then go out in one batch
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(one, a)
                        nursery.start_soon(one, b)
                        await trio.testing.wait_all_tasks_blocked()
                        assert len(group.pending) == 2
                        group.in_flight -= 1
                        group._promote()
                    outcomes.append(results)
                assert appender.cross_slot_calls == appender.cross_slot_fallbacks == rounds
            async with open_redis_bus(nodes.url, prefix=prefix) as bus:
                for stream in (a, b):
                    stored = await read_all(bus, stream)
                    assert [m.id for m in stored] == list(range(1, 2 + 3 * rounds))
                    for round_, results in enumerate(outcomes):
                        copies = [m for m in stored[1:] if m.body["round"] == round_]
                        assert [m.body for m in copies] == [
                            {"round": round_, "i": i} for i in range(3)
                        ]
                        assert [m.id for m in results[stream]] == [m.id for m in copies]
