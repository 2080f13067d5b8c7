"""The stream lifecycle across OS processes on Postgres.

Publishers and subscribers run in child processes (tests/postgres/lifecycle_child.py),
each with its own pool and LISTEN connection; this process deletes, trims and redacts
while they run. Afterwards every stream must be consistent (dense ids from the first
retained one to the head) and every subscriber's record must show each message once,
in order, with every break explained by one of the named errors: never a silent skip.
Each test is bounded by an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

import chatbus
from chatbus.postgres import open_postgres
from chatbus.postgres._sql import LIFECYCLE_BATCH

from support.pg import admin_execute, draft, fresh_schema

pytestmark = pytest.mark.postgres

CHILD = str(Path(__file__).with_name("lifecycle_child.py"))


async def read_all(bus: chatbus.Bus, stream: str) -> list[chatbus.Message]:
    messages: list[chatbus.Message] = []
    while page := await bus.read(stream, after=messages[-1].id if messages else 0, limit=1000):
        messages.extend(page)
    return messages


async def start_subscriber(nursery: trio.Nursery, argv: list[str], results: list[Any]) -> None:
    """Start a subscriber child; return once it printed ``ready``; its JSON goes to results."""
    process = await trio.lowlevel.open_process(argv, stdout=-1, stderr=-1)
    assert process.stdout is not None and process.stderr is not None
    out = bytearray()
    while b"\n" not in out:
        chunk = await process.stdout.receive_some()
        if not chunk:
            err = await process.stderr.receive_some()
            raise AssertionError(f"subscriber child died: {err.decode(errors='replace')}")
        out += chunk
    assert out.startswith(b"ready\n"), out

    async def finish() -> None:
        rest = bytearray(out[len(b"ready\n") :])
        errors = bytearray()

        async def drain_errors() -> None:
            assert process.stderr is not None
            while chunk := await process.stderr.receive_some():
                errors.extend(chunk)

        async with trio.open_nursery() as pipes:
            pipes.start_soon(drain_errors)
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some():
                rest.extend(chunk)
        code = await process.wait()
        assert code == 0, errors.decode(errors="replace")
        results.append(json.loads(rest))

    nursery.start_soon(finish)


async def run_child(argv: list[str]) -> Any:
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)


def check_subscriber_record(segments: list[dict[str, Any]]) -> None:
    """Each segment: consecutive ids from its cursor; each break a named error that
    explains it; the record ends at END."""
    assert segments[-1].get("end") == "END", segments[-1]
    for segment, following in zip(segments, [*segments[1:], None], strict=True):
        ids = segment["ids"]
        start = segment["after"] + 1
        assert ids == list(range(start, start + len(ids))), f"a skip or repeat in {segment}"
        end = segment.get("end")
        if end == "HistoryTruncated":
            # A real gap: the next message it needed is gone; it reopens at first_id.
            last = ids[-1] if ids else segment["after"]
            assert segment["first_id"] > last + 1, segment
            assert following is not None and following["after"] >= segment["first_id"] - 1
        elif end in ("StreamDeleted", "HistoryReset"):
            assert segment["new_epoch"] != segment["epoch"], segment
        else:
            assert end == "END" and following is None, segment


async def test_delete_trim_redact_racing_processes_never_skip_silently(tmp_path: Path) -> None:
    stream, stop = "race", tmp_path / "stop"
    rng = random.Random(12)
    with trio.fail_after(120):
        async with fresh_schema() as (dsn, schema):
            async with (
                open_postgres(dsn, schema=schema) as (store, notifier),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
            ):
                first = await bus.publish(stream, "first")
                old = await bus.stream_info(stream)
                subscribers: list[Any] = []
                acks: list[list[int]] = []
                async with trio.open_nursery() as nursery:
                    # A fast subscriber, and a slow one the trims leave behind.
                    sub = [sys.executable, CHILD, "subscribe", dsn, schema, stream]
                    await start_subscriber(nursery, [*sub, "256", "0"], subscribers)
                    await start_subscriber(nursery, [*sub, "4", "0.05"], subscribers)

                    async def publisher(name: str) -> None:
                        argv = [sys.executable, CHILD, "publish", dsn, schema, stream, name]
                        acks.append(await run_child([*argv, str(stop), "0.002"]))

                    async with trio.open_nursery() as publishers:
                        publishers.start_soon(publisher, "p0")
                        publishers.start_soon(publisher, "p1")
                        # While they publish: trims and redactions, a delete, more.
                        await until_head(bus, stream, 60)
                        await lifecycle_storm(bus, stream, rng)
                        await bus.delete_stream(stream)
                        await until_head(bus, stream, 60)  # the new epoch fills up
                        await lifecycle_storm(bus, stream, rng)
                        stop.touch()
                    # A stale epoch cursor is refused.
                    with pytest.raises(chatbus.HistoryReset):
                        async with bus.open_subscriber(stream, after=1, epoch=old.epoch):
                            pytest.fail("resumed in a deleted history")
                    # Everything trimmed: the slow one skips its backlog, told.
                    await bus.trim(stream, before=(await bus.stream_info(stream)).head + 1)
                    end = await bus.publish(stream, "END")
                # The stream: dense from its first retained id to its head.
                info = await bus.stream_info(stream)
                stored = await read_all(bus, stream)
                assert [m.id for m in stored] == list(range(info.first_id, info.head + 1))
                assert info.epoch != old.epoch and info.head == end.id
        # Every publish acknowledged once, and each epoch's ids dense from 1: every id
        # up to the smaller head twice (once per epoch), the rest once.
        assert len(acks) == 2 and all(acks)
        counts = collections.Counter([first.id, end.id, *(i for ids in acks for i in ids)])
        per_id = [counts[i] for i in range(1, max(counts) + 1)]
        assert per_id[0] == 2, "the new epoch did not start at id 1"
        assert set(per_id) <= {1, 2} and per_id == sorted(per_id, reverse=True), per_id
        assert len(subscribers) == 2
        for segments in subscribers:
            check_subscriber_record(segments)
            # The deletion reached it as a named error.
            assert any(s.get("end") in ("StreamDeleted", "HistoryReset") for s in segments)
        # The slow consumer fell behind a trim (the test exercised what it claims).
        assert any(s.get("end") == "HistoryTruncated" for seg in subscribers for s in seg)


async def until_head(bus: chatbus.Bus, stream: str, head: int) -> None:
    """Wait (polling: the store has no event) until ``stream``'s head reaches ``head``."""
    while (await bus.stream_info(stream)).head < head:  # noqa: ASYNC110
        await trio.sleep(0.01)


