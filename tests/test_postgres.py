"""The Postgres backend against a real server: store, notifier, failures, hostile input.

Every test runs on a fresh schema (see ``tests/_pg.py``) and is bounded by an
absolute ``trio.fail_after``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, final

import attrs
import psycopg
import pytest
import trio
import trio_asyncio
from psycopg import sql

import chatbus
import chatbus._pq
from chatbus._message import Draft, Message, make_draft
from chatbus.postgres import (
    LISTEN_APPLICATION_NAME,
    PostgresNotifier,
    PostgresStore,
    channel_for_schema,
    open_postgres,
)

from _pg import (
    TcpProxy,
    admin_execute,
    eventually,
    fresh_postgres_pair,
    fresh_schema,
    pg_dsn,
    send_raw_notice,
    terminate_backends,
)

pytestmark = pytest.mark.postgres


def draft(body: object = None, key: str | None = None) -> Draft:
    return make_draft(body, key, max_body_bytes=1 << 20)


@attrs.define(eq=False)
class Recorder:
    """A NoticeHandler that remembers everything."""

    notices: list[tuple[str, int]] = attrs.Factory(list)
    resyncs: int = 0

    def notice(self, stream: str, last_id: int) -> None:
        self.notices.append((stream, last_id))

    def resync(self) -> None:
        self.resyncs += 1

    def ids(self, stream: str) -> list[int]:
        return [last_id for s, last_id in self.notices if s == stream]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    async with fresh_postgres_pair(max_connections=8) as pair:
        yield pair


@pytest.fixture
async def store(pair: tuple[PostgresStore, PostgresNotifier]) -> PostgresStore:
    return pair[0]


# ---------------------------------------------------------------------------------
# Store


async def test_append_read_heads_roundtrip(store: PostgresStore) -> None:
    with trio.fail_after(10):
        first = await store.append("s", [draft({"n": 1}), draft([1, 2.5, None, True])])
        assert [m.id for m in first] == [1, 2]
        assert [m.body for m in first] == [{"n": 1}, [1, 2.5, None, True]]
        assert all(m.stream == "s" and m.key is None for m in first)
        assert first[0].created_at.utcoffset() is not None
        assert first[0].created_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        second = await store.append("s", [draft("x")])
        assert second[0].id == 3
        assert await store.read("s", 0, 10) == [*first, *second]
        assert await store.heads(["s", "empty", "s"]) == {"s": 3, "empty": 0}
        assert await store.heads([]) == {}
        assert await store.append("s", []) == []
        assert await store.read("s", 0, 0) == []
        with pytest.raises(ValueError, match="limit"):
            await store.read("s", 0, -1)


async def test_dense_ids_with_many_concurrent_appenders(store: PostgresStore) -> None:
    """Many tasks over several pool connections, plus a second store (another "process")."""
    with trio.fail_after(30):
        async with open_postgres(pg_dsn(), schema=store.schema, max_connections=8) as (other, _):
            returned: dict[int, tuple[int, int]] = {}

            async def appender(worker: int, target: PostgresStore) -> None:
                for seq in range(12):
                    size = random.randint(1, 3)
                    batch = [draft({"w": worker, "seq": seq, "i": i}) for i in range(size)]
                    messages = await target.append("hot", batch)
                    ids = [m.id for m in messages]
                    assert ids == list(range(ids[0], ids[0] + size)), "batch ids not contiguous"
                    for m in messages:
                        assert m.id not in returned, f"id {m.id} handed out twice"
                        returned[m.id] = (worker, seq)

            async with trio.open_nursery() as nursery:
                for worker in range(16):
                    nursery.start_soon(appender, worker, store if worker % 2 else other)

        total = len(returned)
        assert sorted(returned) == list(range(1, total + 1))
        stored = await store.read("hot", 0, 10_000)
        assert [m.id for m in stored] == list(range(1, total + 1))
        for m in stored:
            assert returned[m.id] == (m.body["w"], m.body["seq"])
        # Each worker's messages are in its own publish order.
        for worker in range(16):
            seqs = [m.body["seq"] for m in stored if m.body["w"] == worker]
            assert seqs == sorted(seqs)
        assert await store.heads(["hot"]) == {"hot": total}


async def test_batch_is_atomic(pair: tuple[PostgresStore, PostgresNotifier]) -> None:
    """A batch that fails half-way stores nothing, notifies nothing, leaves no id hole."""
    store, notifier = pair
    recorder = Recorder()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            bad = Draft(body_json="{not json", key=None)
            for batch in (
                [draft(1), draft(2), bad],  # unkeyed path: one statement
                [draft(1, "k1"), bad, draft(3)],  # keyed path: explicit transaction
            ):
                with pytest.raises(chatbus.StoreError) as info:
                    await store.append("atomic", batch)
                assert isinstance(info.value.__cause__, psycopg.Error)
                assert await store.read("atomic", 0, 10) == []
                assert await store.heads(["atomic"]) == {"atomic": 0}
            messages = await store.append("atomic", [draft("ok"), draft("ok2", "k1")])
            assert [m.id for m in messages] == [1, 2]
            await eventually(lambda: recorder.ids("atomic") == [2])
            await trio.sleep(0.2)
            assert recorder.ids("atomic") == [2], "a rolled-back batch was notified"
            nursery.cancel_scope.cancel()


async def test_idempotency_keys(store: PostgresStore) -> None:
    with trio.fail_after(10):
        [a] = await store.append("idem", [draft("a", "ka")])
        # Across batches: the original comes back, nothing new is stored.
        result = await store.append("idem", [draft("changed", "ka")])
        assert result == [a]
        # Within a batch: a repeated key returns the first draft's message.
        result = await store.append(
            "idem", [draft("b", "kb"), draft(None), draft("b again", "kb"), draft("a?", "ka")]
        )
        assert [m.id for m in result] == [2, 3, 2, 1]
        assert result[0] is result[2] or result[0] == result[2]
        assert result[2].body == "b"
        assert result[3] == a
        # All duplicates: nothing stored, no id consumed.
        assert await store.append("idem", [draft(0, "ka"), draft(0, "kb")]) == [a, result[0]]
        [c] = await store.append("idem", [draft("c")])
        assert c.id == 4
        # Keys are per stream.
        [other] = await store.append("idem-2", [draft("x", "ka")])
        assert other.id == 1
        assert [m.id for m in await store.read("idem", 0, 100)] == [1, 2, 3, 4]


async def test_concurrent_appends_with_the_same_key_store_once(store: PostgresStore) -> None:
    with trio.fail_after(20):
        async with open_postgres(pg_dsn(), schema=store.schema, max_connections=8) as (other, _):
            for round_ in range(5):
                key = f"client-{round_}"
                results: list[chatbus.Message] = []

                async def publish(
                    target: PostgresStore,
                    n: int,
                    key: str = key,
                    results: list[chatbus.Message] = results,
                ) -> None:
                    [m] = await target.append("race", [draft({"n": n}, key)])
                    results.append(m)

                async with trio.open_nursery() as nursery:
                    for n in range(12):
                        nursery.start_soon(publish, store if n % 2 else other, n)
                assert len({(m.id, json.dumps(m.body)) for m in results}) == 1
        stored = await store.read("race", 0, 100)
        assert [m.id for m in stored] == [1, 2, 3, 4, 5]
        assert [m.key for m in stored] == [f"client-{i}" for i in range(5)]


async def test_read_paging(store: PostgresStore) -> None:
    with trio.fail_after(10):
        await store.append("page", [draft(i) for i in range(1, 251)])
        seen: list[int] = []
        after = 0
        while page := await store.read("page", after, 37):
            assert len(page) <= 37
            seen.extend(m.body for m in page)
            after = page[-1].id
        assert seen == list(range(1, 251))
        assert [m.id for m in await store.read("page", 245, 100)] == [246, 247, 248, 249, 250]
        assert await store.read("page", 250, 10) == []
        assert await store.read("page", 10_000, 10) == []


async def test_heads_of_many_streams_in_one_query(store: PostgresStore) -> None:
    with trio.fail_after(20):
        names = [f"room-{i}" for i in range(40)]
        for i, name in enumerate(names):
            await store.append(name, [draft(j) for j in range(i % 5 + 1)])
        wanted = [*names, *(f"absent-{i}" for i in range(10_000))]
        started = time.perf_counter()
        heads = await store.heads(wanted)
        elapsed = time.perf_counter() - started
        assert heads == {
            **{name: i % 5 + 1 for i, name in enumerate(names)},
            **{f"absent-{i}": 0 for i in range(10_000)},
        }
        assert elapsed < 2, f"heads() of 10k streams took {elapsed:.2f}s"


HOSTILE_STREAMS = [
    "it's",
    'say "hi"',
    "a; DROP TABLE messages; --",
    "back\\slash\\\\",
    "$1 %s %(x)s {} {0}",
    "Ünïcødé ✓",
    "emoji 🎉👩‍👩‍👧",
    "tab\tnew\nline\r\x01\x7f",
    "  spaces  ",
    "x" * 256,
    "🎉" * 256,
    "\u2028\u2029",
]


async def test_hostile_stream_names_round_trip(
    pair: tuple[PostgresStore, PostgresNotifier],
) -> None:
    store, notifier = pair
    recorder = Recorder()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            for name in HOSTILE_STREAMS:
                [m] = await store.append(name, [draft({"stream": name})])
                assert (m.stream, m.id) == (name, 1)
                [k] = await store.append(name, [draft(2, key=name)])
                assert k.id == 2
                read = await store.read(name, 0, 10)
                assert [(r.stream, r.body) for r in read] == [(name, {"stream": name}), (name, 2)]
            assert await store.heads(HOSTILE_STREAMS) == dict.fromkeys(HOSTILE_STREAMS, 2)
            await eventually(
                lambda: all(recorder.ids(name)[-1:] == [2] for name in HOSTILE_STREAMS)
            )
            nursery.cancel_scope.cancel()
        for bad in ["", "nul\x00inside", "x" * 257, "\ud800"]:
            with pytest.raises(chatbus.InvalidStream):
                await store.append(bad, [draft(1)])
            with pytest.raises(chatbus.InvalidStream):
                await store.read(bad, 0, 10)
            with pytest.raises(chatbus.InvalidStream):
                await store.heads(["ok", bad])


BODIES: list[Any] = [
    "nul \u0000 inside a string",
    {"\u0000key": ["\u0000", "a\u0000b"]},
    "Ünïcødé ✓ 🎉 \u2028",
    {"nested": {"deep": [[[[[]]]]]}, "n": -0.0, "big": 12345678901234567890},
    'quote " backslash \\ slash / tab \t',
    1e300,
    None,
    "",
    {"text": "x" * 200_000},  # far above NOTIFY's 8000-byte payload limit
]


async def test_bodies_round_trip_exactly(store: PostgresStore) -> None:
    with trio.fail_after(10):
        appended = await store.append("bodies", [draft(body) for body in BODIES])
        keyed = await store.append(
            "bodies", [draft(body, f"k{i}") for i, body in enumerate(BODIES)]
        )
        read = await store.read("bodies", 0, 100)
        expected = [json.dumps(body, sort_keys=True) for body in BODIES]
        for messages in (appended, keyed, read[: len(BODIES)], read[len(BODIES) :]):
            assert [json.dumps(m.body, sort_keys=True) for m in messages] == expected


async def test_notify_payload_stays_small() -> None:
    """The payload carries the stream and id only, whatever the body."""
    with trio.fail_after(10):
        async with fresh_postgres_pair() as (store, _):
            conn = await trio.to_thread.run_sync(
                lambda: psycopg.connect(pg_dsn(), autocommit=True)
            )
            try:
                conn.execute(f'LISTEN "{store.channel}"')
                longest_stream = "🎉" * 256
                await store.append(longest_stream, [draft({"text": "é" * 200_000})])
                await store.append(longest_stream, [draft({"text": "é" * 1000})])
                escaped = "\x01" * 256  # escapes to \u0001 in JSON: the worst case
                await store.append(escaped, [draft(1)])
                payloads = await trio.to_thread.run_sync(
                    lambda: [n.payload for n in conn.notifies(timeout=1.0, stop_after=3)]
                )
            finally:
                conn.close()
        assert len(payloads) == 3
        assert all(len(p.encode()) < 2000 for p in payloads), [len(p) for p in payloads]
        assert json.loads(payloads[0]) == {"stream": longest_stream, "last_id": 1}
        assert json.loads(payloads[1]) == {"stream": longest_stream, "last_id": 2}
        assert json.loads(payloads[2]) == {"stream": escaped, "last_id": 1}


# ---------------------------------------------------------------------------------
# Notifier


async def test_notices_for_committed_appends_in_commit_order(
    pair: tuple[PostgresStore, PostgresNotifier],
) -> None:
    store, notifier = pair
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            assert notifier.listen_pids
            await notifier.notify("ordered", 999)  # a no-op for this pair
            async with open_postgres(pg_dsn(), schema=store.schema) as (other, _):

                async def appender(target: PostgresStore) -> None:
                    for _ in range(15):
                        await target.append("ordered", [draft(1)] * random.randint(1, 4))

                async with trio.open_nursery() as writers:
                    for i in range(8):
                        writers.start_soon(appender, store if i % 2 else other)
            [head] = (await store.heads(["ordered"])).values()
            await eventually(lambda: recorder.ids("ordered")[-1:] == [head])
            ids = recorder.ids("ordered")
            assert ids == sorted(set(ids)), "notices out of commit order or duplicated"
            assert 999 not in ids
            assert recorder.resyncs == 0
            nursery.cancel_scope.cancel()


async def test_garbage_payloads_are_ignored(pair: tuple[PostgresStore, PostgresNotifier]) -> None:
    store, notifier = pair
    recorder = Recorder()
    garbage = [
        "",
        "not json",
        "[]",
        "null",
        '"string"',
        '{"stream": 5, "last_id": 1}',
        '{"stream": "s"}',
        '{"stream": "s", "last_id": "1"}',
        '{"stream": "s", "last_id": 1.5}',
        '{"stream": "s", "last_id": -1}',
        '{"stream": "s", "last_id": true}',
        '{"stream": "", "last_id": 1}',
        '{"stream": "' + "x" * 300 + '", "last_id": 1}',
        "[" * 3000,
        '{"stream": "\\ud800", "last_id": 1}',
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            for payload in garbage:
                admin_execute("SELECT pg_notify(%s, %s)", (store.channel, payload))
            admin_execute("SELECT pg_notify(%s, 'ping')", (store.channel + "_other",))
            admin_execute(
                "SELECT pg_notify(%s, %s)",
                (store.channel, json.dumps({"stream": "s", "last_id": 7, "extra": [1]})),
            )
            await send_raw_notice(store.channel, "s", 8)
            await eventually(lambda: recorder.notices == [("s", 7), ("s", 8)])
            assert recorder.resyncs == 0
            nursery.cancel_scope.cancel()


async def test_listen_connection_killed_repeatedly_reconnects_and_resyncs(
    pair: tuple[PostgresStore, PostgresNotifier],
) -> None:
    store, notifier = pair
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            rows = admin_execute(
                "SELECT application_name, query FROM pg_stat_activity WHERE pid = %s",
                (next(iter(notifier.listen_pids)),),
            )
            assert rows[0][0] == LISTEN_APPLICATION_NAME
            assert rows[0][1].upper().startswith("LISTEN")
            for kill in range(1, 5):
                [pid] = notifier.listen_pids
                assert await terminate_backends([pid]) == 1
                await eventually(lambda kill=kill: recorder.resyncs == kill)
                assert notifier.listen_pids and pid not in notifier.listen_pids
                assert notifier.reconnects == kill
                # Notices flow again on the new connection.
                [m] = await store.append("after-kill", [draft(kill)])
                await eventually(lambda m=m: ("after-kill", m.id) in recorder.notices)
            nursery.cancel_scope.cancel()


async def test_silent_listen_connection_is_replaced() -> None:
    """A connection that stops answering (no FIN, no RST) is caught by the ping."""
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with fresh_postgres_pair(
                dsn=proxy.dsn(pg_dsn()), ping_interval=0.2, ping_timeout=0.5, max_backoff=0.5
            ) as (store, notifier):
                async with trio.open_nursery() as inner:
                    await inner.start(notifier.listen, recorder)
                    [old_pid] = notifier.listen_pids
                    proxy.freeze()
                    await trio.sleep(1.5)
                    assert recorder.resyncs == 0  # still trying to reconnect
                    await proxy.up()
                    await eventually(lambda: recorder.resyncs == 1)
                    assert notifier.listen_pids and old_pid not in notifier.listen_pids
                    [m] = await store.append("after-freeze", [draft(1)])
                    await eventually(lambda: ("after-freeze", m.id) in recorder.notices)
                    # A healthy connection answers its pings and is kept.
                    [pid] = notifier.listen_pids
                    await trio.sleep(2)
                    assert notifier.listen_pids == {pid}
                    assert recorder.resyncs == 1
                    inner.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------
# Failures and lifecycle


async def test_unreachable_database_fails_promptly() -> None:
    with trio.fail_after(10):
        started = time.perf_counter()
        with pytest.raises(chatbus.StoreError) as info:
            async with open_postgres(
                "postgresql://postgres@127.0.0.1:1/test", schema="unused", acquire_timeout=1
            ):
                pytest.fail("opened a store on a closed port")
        assert time.perf_counter() - started < 5
        assert isinstance(info.value.__cause__, psycopg.Error)


async def test_store_fails_promptly_while_database_is_down_and_recovers() -> None:
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with fresh_postgres_pair(
                dsn=proxy.dsn(pg_dsn()),
                acquire_timeout=1,
                connect_timeout=1,
                max_connections=4,
                ping_interval=0.5,
                ping_timeout=1,
                max_backoff=0.5,
            ) as (store, notifier):
                await nursery.start(notifier.listen, recorder)
                [m] = await store.append("down", [draft(1)])
                assert m.id == 1
                proxy.down()
                for operation in (
                    lambda: store.append("down", [draft(2)]),
                    lambda: store.append("down", [draft(2, "key")]),
                    lambda: store.read("down", 0, 10),
                    lambda: store.heads(["down"]),
                ):
                    started = time.perf_counter()
                    with pytest.raises(chatbus.StoreError) as info:
                        await operation()
                    assert time.perf_counter() - started < 3
                    assert isinstance(info.value.__cause__, psycopg.Error)
                await proxy.up()
                recovered_after = time.perf_counter()
                while True:
                    try:
                        [m] = await store.append("down", [draft(3)])
                        break
                    except chatbus.StoreError:
                        await trio.sleep(0.1)
                print(f"store recovered {time.perf_counter() - recovered_after:.2f}s after up")
                assert m.id == 2, "a failed append left a trace"
                assert [x.body for x in await store.read("down", 0, 10)] == [1, 3]

                # Notices sent while the listener was away are lost: hence the resync.
                await eventually(lambda: recorder.resyncs >= 1)
                [m] = await store.append("down", [draft(4)])
                await eventually(lambda: ("down", m.id) in recorder.notices)
                nursery.cancel_scope.cancel()


async def test_closed_store_raises_store_error() -> None:
    with trio.fail_after(10):
        async with fresh_postgres_pair() as (store, _):
            await store.append("s", [draft(1)])
        with pytest.raises(chatbus.StoreError, match="closed"):
            await store.append("s", [draft(1)])
        with pytest.raises(chatbus.StoreError, match="closed"):
            await store.read("s", 0, 1)


async def test_reuses_a_running_trio_asyncio_loop() -> None:
    with trio.fail_after(10):
        async with trio_asyncio.open_loop() as loop, fresh_postgres_pair() as (store, _):
            assert store._aio._loop is loop
            [m] = await store.append("s", [draft(1)])
            assert m.id == 1


async def test_body_errors_come_out_unwrapped() -> None:
    with trio.fail_after(10):
        with pytest.raises(KeyError, match="from the body"):
            async with fresh_postgres_pair():
                raise KeyError("from the body")
        # Cancellation too: a bare TooSlowError, not a group of our internals.
        with pytest.raises(trio.TooSlowError):
            await _listen_until_timeout(0.3)


async def _listen_until_timeout(seconds: float) -> None:
    with trio.fail_after(seconds):
        async with fresh_postgres_pair() as (_, notifier), trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, Recorder())
            await trio.sleep_forever()


async def test_concurrent_opens_create_the_schema_once() -> None:
    with trio.fail_after(20):
        async with fresh_schema() as (dsn, schema):
            stores: list[PostgresStore] = []

            async def open_one(task_status: trio.TaskStatus[None]) -> None:
                async with open_postgres(dsn, schema=schema) as (store, _):
                    stores.append(store)
                    task_status.started()
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(nursery.start, open_one)
                await eventually(lambda: len(stores) == 6)
                for i, store in enumerate(stores):
                    [m] = await store.append("shared", [draft(i)])
                    assert m.id == i + 1
                nursery.cancel_scope.cancel()


async def test_options_are_validated() -> None:
    for kwargs, match in (
        ({"schema": ""}, "schema"),
        ({"schema": "x" * 64}, "schema"),
        ({"schema": "a\x00b"}, "schema"),
        ({"min_connections": 0}, "min_connections"),
        ({"min_connections": 5, "max_connections": 2}, "max_connections"),
        ({"acquire_timeout": 0}, "acquire_timeout"),
        ({"ping_interval": -1}, "ping_interval"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_connections": 4, "max_in_flight": 4}, "max_in_flight"),
    ):
        with pytest.raises(ValueError, match=match):
            await _open_and_close(**kwargs)
    assert channel_for_schema("chatbus") == channel_for_schema("chatbus")
    assert channel_for_schema("a") != channel_for_schema("b")
    assert len(channel_for_schema("é" * 31)) < 64


async def _open_and_close(**kwargs: Any) -> None:
    async with open_postgres(pg_dsn(), **kwargs):
        pass


# ---------------------------------------------------------------------------------
# Cross-stream group commit of unkeyed appends


@final
class RowLock:
    """Holds a stream's counter row locked from another session, so appends to it block."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    async def release(self) -> None:
        if not self._conn.closed:
            await trio.to_thread.run_sync(self._conn.close)  # rolls back


