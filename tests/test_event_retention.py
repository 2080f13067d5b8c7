"""What a stream keeps for joiners: configurable bounds, and nothing after a delete.

Every test runs on each backend (``backend`` fixture); each ``backend.open_bus()`` is
a separate "process" over the same store (on Postgres: its own pool and LISTEN).
"""

from __future__ import annotations

import datetime
import json

import pytest
import trio

import chatbus
from chatbus._event import encode_event, to_micros


async def _joiner_items(
    bus_or_backend: object, stream: str, *, quiet: float = 0.5
) -> list[object]:
    """Everything a joiner gets at first: message ids and event bodies, until it is quiet
    for ``quiet`` seconds (on a fresh bus when given a backend, else on that bus)."""
    got: list[object] = []

    async def take(bus: chatbus.Bus) -> None:
        async with bus.open_subscriber(stream, events=True) as sub:
            with trio.fail_after(10):
                while True:
                    with trio.move_on_after(quiet) as idle:
                        item = await sub.receive()
                    if idle.cancelled_caught:
                        return
                    got.append(item.id if isinstance(item, chatbus.Message) else item.body)

    if isinstance(bus_or_backend, chatbus.Bus):
        await take(bus_or_backend)
    else:
        async with bus_or_backend.open_bus() as bus:  # type: ignore[attr-defined]
            await take(bus)
    return got


async def test_retention_keeps_at_most_max_events_per_stream_newest_last(backend):
    """The bound is the emitting bus's (the joiner's is the default), oldest out first.
    Postgres cuts a stream over a bound to 9/10 of it (rounded up)."""
    retention = chatbus.EventRetention(max_events=10)
    async with backend.open_bus(event_retention=retention) as bus:
        for i in range(50):
            await bus.emit("s", i)
    got = await _joiner_items(backend, "s")
    assert 9 <= len(got) <= 10 and got == list(range(50 - len(got), 50))


async def test_retention_keeps_at_most_max_bytes_per_stream(backend):
    body = "x" * 100  # each event is more than 100 bytes on the wire
    async with backend.open_bus(event_retention=chatbus.EventRetention(max_bytes=1000)) as bus:
        for _ in range(50):
            await bus.emit("s", body)
    got = await _joiner_items(backend, "s")
    assert 3 <= len(got) <= 9 and got == [body] * len(got)


async def test_retention_bounds_keyed_events_too_oldest_key_first(backend):
    retention = chatbus.EventRetention(max_events=3)
    async with backend.open_bus(event_retention=retention) as bus:
        await bus.publish("s", "question")
        for i in range(6):
            await bus.emit("s", {"k": i}, key=f"k{i}")
        await bus.emit("s", {"k": "again"}, key="k5")  # replaces k5: still three keys
    assert await _joiner_items(backend, "s") == [1, {"k": 3}, {"k": 4}, {"k": "again"}]


async def test_a_bus_with_a_wider_bound_keeps_more_for_its_own_streams(backend):
    """Each flush applies its bus's bound: the default (1000) keeps all 50 here."""
    async with backend.open_bus() as bus:
        for i in range(50):
            await bus.emit("s", i)
    assert await _joiner_items(backend, "s") == list(range(50))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_events": 0}, ValueError, "max_events must be between 1 and 100000, got 0"),
        ({"max_events": 100_001}, ValueError, "max_events"),
        ({"max_events": 1.5}, TypeError, "max_events must be an int, not float"),
        ({"max_events": True}, TypeError, "max_events must be an int, not bool"),
        ({"max_bytes": 0}, ValueError, "max_bytes must be between 1 and 67108864, got 0"),
        ({"max_bytes": "1"}, TypeError, "max_bytes must be an int, not str"),
    ],
)
def test_event_retention_is_validated_with_named_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        chatbus.EventRetention(**kwargs)


async def test_open_bus_takes_only_an_event_retention():
    with pytest.raises(TypeError, match=r"event_retention must be a chatbus\.EventRetention"):
        async with chatbus.open_bus(event_retention=10):  # type: ignore[arg-type]
            pass
    retention = chatbus.EventRetention(max_events=5, max_bytes=2048)
    assert retention == chatbus.EventRetention(max_events=5, max_bytes=2048)
    assert chatbus.EventRetention().max_events == 1000
    assert chatbus.EventRetention().max_bytes == 1024 * 1024
    async with chatbus.open_bus(event_retention=retention) as bus:
        await bus.emit("s", 1)


