"""The Postgres backend against a real server: cross-stream group commit of appends.

Every test runs on a fresh schema (see ``tests/support/pg.py``) and is bounded by an
absolute ``trio.fail_after``.
"""

from __future__ import annotations

import random

import psycopg
import pytest
import trio
from psycopg import sql

import chatbus
import chatbus.postgres._pq
from chatbus._message import Draft, Message
from chatbus.postgres import (
    PostgresStore,
    open_postgres,
)

from support.pg import (
    CommittedRecorder,
    admin_execute,
    check_dense,
    draft,
    eventually,
    fresh_postgres_pair,
    fresh_schema,
    row_lock,
)

pytestmark = pytest.mark.postgres


async def test_concurrent_appends_are_coalesced_across_streams() -> None:
    async with fresh_postgres_pair(max_connections=4, max_in_flight=1) as (store, notifier):
        assert store.max_in_flight == 1
        recorder = CommittedRecorder()
        returned: list[list[Message]] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as listening:
                await listening.start(notifier.listen, recorder)

                async def appender(worker: int) -> None:
                    for seq in range(10):
                        stream = f"s{(worker + seq) % 5}"
                        size = 1 + (worker + seq) % 3
                        batch = [draft({"w": worker, "seq": seq, "i": i}) for i in range(size)]
                        messages = await store.append(stream, batch)
                        assert [m.stream for m in messages] == [stream] * size
                        assert [m.body for m in messages] == [
                            {"w": worker, "seq": seq, "i": i} for i in range(size)
                        ]
                        returned.append(messages)

                async with trio.open_nursery() as nursery:
                    for worker in range(24):
                        nursery.start_soon(appender, worker)
                by_stream = check_dense(returned)
                stats = store.statistics()
                assert stats.appends == 240
                assert stats.statements < stats.appends / 2, stats
                assert stats.merged_statements > 0 and stats.largest_statement > 1, stats
                assert (stats.in_flight, stats.pending) == (0, 0)
                heads = await store.heads(list(by_stream))
                assert heads == {stream: len(ids) for stream, ids in by_stream.items()}
                for stream in by_stream:  # what was returned is what was stored
                    stored = await store.read(stream, 0, 1000)
                    mine = sorted(
                        (m for b in returned for m in b if m.stream == stream), key=lambda m: m.id
                    )
                    assert stored == mine

                # One notice per stream per statement, ending at each stream's head,
                # each carrying its messages (every batch is small), merged or not.
                def ids(stream: str) -> list[int]:
                    return [n.last_id for n in recorder.committed_notices if n.stream == stream]

                await eventually(lambda: all(ids(s)[-1:] == [heads[s]] for s in by_stream))
                assert recorder.notices == []
                for stream in by_stream:
                    assert ids(stream) == sorted(ids(stream))
                    carried = [
                        m
                        for n in recorder.committed_notices
                        if n.stream == stream
                        for m in n.messages() or []
                    ]
                    assert carried == await store.read(stream, 0, 1000)
                listening.cancel_scope.cancel()