@asynccontextmanager
async def row_lock(schema: str, stream: str) -> AsyncIterator[RowLock]:
    """Lock ``stream``'s counter row until :meth:`RowLock.release` or the block's end."""
    query = sql.SQL(
        "INSERT INTO {} AS st (stream, last_id) VALUES (%s, 0)"
        " ON CONFLICT (stream) DO UPDATE SET last_id = st.last_id"
    ).format(sql.Identifier(schema, "streams"))

    def lock() -> psycopg.Connection[Any]:
        conn = psycopg.connect(pg_dsn(), connect_timeout=3)
        conn.execute(query, (stream,))
        return conn

    held = RowLock(await trio.to_thread.run_sync(lock))
    try:
        yield held
    finally:
        # Always, even on failure: a forgotten lock would block the schema's DROP.
        with trio.CancelScope(shield=True):
            await held.release()


def check_dense(store_returned: list[list[Message]]) -> dict[str, list[int]]:
    """Each returned batch is contiguous; all ids of each stream are 1..n exactly once."""
    by_stream: dict[str, list[int]] = {}
    for messages in store_returned:
        ids = [m.id for m in messages]
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"batch not contiguous: {ids}"
        assert len({m.stream for m in messages}) == 1
        by_stream.setdefault(messages[0].stream, []).extend(ids)
    for stream, ids in by_stream.items():
        assert sorted(ids) == list(range(1, len(ids) + 1)), f"{stream}: ids not dense"
    return by_stream