async def lifecycle_storm(bus: chatbus.Bus, stream: str, rng: random.Random) -> None:
    """Trim to the last few messages and redact one of them, several times over."""
    for _ in range(6):
        info = await bus.stream_info(stream)
        if info.head > info.first_id + 10:
            await bus.trim(stream, before=info.head - 8)
            await bus.redact(stream, rng.randint(info.head - 7, info.head))
        await trio.sleep(0.05)


async def test_retention_run_by_several_processes_at_once() -> None:
    """Three buses, each with its own pool (as three processes would have), apply one
    policy to the same streams while a fourth publishes: the trims coincide, no error,
    every stream ends dense with exactly its last 20 messages, and a subscriber gets
    every message once, in order, each break told (HistoryTruncated, if it lagged)."""
    policy = chatbus.Retention(max_messages=20, interval=0.05, streams_per_round=3)
    streams = [f"room-{i}" for i in range(8)]
    with trio.fail_after(60):
        async with fresh_schema() as (dsn, schema):
            async with (
                open_postgres(dsn, schema=schema) as (store, notifier),
                chatbus.open_bus(store=store, notifier=notifier) as writer,
                open_postgres(dsn, schema=schema) as (s1, n1),
                chatbus.open_bus(store=s1, notifier=n1, retention=policy) as one,
                open_postgres(dsn, schema=schema) as (s2, n2),
                chatbus.open_bus(store=s2, notifier=n2, retention=policy) as two,
                open_postgres(dsn, schema=schema) as (s3, n3),
                chatbus.open_bus(store=s3, notifier=n3, retention=policy) as three,
            ):
                received: list[int] = []
                told: dict[int, int] = {}  # cursor -> first id, at each HistoryTruncated

                async def follow() -> None:
                    while True:
                        after = received[-1] if received else 0
                        after = max(after, *(first - 1 for first in told.values()), 0)
                        try:
                            async with two.open_subscriber("room-0", after=after) as sub:
                                async for message in sub:
                                    received.append(message.id)
                        except chatbus.HistoryTruncated as exc:
                            told[received[-1] if received else 0] = exc.first_id

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(follow)

                    async def publish(stream: str) -> None:
                        for i in range(100):
                            await writer.publish(stream, i)

                    async with trio.open_nursery() as publishers:
                        for stream in streams:
                            publishers.start_soon(publish, stream)
                    for stream in streams:
                        while (await writer.stream_info(stream)).first_id != 81:  # noqa: ASYNC110
                            await trio.sleep(0.02)
                        assert [m.id for m in await writer.read(stream)] == list(range(81, 101))
                    while len(received) < 100 and received[-1:] != [100]:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                    nursery.cancel_scope.cancel()
                for before, after in itertools.pairwise(received):
                    assert after == before + 1 or told.get(before) == after, (before, after)
                assert received[-1] == 100
                stats = [bus.statistics() for bus in (one, two, three)]
                assert sum(s.retention_errors for s in stats) == 0, stats
                assert all(s.retention_sweeps > 0 for s in stats)