async def test_keyed_appends_are_coalesced_across_streams() -> None:
    """Keyed appends that wait are merged into one statement like unkeyed ones; keys
    stay per stream, and a key repeated by two appends of the statement is stored
    once, the later one getting the earlier one's message as a replay."""
    async with fresh_postgres_pair(max_connections=4, max_in_flight=1) as (store, _):
        results: dict[int, list[Message]] = {}

        async def append(n: int, stream: str, drafts: list[Draft]) -> None:
            results[n] = await store.append(stream, drafts)

        queued = [
            ("a", [draft(1, "k1")]),
            ("b", [draft(1, "k1")]),
            ("a", [draft(1, "k1"), draft("new")]),
            ("b", [draft(None), draft(2, "k2"), draft(2, "k2")]),
            ("a", [draft(0, "k0")]),  # the key of the statement running now
        ]
        with trio.fail_after(20):
            async with row_lock(store.schema, "a") as lock, trio.open_nursery() as nursery:
                nursery.start_soon(append, 0, "a", [draft(0, "k0")])
                await eventually(lambda: store.statistics().in_flight == 1)
                for n, (stream, drafts) in enumerate(queued, 1):
                    nursery.start_soon(append, n, stream, drafts)
                    await eventually(lambda n=n: store.statistics().pending == n)
                await trio.sleep(0.2)
                await lock.release()
        stats = store.statistics()
        assert (stats.statements, stats.largest_statement) == (2, len(queued)), stats
        ids = {n: [(m.id, m.replay) for m in messages] for n, messages in results.items()}
        assert ids == {
            0: [(1, False)],
            1: [(2, False)],
            2: [(1, False)],
            3: [(2, True), (3, False)],
            4: [(2, False), (3, False), (3, True)],
            5: [(1, True)],
        }
        assert [m.body for m in await store.read("a", 0, 10)] == [0, 1, "new"]
        assert [m.body for m in await store.read("b", 0, 10)] == [1, None, 2]


async def test_multi_stream_statements_from_two_pools_do_not_deadlock() -> None:
    """Two pools (two sets of server sessions, like two processes), overlapping streams.

    Each merged statement lists its streams in arrival order (random here); only the
    server-side sort of the counter upserts keeps two of them from locking the same
    rows in opposite orders. A deadlock would surface as a StoreError (the server
    detects it after deadlock_timeout) or hit the fail_after.
    """
    streams = [f"o{i}" for i in range(6)]
    returned: list[list[Message]] = []
    async with fresh_schema() as (dsn, schema):
        async with (
            open_postgres(dsn, schema=schema, max_connections=4, max_in_flight=3) as (one, _),
            open_postgres(dsn, schema=schema, max_connections=4, max_in_flight=3) as (two, _),
        ):
            with trio.fail_after(60):

                async def worker(store: PostgresStore, rng: random.Random) -> None:
                    for _ in range(25):
                        stream = rng.choice(streams)
                        size = rng.randint(1, 3)
                        returned.append(
                            await store.append(stream, [draft(i) for i in range(size)])
                        )

                async with trio.open_nursery() as nursery:
                    for seed in range(32):
                        nursery.start_soon(worker, one if seed % 2 else two, random.Random(seed))
                by_stream = check_dense(returned)
                assert await one.heads(streams) == {s: len(by_stream[s]) for s in streams}
                for store in (one, two):
                    assert store.statistics().merged_statements > 0, store.statistics()
                    for stream in streams:  # commit order = id order: stored ids are dense
                        stored = [m.id for m in await store.read(stream, 0, 10_000)]
                        assert stored == list(range(1, len(by_stream[stream]) + 1))


async def test_cancelled_waiting_append_stores_nothing() -> None:
    async with fresh_postgres_pair(max_connections=3, max_in_flight=1) as (store, _):
        with trio.fail_after(20):
            async with row_lock(store.schema, "slow") as lock:
                results: dict[str, list[int]] = {}

                async def append(stream: str, scope: trio.CancelScope | None = None) -> None:
                    with scope or trio.CancelScope():
                        messages = await store.append(stream, [draft(stream), draft(stream)])
                        results[stream] = [m.id for m in messages]

                victim = trio.CancelScope()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(append, "slow")
                    await eventually(lambda: store.statistics().in_flight == 1)
                    nursery.start_soon(append, "victim", victim)
                    await eventually(lambda: store.statistics().pending == 1)
                    nursery.start_soon(append, "other")
                    await eventually(lambda: store.statistics().pending == 2)
                    victim.cancel()  # queued first: the promotion must skip it
                    await eventually(lambda: store.statistics().pending == 1)
                    await lock.release()
                assert results == {"slow": [1, 2], "other": [1, 2]}
                assert await store.heads(["victim", "other"]) == {"victim": 0, "other": 2}
                assert await store.read("victim", 0, 10) == []
                stats = store.statistics()
                assert (stats.appends, stats.statements, stats.pending, stats.in_flight) == (
                    3,
                    2,
                    0,
                    0,
                )
                [m] = await store.append("victim", [draft("later")])
                assert m.id == 1