async def test_concurrent_appends_are_coalesced_across_streams() -> None:
    async with fresh_postgres_pair(max_connections=4, max_in_flight=1) as (store, notifier):
        assert store.max_in_flight == 1
        recorder = Recorder()
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
                # One notice per stream per statement, ending at each stream's head.
                await eventually(
                    lambda: all(recorder.ids(s)[-1:] == [heads[s]] for s in by_stream)
                )
                for stream in by_stream:
                    assert recorder.ids(stream) == sorted(recorder.ids(stream))
                listening.cancel_scope.cancel()


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


# ---------------------------------------------------------------------------------
# Connections lent to trio (single statements run over psycopg.pq)


def app_name_dsn(name: str) -> str:
    return psycopg.conninfo.make_conninfo(pg_dsn(), application_name=name)


def backends_named(name: str) -> list[int]:
    rows = admin_execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))
    return [int(pid) for (pid,) in rows]


async def test_connections_are_kept_between_operations_and_given_back_when_idle() -> None:
    async with fresh_postgres_pair(max_connections=4) as (store, _):
        with trio.fail_after(20):
            for i in range(20):
                await store.append("s", [draft(i)])
                await store.read("s", 0, 5)
                await store.heads(["s"])
            stats = store.statistics()
            assert (stats.connections, stats.borrows) == (1, 1)

            store._lanes.idle_return = 0.2
            await trio.sleep(0.3)
            await store.read("s", 0, 1)  # gives the stale one back, borrows again
            stats = store.statistics()
            assert (stats.connections, stats.borrows) == (1, 2)

            store._lanes.idle_return = 10
            store._lanes.max_lend = 0.5  # busy, but lent long enough: back to the pool
            for _ in range(8):
                await store.read("s", 0, 1)
                await trio.sleep(0.1)
            stats = store.statistics()
            assert stats.connections == 1
            assert stats.borrows in (3, 4)  # 4 only if the machine stalled the loop


