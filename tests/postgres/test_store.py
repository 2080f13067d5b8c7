"""The Postgres backend against a real server: store.

Every test runs on a fresh schema (see ``tests/support/pg.py``) and is bounded by an
absolute ``trio.fail_after``.
"""

from __future__ import annotations

import datetime
import json
import random
import sys
import time
from typing import Any

import attrs
import psycopg
import pytest
import trio
from psycopg import sql

import chatbus
import chatbus.postgres._pq
from chatbus import Message
from chatbus._codec import NOTICE_DATA_BYTES, parse_committed_notice
from chatbus._message import Draft
from chatbus.postgres import (
    PostgresNotifier,
    PostgresStore,
    open_postgres,
)

from support.pg import (
    Recorder,
    admin_execute,
    draft,
    eventually,
    fresh_postgres_pair,
    fresh_schema,
    pg_dsn,
    row_lock,
)

pytestmark = pytest.mark.postgres


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


async def test_a_key_reused_with_another_body_costs_one_round_trip(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The original body of a conflicting key comes back with the append's reply (the
    publisher raises IdempotencyConflict with it); only a body too big to ride in a
    reply written under the streams' locks is read afterwards."""
    with trio.fail_after(10):
        [first] = await store.append("c", [draft({"text": "hi"}, "k")])
        [null] = await store.append("c", [draft(None, "null")])
        big = "x" * 10_000  # more than CONFLICT_INLINE_BYTES
        await store.append("c", [draft(big, "big")])
        statements: list[bytes] = []
        execute = chatbus.postgres._pq.execute

        async def counting(*args: Any, **kwargs: Any) -> Any:
            statements.append(args[1])
            return await execute(*args, **kwargs)

        monkeypatch.setattr(chatbus.postgres._pq, "execute", counting)
        [again] = await store.append("c", [draft({"text": "edited"}, "k")])
        [again_null] = await store.append("c", [draft(1, "null")])
        assert len(statements) == 2
        assert (again.id, again.body, again.replay) == (first.id, {"text": "hi"}, True)
        assert (again_null.id, again_null.body, again_null.replay) == (null.id, None, True)
        [again_big] = await store.append("c", [draft("other", "big")])
        assert len(statements) == 4  # the append, then the big original read afterwards
        assert again_big.body == big
        assert len(await store.read("c", 0, 10)) == 3


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


async def test_a_batch_of_retries_takes_no_lock_and_notifies_nothing(
    pair: tuple[PostgresStore, PostgresNotifier],
) -> None:
    """A batch whose keys are all stored already writes nothing: it returns the
    originals while another writer holds the stream's lock, and no notice goes out;
    a batch with one new draft still waits for the lock and notifies once."""
    store, notifier = pair
    with trio.fail_after(20):
        originals = await store.append("r", [draft("a", "ka"), draft("b", "kb")])
        recorder = Recorder()
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            async with row_lock(store.schema, "r") as lock:
                with trio.fail_after(3):  # the lock is held for good: this must not wait
                    again = await store.append("r", [draft("b", "kb"), draft("a", "ka")])
                assert [m.id for m in again] == [2, 1]
                assert all(m.replay for m in again)
                assert again == originals[::-1]
                waited: list[Message] = []

                async def append_one_new() -> None:
                    waited.extend(await store.append("r", [draft("a", "ka"), draft("c", "kc")]))

                nursery.start_soon(append_one_new)
                await trio.sleep(0.3)
                assert not waited  # it stores something: it waits for the lock
                await lock.release()
            await eventually(lambda: recorder.ids("r") == [3])
            assert [m.id for m in waited] == [1, 3]
            await trio.sleep(0.2)
            assert recorder.ids("r") == [3]  # nothing for the batch of retries
            nursery.cancel_scope.cancel()
        assert [m.body for m in await store.read("r", 0, 10)] == ["a", "b", "c"]


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