async def test_failing_merged_statement_fails_every_participant() -> None:
    async with fresh_postgres_pair(max_connections=3, max_in_flight=1) as (store, _):
        # Make any statement that touches "clash" fail: id 1 is taken behind the counter.
        admin_execute(
            sql.SQL("INSERT INTO {} (stream, id, body) VALUES ('clash', 1, '0')").format(
                sql.Identifier(store.schema, "messages")
            )
        )
        with trio.fail_after(20):
            async with row_lock(store.schema, "slow") as lock:
                errors: dict[str, BaseException] = {}

                async def append(name: str, stream: str) -> None:
                    try:
                        await store.append(stream, [draft(name)])
                    except chatbus.StoreError as exc:
                        errors[name] = exc

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(append, "slow", "slow")
                    await eventually(lambda: store.statistics().in_flight == 1)
                    for name, stream in (("x1", "x"), ("clash", "clash"), ("x2", "x"), ("y", "y")):
                        nursery.start_soon(append, name, stream)
                    await eventually(lambda: store.statistics().pending == 4)
                    await lock.release()
                assert set(errors) == {"x1", "clash", "x2", "y"}
                for error in errors.values():
                    assert isinstance(error.__cause__, psycopg.errors.UniqueViolation)
                assert len({id(e) for e in errors.values()}) == 4  # one error object per caller
                assert store.statistics().merged_statements == 1
                assert await store.heads(["x", "y", "clash"]) == {"x": 0, "y": 0, "clash": 0}
                assert [m.id for m in await store.append("x", [draft(1), draft(2)])] == [1, 2]


async def test_bad_draft_fails_only_its_own_caller() -> None:
    async with fresh_postgres_pair(max_connections=3, max_in_flight=1) as (store, _):
        with trio.fail_after(20):
            async with row_lock(store.schema, "slow") as lock:
                good: list[Message] = []

                async def append_good() -> None:
                    good.extend(await store.append("good", [draft(1), draft(2)]))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store.append, "slow", [draft(0)])
                    await eventually(lambda: store.statistics().in_flight == 1)
                    nursery.start_soon(append_good)
                    await eventually(lambda: store.statistics().pending == 1)
                    for body in ("{", "NaN", "-Infinity", "1\x1e2", "1 2", ""):
                        bad = Draft(body_json=body, key=None)
                        with pytest.raises(chatbus.StoreError) as info:
                            await store.append("bad", [draft("fine"), bad])
                        assert isinstance(info.value.__cause__, psycopg.DataError)
                    assert store.statistics().pending == 1  # refused before queueing
                    await lock.release()
                assert [m.id for m in good] == [1, 2]
                assert await store.heads(["bad"]) == {"bad": 0}
                assert store.statistics().appends == 2


async def test_max_in_flight_defaults_below_the_pool_size() -> None:
    async with fresh_postgres_pair() as (store, _):
        assert store.max_in_flight == 3
    async with fresh_postgres_pair(max_connections=2) as (store, _):
        assert store.max_in_flight == 1
    async with fresh_postgres_pair(min_connections=1, max_connections=1) as (store, _):
        assert store.max_in_flight == 1


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.02])
async def test_open_cancelled_half_way_returns_promptly(delay: float) -> None:
    """A caller's short timeout around open_postgres must not hang the loop's exit."""
    async with fresh_schema() as (dsn, schema):
        with trio.fail_after(15):
            with trio.move_on_after(delay) as scope:
                async with open_postgres(dsn, schema=schema):
                    await trio.sleep(1)
        assert scope.cancelled_caught