async def test_idle_connection_killed_by_the_server_is_replaced_transparently() -> None:
    name = f"chatbus-test-{random.getrandbits(32):08x}"
    async with fresh_postgres_pair(dsn=app_name_dsn(name), max_connections=4) as (store, _):
        with trio.fail_after(20):
            await store.append("s", [draft(1)])
            assert store.statistics().connections == 1
            for _ in range(3):
                # Each kind of operation, on a connection the server closed while it
                # sat idle here: no StoreError, a fresh connection instead. (About a
                # second each: the pool's own idle one is dead too, and psycopg_pool
                # backs off after a failed check.)
                for operation in (
                    lambda: store.read("s", 0, 10),
                    lambda: store.heads(["s"]),
                    lambda: store.append("s", [draft(2)]),
                    lambda: store.append("s", [draft(3, key=f"k{random.random()}")]),
                ):
                    assert await terminate_backends(backends_named(name)) >= 1
                    await trio.sleep(0.1)  # let the termination reach the socket
                    await operation()
            assert store.statistics().borrows >= 13  # one per killed connection
            assert [x.id for x in await store.read("s", 0, 100)] == list(range(1, 8))


@pytest.mark.parametrize("keyed", [False, True])
async def test_cancelled_statement_is_cancelled_on_the_server(keyed: bool) -> None:
    """A statement cancelled mid-flight is cancelled on the server too (as psycopg does),
    its connection is not reused while busy, and its slot comes back (else the store
    would run out of connections)."""
    async with fresh_postgres_pair(max_connections=2, acquire_timeout=1) as (store, _):
        with trio.fail_after(30):
            async with row_lock(store.schema, "slow") as lock:
                for i in range(4):  # more than max_connections: a leaked slot shows
                    key = f"k{i}" if keyed else None
                    with trio.move_on_after(0.3) as scope:
                        await store.append("slow", [draft(i, key)])
                    assert scope.cancelled_caught, "the row lock did not block the append"
                    # The next operations run at once, on healthy connections.
                    assert await store.heads(["other"]) == {"other": i}
                    [m] = await store.append("other", [draft(i)])
                    assert m.id == i + 1
                    assert len(await store.read("other", 0, 10)) == i + 1
                assert store.statistics().connections <= 2
                await lock.release()
            await trio.sleep(0.2)  # a statement still waiting on the lock would run now
            await store.append("slow", [draft("after")])
            assert [(x.id, x.body) for x in await store.read("slow", 0, 10)] == [(1, "after")]