async def test_notify_payload_stays_under_the_server_limit() -> None:
    """A notice carries the stream and last id, and the batch's bodies and keys only up
    to NOTICE_DATA_BYTES: with the longest stream name, escaped at worst, it stays
    under Postgres's 8,000 bytes whatever the bodies."""
    with trio.fail_after(10):
        async with fresh_postgres_pair() as (store, _):
            conn = await trio.to_thread.run_sync(
                lambda: psycopg.connect(pg_dsn(), autocommit=True)
            )
            try:
                conn.execute(f'LISTEN "{store.channel}"')
                longest_stream = "🎉" * 256
                await store.append(longest_stream, [draft({"text": "é" * 200_000})])
                # As many bytes of bodies and keys as a notice carries:
                body = "é" * ((NOTICE_DATA_BYTES - 200) // 2)
                await store.append(longest_stream, [draft(body, key="k" * 180)])
                escaped = "\x01" * 256  # escapes to \u0001 in JSON: the worst case
                await store.append(escaped, [draft(body, key="k" * 180)])
                payloads = await trio.to_thread.run_sync(
                    lambda: [n.payload for n in conn.notifies(timeout=1.0, stop_after=3)]
                )
            finally:
                conn.close()
        assert len(payloads) == 3
        assert all(len(p.encode()) < 7000 for p in payloads), [len(p) for p in payloads]
        assert json.loads(payloads[0]) == {"stream": longest_stream, "last_id": 1}
        for payload, stream, last_id in [
            (payloads[1], longest_stream, 2),
            (payloads[2], escaped, 1),
        ]:
            notice = parse_committed_notice(payload.encode("utf-8"))
            assert notice is not None
            assert (notice.stream, notice.last_id, notice.count) == (stream, last_id, 1)
            [message] = notice.messages() or []
            assert (message.body, message.key) == (body, "k" * 180)


@pytest.mark.parametrize("keyed", [False, True])
async def test_created_at_never_runs_backwards_across_a_lock_wait(
    store: PostgresStore, keyed: bool
) -> None:
    """created_at is taken once the stream's lock is held, not when the statement began:
    an append that waited behind another writer is never stamped before it."""
    with trio.fail_after(20):
        [first] = await store.append("t", [draft(0, "k0" if keyed else None)])
        async with row_lock(store.schema, "t") as lock, trio.open_nursery() as nursery:
            waited: list[Message] = []

            async def append_behind_the_lock() -> None:
                waited.extend(await store.append("t", [draft(1, "k1" if keyed else None)]))

            nursery.start_soon(append_behind_the_lock)
            await trio.sleep(0.5)  # the statement has started and waits for the lock
            released_at = datetime.datetime.now(datetime.UTC)
            await lock.release()
        [second] = waited
        assert second.id == first.id + 1
        assert second.created_at >= released_at - datetime.timedelta(milliseconds=50)
        stored = await store.read("t", 0, 10)
        assert [m.created_at for m in stored] == sorted(m.created_at for m in stored)


async def test_a_message_no_reader_can_decode_is_named_not_silent(store: PostgresStore) -> None:
    """A body a reader cannot decode (here: an integer past Python's default digit
    limit, as a writer with `sys.set_int_max_str_digits(0)` could once store) stops
    reads and subscriptions with an error naming it; what comes before still arrives."""
    with trio.fail_after(20):
        await store.append("p", [draft("one"), draft("two")])
        poison = '{"n": ' + "7" * 5000 + "}"
        await trio.to_thread.run_sync(
            admin_execute,
            sql.SQL(
                "WITH bump AS (UPDATE {} SET last_id = 3 WHERE stream = 'p')"
                " INSERT INTO {} (stream, id, key, body) VALUES ('p', 3, NULL, %s)"
            ).format(
                sql.Identifier(store.schema, "streams"), sql.Identifier(store.schema, "messages")
            ),
            (poison,),
        )
        await store.append("p", [draft("four")])
        assert [m.body for m in await store.read("p", 0, 10)] == ["one", "two"]
        with pytest.raises(chatbus.UndecodableMessage, match="message 3 of stream 'p'") as info:
            await store.read("p", 2, 10)
        assert (info.value.stream, info.value.id) == ("p", 3)
        assert [m.body for m in await store.read("p", 3, 10)] == ["four"]
        async with chatbus.open_bus(store=store) as bus, bus.open_subscriber("p") as sub:
            assert [(await sub.receive()).body for _ in range(2)] == ["one", "two"]
            with pytest.raises(chatbus.UndecodableMessage):
                await sub.receive()


async def test_bodies_every_reader_can_decode_whatever_the_writers_limit() -> None:
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        with pytest.raises(chatbus.InvalidMessage, match="4300 digits"):
            async with chatbus.open_bus() as bus:
                await bus.publish("s", {"n": 10**5000})
        async with chatbus.open_bus() as bus:  # a long string of digits is fine
            await bus.publish("s", {"n": "9" * 5000, "m": 10**4299})
    finally:
        sys.set_int_max_str_digits(limit)


async def test_same_key_from_two_processes_while_the_lock_is_held_stores_once() -> None:
    """Two stores (processes) append the same key, both waiting behind a held lock: the
    second one's snapshot predates the first one's commit, so its statement loses the
    race on the unique index, stores nothing, runs again and returns the original."""
    async with fresh_schema() as (dsn, schema):
        async with (
            open_postgres(dsn, schema=schema) as (one, _),
            open_postgres(dsn, schema=schema) as (two, _),
        ):
            with trio.fail_after(20):
                await one.append("race", [draft("warm-up")])
                results: list[Message] = []
                async with row_lock(schema, "race") as lock, trio.open_nursery() as nursery:
                    for store in (one, two):
                        nursery.start_soon(_append_into, store, results)
                    await trio.sleep(0.5)  # both wait for the lock, snapshots taken
                    await lock.release()
                assert sorted(m.id for m in results) == [2, 2]
                assert sorted(m.replay for m in results) == [False, True]
                # The loser's lookup could not see the winner's key: it ran again, once.
                reruns = [s.statistics().keyed_reruns for s in (one, two)]
                assert sorted(reruns) == [0, 1]
                assert [m.body for m in await one.read("race", 0, 10)] == ["warm-up", "same"]


async def _append_into(store: PostgresStore, results: list[Message]) -> None:
    results.extend(await store.append("race", [draft("same", "the-key")]))


async def test_keys_this_store_never_sent_go_in_at_once_and_a_refused_one_is_looked_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of keys this store has not sent is inserted without looking them up (the
    unique index checks each key as it goes in). A key another process stored makes the
    unique index refuse the batch: nothing is stored, and the batch runs again with the
    lookup, so the original comes back as a replay (its own body: a different body is
    a conflict) and ids stay dense. A key this store sent before is looked up at once,
    and only that one."""
    async with fresh_schema() as (dsn, schema):
        async with (
            open_postgres(dsn, schema=schema) as (one, _),
            open_postgres(dsn, schema=schema) as (two, _),
        ):
            with trio.fail_after(20):
                [a] = await one.append("x", [draft("a", "ka")])
                statements: list[bytes] = []
                execute = chatbus.postgres._pq.execute

                looked_up: list[bytes] = []

                async def recording(*args: Any, **kwargs: Any) -> Any:
                    statements.append(args[1])
                    if args[1] == one._queries.append_keyed:  # it looks keys up: which
                        looked_up.append(args[2][5])
                    return await execute(*args, **kwargs)

                monkeypatch.setattr(chatbus.postgres._pq, "execute", recording)
                queries = two._queries
                [b] = await two.append("x", [draft("b", "kb")])
                assert statements == [queries.append_keyed_new_one]
                assert (b.id, b.replay) == (2, False)
                statements.clear()
                result = await two.append(
                    "x", [draft("c", "kc"), draft("a, edited", "ka"), draft("d", "kd")]
                )
                assert statements == [queries.append_keyed_new_one, queries.append_keyed]
                assert looked_up == [b"ttt"]  # after a refusal: every key
                looked_up.clear()
                assert [(m.id, m.body, m.replay) for m in result] == [
                    (3, "c", False),
                    (a.id, "a", True),
                    (4, "d", False),
                ]
                assert two.statistics().keyed_reruns == 1
                statements.clear()
                # One sent ka: only ka is looked up; ke goes in, checked by the index.
                again, e = await one.append("x", [draft("a", "ka"), draft("e", "ke")])
                assert statements == [one._queries.append_keyed]
                assert looked_up == [b"tf"]
                assert again == a
                assert (e.id, e.replay) == (5, False)
                assert one.statistics().keyed_reruns == 0
                stored = await one.read("x", 0, 10)
                assert [(m.id, m.key) for m in stored] == [
                    (1, "ka"),
                    (2, "kb"),
                    (3, "kc"),
                    (4, "kd"),
                    (5, "ke"),
                ]


async def test_merged_appends_of_new_keys_go_in_at_once_and_a_refused_key_looks_all_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keyed appends of several streams merged into one statement: with keys the store
    has not sent, one statement inserts them all (ids dense per stream, a key repeated
    within the statement stored once); when another process stored one of the keys,
    nothing of the merged statement is stored, and it runs again looking every key up."""
    async with fresh_schema() as (dsn, schema):
        async with (
            open_postgres(dsn, schema=schema, max_connections=4, max_in_flight=1) as (store, _),
            open_postgres(dsn, schema=schema) as (other, _),
        ):
            [taken] = await other.append("b", [draft("taken", "kt")])
            statements: list[bytes] = []
            execute = chatbus.postgres._pq.execute

            async def recording(*args: Any, **kwargs: Any) -> Any:
                statements.append(args[1])
                return await execute(*args, **kwargs)

            monkeypatch.setattr(chatbus.postgres._pq, "execute", recording)
            queries = store._queries
            for queued, expected in (
                (
                    [
                        ("a", [draft(1, "k1")]),
                        ("b", [draft(1, "k1"), draft(None)]),
                        ("a", [draft(2, "k2"), draft("2 again", "k2")]),
                    ],
                    [queries.append_keyed_new],
                ),
                (
                    [("a", [draft(3, "k3")]), ("b", [draft("not taken", "kt"), draft(4, "k4")])],
                    [queries.append_keyed_new, queries.append_keyed],
                ),
            ):
                results: dict[int, list[Message]] = {}

                async def append(
                    n: int,
                    stream: str,
                    drafts: list[Draft],
                    results: dict[int, list[Message]] = results,
                ) -> None:
                    results[n] = await store.append(stream, drafts)

                with trio.fail_after(20):
                    async with row_lock(schema, "a") as lock, trio.open_nursery() as nursery:
                        nursery.start_soon(append, 0, "a", [draft(0)])
                        await eventually(lambda: store.statistics().in_flight == 1)
                        for n, (stream, drafts) in enumerate(queued, 1):
                            nursery.start_soon(append, n, stream, drafts)
                            await eventually(lambda n=n: store.statistics().pending == n)
                        await lock.release()
                statements.remove(queries.append_unkeyed)  # the held one, alone
                assert statements == expected
                statements.clear()
                if len(queued) == 3:
                    assert {n: [(m.id, m.replay) for m in ms] for n, ms in results.items()} == {
                        0: [(1, False)],
                        1: [(2, False)],
                        2: [(2, False), (3, False)],
                        3: [(3, False), (3, True)],
                    }
            assert results[2][0] == attrs.evolve(taken, replay=True)
            assert [(m.id, m.replay) for m in results[2]] == [(taken.id, True), (4, False)]
            assert [m.body for m in await store.read("a", 0, 10)] == [0, 1, 2, 0, 3]
            assert [m.body for m in await store.read("b", 0, 10)] == ["taken", 1, None, 4]
            assert store.statistics().keyed_reruns == 1