async def test_delete_stream_clears_the_retained_events(backend):
    """After a delete a joiner gets no event from before it, keyed or not, on a fresh bus
    or on the one that deleted; not even an unkeyed one whose position (after message 1)
    the new history reaches again."""
    async with backend.open_bus() as bus:
        await bus.publish("chat", "question")
        await bus.emit("chat", "part")
        await bus.emit("chat", {"state": "running"}, key="status")
        await bus.emit("chat", {"who": "al"}, key="typing:al", ttl=60)
        before = await _joiner_items(backend, "chat")
        assert before == [1, "part", {"state": "running"}, {"who": "al"}]
        await bus.delete_stream("chat")
        assert await _joiner_items(backend, "chat", quiet=0.3) == []
        await bus.publish("chat", "another question")  # a new history: id 1 again
        assert await _joiner_items(backend, "chat") == [1]
        assert await _joiner_items(bus, "chat") == [1]
        await bus.emit("chat", "new part")
        assert await _joiner_items(backend, "chat") == [1, "new part"]


async def test_delete_stream_clears_what_another_bus_emitted(backend):
    async with backend.open_bus() as emitter, backend.open_bus() as deleter:
        await emitter.publish("chat", "question")
        for part in ("a", "b"):
            await emitter.emit("chat", part)
        await emitter.emit("chat", "done", key="status")
        assert await _joiner_items(backend, "chat") == [1, "a", "b", "done"]
        await deleter.delete_stream("chat")
        await deleter.publish("chat", "again")
        assert await _joiner_items(emitter, "chat") == [1]
        assert await _joiner_items(backend, "chat") == [1]


@pytest.mark.postgres
async def test_postgres_delete_stream_leaves_no_event_rows_behind():
    """The retained rows and the stream's running totals (event_totals) go with it."""
    from psycopg import sql

    from chatbus.postgres import open_postgres

    from support.pg import admin_execute, fresh_schema

    async with fresh_schema() as (dsn, schema):
        async with (
            open_postgres(dsn, schema=schema) as (store, notifier),
            chatbus.open_bus(store=store, notifier=notifier) as bus,
        ):
            await bus.publish("chat", "question")
            await bus.emit("chat", "part")
            await bus.emit("chat", "state", key="status")
            await bus.publish("other", "kept")
            await bus.emit("other", "kept part")
            assert len(await _joiner_items(bus, "chat")) == 3

            def rows(table: str) -> dict[str, int]:
                query = sql.SQL("SELECT stream, count(*) FROM {} GROUP BY stream").format(
                    sql.Identifier(schema, table)
                )
                return dict(admin_execute(query))  # type: ignore[arg-type]

            assert rows("events") == {"chat": 2, "other": 1}
            assert rows("event_totals") == {"chat": 1, "other": 1}
            await bus.delete_stream("chat")
            assert rows("events") == {"other": 1}
            assert rows("event_totals") == {"other": 1}


async def test_a_key_keeps_its_newest_value_whichever_flush_comes_last(backend):
    # Two buses set one key a moment apart; the older value's flush (it lingered)
    # reaches the store last. Joiners get the newer value, as live subscribers did.
    async with backend.open_bus() as bus:
        await bus.publish("chat", "m")
        now = datetime.datetime.now(datetime.UTC)

        def status(value: str, emitter: str, ms: int) -> tuple[chatbus.Event, str]:
            at = now + datetime.timedelta(milliseconds=ms)
            event = chatbus.Event(
                stream="chat", after=1, body=value, key="status", ttl=None,
                created_at=at, emitter=emitter, seq=1,
            )  # fmt: skip
            return event, encode_event(event, json.dumps(value), to_micros(at))

        for event, text in (status("v2", "c", 2), status("v1", "a", 0)):
            await bus.store.retain_events(  # type: ignore[attr-defined]
                [event], [text], retention=chatbus.EventRetention()
            )
        retained = await bus.store.retained_events("chat", 1)  # type: ignore[attr-defined]
        assert [event.body for event in retained] == ["v2"]