async def test_waiting_for_a_connection_is_bounded_by_acquire_timeout() -> None:
    async with fresh_postgres_pair(max_connections=2, acquire_timeout=0.5) as (store, _):
        with trio.fail_after(20):
            async with row_lock(store.schema, "slow") as lock, trio.open_nursery() as nursery:
                # Both connections block on the lock (a keyed append does not merge).
                for i in range(2):
                    nursery.start_soon(store.append, "slow", [draft(i, f"k{i}")])
                await eventually(lambda: store.statistics().connections == 2)
                started = time.perf_counter()
                with pytest.raises(chatbus.StoreError, match="PoolTimeout") as info:
                    await store.read("other", 0, 1)
                assert 0.4 < time.perf_counter() - started < 3
                assert isinstance(info.value.__cause__, psycopg.OperationalError)
                await lock.release()
            assert len(await store.read("slow", 0, 10)) == 2


async def test_prepared_statements_survive_psycopgs_deallocate_all() -> None:
    """psycopg sends DEALLOCATE ALL when it rolls back after preparing statements of its
    own (the keyed path prepares after 5 runs); the store's must be prepared again."""
    async with fresh_postgres_pair(max_connections=1) as (store, _):
        with trio.fail_after(20):
            await store.read("s", 0, 10)  # prepares the store's read on the one connection
            for i in range(8):
                await store.append("s", [draft(i, f"k{i}")])
            with pytest.raises(chatbus.StoreError):  # rolled back inside psycopg
                await store.append("s", [Draft(body_json="NaN", key="bad")])
            async with row_lock(store.schema, "s") as lock:
                with trio.move_on_after(0.3):  # cancelled inside its transaction
                    await store.append("s", [draft("x", "x")])
                await lock.release()
            for _ in range(3):
                assert len(await store.read("s", 0, 10)) == 8
                assert await store.heads(["s"]) == {"s": 8}
            [m] = await store.append("s", [draft("unkeyed")])
            assert m.id == 9