async def test_big_trims_go_in_batches_and_the_age_rule_pages_through_a_backlog() -> None:
    """A trim of more rows than one batch deletes them all (batch after batch), keyed
    rows within their window excepted; retention's age rule, which walks at most
    LIFECYCLE_BATCH rows of a stream per query, asks again until the backlog is gone."""
    total = LIFECYCLE_BATCH * 2 + 500
    with trio.fail_after(90):
        async with fresh_schema() as (dsn, schema):
            async with open_postgres(dsn, schema=schema) as (store, notifier):
                for stream in ("big", "old"):
                    for start in range(0, total, 500):
                        drafts = [
                            draft(i, key=f"k{i}" if i % 1000 == 0 else None)
                            for i in range(start, start + 500)
                        ]
                        await store.append(stream, drafts)
                async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                    assert await bus.trim("big", before=total - 99) == total - 99
                    assert [m.id for m in await bus.read("big", limit=1000)] == list(
                        range(total - 99, total + 1)
                    )
                rows = await trio.to_thread.run_sync(
                    admin_execute,
                    sql.SQL("SELECT count(*), count(key) FROM {} WHERE stream = 'big'").format(
                        sql.Identifier(schema, "messages")
                    ),
                )
                # The last 100, and the trimmed keyed rows (their keys answer retries).
                keyed = total // 1000 + 1  # bodies 0, 1000, ... (ids 1, 1001, ...)
                assert rows[0] == (100 + keyed, keyed)
                await trio.sleep(1.1)
                # The age rule walks one batch of a stream at a time: the same page
                # again, until the backlog is gone.
                ask = functools.partial(
                    store.over_retention, max_messages=None, max_age=1.0, keys_for=None
                )
                epochs = {s: (await store.stream_info(s)).epoch for s in ("big", "old")}
                page = await ask("", 10)
                assert page.trims == [
                    ("big", total + 1, epochs["big"]),
                    ("old", LIFECYCLE_BATCH + 1, epochs["old"]),
                ]
                assert page.next_after == ""
                page = await ask("big", 10)  # from after "big": only "old"
                assert page.trims == [("old", LIFECYCLE_BATCH + 1, epochs["old"])]
                assert page.next_after == "big"
                page = await ask("", 1)  # one stream examined: "big", all of it old
                assert page.trims == [("big", total + 1, epochs["big"])]
                assert page.next_after == "big"
                policy = chatbus.Retention(max_age=1.0, interval=0.05)
                async with chatbus.open_bus(
                    store=store, notifier=notifier, retention=policy
                ) as bus:
                    while (await bus.stream_info("old")).first_id <= total:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                    assert await bus.read("old") == []
                    assert bus.statistics().retention_errors == 0


async def test_a_delete_of_a_stream_without_a_counter_row_still_shuts_out_appends() -> None:
    """The delete's transaction holds the stream's lock even when the stream has no
    counter row yet (only events, say). Without it, appends that commit while the
    delete runs lose their counter row to the delete but keep their messages, and the
    next append reuses their ids (a unique violation, found by a racing-publishers
    test about once in 40 runs). Made deterministic here: an outside transaction
    holds the stream's retained events, so the delete waits between its statements."""
    with trio.fail_after(60):
        async with fresh_schema() as (dsn, schema):
            async with (
                open_postgres(dsn, schema=schema) as (store, notifier),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
            ):
                await bus.emit("fresh", "typing…")  # retained events, no counter row
                held = await trio.to_thread.run_sync(psycopg_connect, dsn)
                try:
                    await trio.to_thread.run_sync(
                        held.execute,
                        sql.SQL("SELECT 1 FROM {} WHERE stream = 'fresh' FOR UPDATE").format(
                            sql.Identifier(schema, "events")
                        ),
                    )
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(bus.delete_stream, "fresh")
                        await trio.sleep(0.5)  # the delete now waits for the events' lock
                        for i in range(2):  # appends that may commit meanwhile, or wait
                            nursery.start_soon(bus.publish, "fresh", i)
                        await trio.sleep(0.5)
                        await trio.to_thread.run_sync(held.commit)
                finally:
                    await trio.to_thread.run_sync(held.close)
                await bus.publish("fresh", "after")  # old ids reused: a StoreError
                ids = [m.id for m in await read_all(bus, "fresh")]
                info = await bus.stream_info("fresh")
                assert ids == list(range(info.first_id, info.head + 1)), ids
                assert ids[-1] == info.head


def psycopg_connect(dsn: str) -> psycopg.Connection[Any]:
    """A plain connection with a transaction open on its first statement."""
    return psycopg.connect(dsn, connect_timeout=3)