async def test_cancelled_callers_do_not_leak_pool_connections() -> None:
    async with fresh_postgres_pair(max_connections=2, acquire_timeout=1) as (store, _):
        with trio.fail_after(30):
            store._lanes.idle_return = 0.05  # every acquire gives an idle one back
            for _ in range(4):
                async with trio.open_nursery() as nursery:  # two connections idle here
                    for _ in range(2):
                        nursery.start_soon(store.read, "s", 0, 1)
                await trio.sleep(0.1)
                with trio.move_on_after(0):  # cancelled while giving one back
                    await store.read("s", 0, 1)
            async with trio.open_nursery() as nursery:  # both connections still usable
                for _ in range(2):
                    nursery.start_soon(store.read, "s", 0, 1)


async def test_statement_cancelled_while_being_sent_returns_promptly() -> None:
    """A statement still in libpq's send buffer cannot be cancelled on the server (it
    has not arrived): the connection must go at once, not after a wasted wait."""
    async with fresh_postgres_pair(max_connections=2) as (store, _):
        with trio.fail_after(30):
            await store.append("s", [draft(0)])  # lends a connection, prepares the append
            big = Draft(body_json='"' + "x" * 50_000_000 + '"', key=None)
            started = time.perf_counter()
            with trio.CancelScope() as scope:
                scope.cancel()  # the first wait is the one for the socket to take more
                await store.append("s", [big])
            assert time.perf_counter() - started < 2
            assert [m.id for m in await store.read("s", 0, 10)] == [1]
            [m] = await store.append("s", [draft(1)])
            assert m.id == 2


async def test_statement_prepared_again_after_deallocate_all() -> None:
    async with fresh_postgres_pair(max_connections=1) as (store, _):
        with trio.fail_after(20):
            await store.append("s", [draft(0)])
            await store.read("s", 0, 10)
            [(conn, _)] = store._lanes._idle  # behind the store's back, as a reset would
            await chatbus._pq.execute(conn.pgconn, b"DEALLOCATE ALL", [])
            assert [m.id for m in await store.read("s", 0, 10)] == [1]
            [m] = await store.append("s", [draft(1)])
            assert m.id == 2


async def test_pages_of_large_bodies_come_in_several_json_values() -> None:
    async with fresh_postgres_pair(max_connections=2) as (store, _):
        with trio.fail_after(60):
            # 35 MiB in all: the page comes as 3 JSON values of at most ~16 MiB (the
            # grouping keeps each one far below Postgres's 1 GB limit on a string).
            bodies = [str(i) * (7 * 1024 * 1024) for i in range(5)]
            for body in bodies:
                await store.append("big", [make_draft(body, None, max_body_bytes=8 << 20)])
            await store.append("big", [draft("small")])
            page = await store.read("big", 0, 100)
            assert [m.body for m in page] == [*bodies, "small"]
            assert [m.id for m in await store.read("big", 4, 100)] == [5, 6]


async def test_created_at_is_the_stored_timestamp_to_the_microsecond(store: PostgresStore) -> None:
    with trio.fail_after(20):
        returned = []
        for i in range(50):
            returned += await store.append("t", [draft(i), draft(i)])  # unkeyed
            returned += await store.append("t", [draft(i, f"k{i}")])  # keyed (psycopg)
        rows = admin_execute(
            sql.SQL("SELECT id, created_at FROM {} WHERE stream = 't'").format(
                sql.Identifier(store.schema, "messages")
            )
        )
        stored = dict(rows)
        read = {m.id: m.created_at for m in await store.read("t", 0, 1000)}
        assert len(stored) == len(read) == len(returned) == 150
        for message in returned:
            assert message.created_at == read[message.id] == stored[message.id]
        assert len({m.created_at.microsecond for m in returned}) > 1  # not truncated
