"""Events on Postgres ride in the append that follows them: a publish takes its
stream's waiting events into its own transaction (no flush of their own, no wait
for one), they reach other processes before its message and are retained for
joiners; and a bus's listener skips its own events undecoded. Each test is bounded
by an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from psycopg import sql

import chatbus
from chatbus.postgres import PostgresStore, open_postgres
from chatbus.postgres._listen import ListenSession

from support import items
from support.pg import admin_execute, fresh_schema

pytestmark = pytest.mark.postgres


class _Flushes:
    """Spies on every bus's flushes (event-only transactions); installed before the
    buses open (the flusher looks ``retain_events`` up once)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        #: The streams of each flush, but the stalled one.
        self.streams: list[list[str]] = []
        self._stall: str | None = None
        self._stuck, self._release = trio.Event(), trio.Event()
        retain = PostgresStore.retain_events

        async def retain_events(
            store: PostgresStore, events: Sequence[Any], encoded: Any, **kwargs: Any
        ) -> None:
            streams = sorted({event.stream for event in events})
            if streams == [self._stall] and not self._stuck.is_set():
                self._stuck.set()
                await self._release.wait()
            else:
                self.streams.append(streams)
            await retain(store, events, encoded, **kwargs)

        monkeypatch.setattr(PostgresStore, "retain_events", retain_events)

    @asynccontextmanager
    async def stalled(self, bus: chatbus.Bus, stream: str) -> AsyncIterator[None]:
        """Keep ``bus``'s flusher stuck in a flush of an event on ``stream`` for the block."""
        self._stall = stream
        await bus.emit(stream, "stuck")
        await self._stuck.wait()
        try:
            yield
        finally:
            self._release.set()


@asynccontextmanager
async def _chat(*, watch: bool = True) -> AsyncIterator[tuple[Any, ...]]:
    """Two processes over a fresh schema: this one with a bus and a publisher of
    "chat", the other one watching it (``events=True``; None if not ``watch``).
    Yields ``(schema, bus, publisher, remote subscription, joiner_sees)``, where
    ``await joiner_sees(count)`` is what a joiner on a third bus of the other process
    gets first (see :func:`support.items`)."""
    async with (
        fresh_schema() as (dsn, schema),
        open_postgres(dsn, schema=schema) as (store, notifier),
        open_postgres(dsn, schema=schema) as (remote_store, remote_notifier),
        chatbus.open_bus(store=remote_store, notifier=remote_notifier) as watcher,
        contextlib.AsyncExitStack() as stack,
    ):
        remote = None
        if watch:
            remote = await stack.enter_async_context(watcher.open_subscriber("chat", events=True))

        async def joiner_sees(count: int) -> list[Any]:
            async with (
                chatbus.open_bus(store=remote_store, notifier=remote_notifier) as joiner_bus,
                joiner_bus.open_subscriber("chat", events=True) as joiner,
            ):
                return await items(joiner, count)

        async with (
            chatbus.open_bus(store=store, notifier=notifier) as bus,
            bus.open_publisher("chat") as pub,
        ):
            yield schema, bus, pub, remote, joiner_sees


async def test_a_publish_carries_its_streams_waiting_events_in_its_own_transaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the flusher stuck, the publish still goes, its events ahead of it."""
    flushes = _Flushes(monkeypatch)
    with trio.fail_after(30):
        async with _chat() as (_schema, bus, pub, remote, joiner_sees):
            await pub.publish("question")
            assert (await remote.receive()).id == 1  # type: ignore[union-attr]
            async with flushes.stalled(bus, "elsewhere"):
                for i in range(3):
                    await pub.emit({"delta": i})
                await pub.emit({"state": "done"}, key="status")
                with trio.fail_after(10):  # waited for the stuck flusher before
                    message = await pub.publish("answer")
                assert message.id == 2
                got = await items(remote, 5)
                assert got == [{"delta": 0}, {"delta": 1}, {"delta": 2}, {"state": "done"}, 2]
                assert flushes.streams == []  # no transaction of their own
            assert remote.statistics().events_stale == 0
            # Retained by that transaction: a joiner on a third bus gets the state, in
            # its place (emitted after message 1).
            seen = await joiner_sees(3)
            assert seen == [1, {"state": "done"}, 2]


def _retained_keys(schema: str, stream: str) -> list[str | None]:
    """The keys of the events the table holds for ``stream`` (None: unkeyed), oldest first."""
    query = sql.SQL("SELECT key FROM {} WHERE stream = %s ORDER BY micros, seq").format(
        sql.Identifier(schema, "events")
    )
    return [key for (key,) in admin_execute(query, [stream])]


async def test_an_unkeyed_publish_retains_only_the_keyed_events_it_carries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its message moves the head past the unkeyed events it carries (positioned at the
    head before it), so no joiner would be given them: they are NOTIFYed, not written
    (the cost of events beside messages). Keyed ones are retained as a flush would."""
    flushes = _Flushes(monkeypatch)
    with trio.fail_after(30):
        async with _chat() as (schema, bus, pub, remote, joiner_sees):
            async with flushes.stalled(bus, "elsewhere"):
                await pub.emit({"delta": 0})
                await pub.emit({"state": "typing"}, key="status")
                assert (await pub.publish("answer")).id == 1
                got = await items(remote, 3)
                assert got == [{"delta": 0}, {"state": "typing"}, 1]
                assert flushes.streams == []  # carried, not flushed
            assert _retained_keys(schema, "chat") == ["status"]
            seen = await joiner_sees(2)
            assert seen == [{"state": "typing"}, 1]  # in its place: emitted before 1


async def test_a_replayed_keyed_publish_still_retains_the_unkeyed_events_it_carries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A publish whose every key was stored before stores nothing: the head stays
    where the events it carries are positioned, and a joiner must still get them."""
    flushes = _Flushes(monkeypatch)
    with trio.fail_after(30):
        async with _chat(watch=False) as (_, bus, pub, _, joiner_sees):
            first = await pub.publish("question", key="q-1")
            async with flushes.stalled(bus, "elsewhere"):
                await pub.emit({"delta": "thinking"})
                again = await pub.publish("question", key="q-1")
                assert (again.id, again.replay) == (first.id, True)
                assert flushes.streams == []  # carried by the replay's transaction
            seen = await joiner_sees(2)
            assert seen == [1, {"delta": "thinking"}]


async def test_a_flush_waits_for_the_append_carrying_its_streams_earlier_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-emitter order: events emitted while an append carries a stream's earlier
    ones go out after it, never in a flush that could commit first (then "early"
    would come after "late", and be dropped as stale)."""
    flushes = _Flushes(monkeypatch)
    carrying, release = trio.Event(), trio.Event()
    append_carrying = PostgresStore.append_carrying

    async def slow_append_carrying(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
        carrying.set()
        await release.wait()
        return await append_carrying(self, *args, **kwargs)

    monkeypatch.setattr(PostgresStore, "append_carrying", slow_append_carrying)
    with trio.fail_after(30):
        async with _chat() as (_schema, bus, pub, remote, _joiner_sees):
            async with trio.open_nursery() as nursery:
                async with flushes.stalled(bus, "elsewhere"):
                    await pub.emit("early")
                    nursery.start_soon(pub.publish, "message")
                    await carrying.wait()  # "early" is in it
                # Keyed (state), so it counts whenever it comes; the flusher is free
                # again, and must leave it to go after the carrying append.
                await pub.emit("late", key="status")
                await trio.sleep(0.2)
                assert flushes.streams == []
                release.set()
            got = await items(remote, 3)
            # (A keyed event may come before or after the message it followed: it is
            # delivered on arrival, the message once read.)
            assert got in (["early", 1, "late"], ["early", "late", 1])
            assert flushes.streams == [["chat"]]  # "late", once the carrying append was done
            assert remote.statistics().events_stale == 0


async def test_an_event_left_for_an_append_that_never_comes_is_flushed_after_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event on a stream just published to waits a moment for that stream's next
    append without waking the flusher; when none comes, the flusher's timer takes it
    (in a flush of its own) within the linger, not never."""
    flushes = _Flushes(monkeypatch)
    with trio.fail_after(30):
        async with _chat() as (_schema, _bus, pub, remote, _joiner_sees):
            await pub.publish("question")
            assert (await remote.receive()).id == 1  # type: ignore[union-attr]
            for i in range(3):  # the stream lingers: each time, the timer is kept
                await pub.publish(f"m{i}")
                await pub.emit({"delta": i})
                await trio.lowlevel.checkpoint()
                with trio.fail_after(2):
                    got = await items(remote, 2)
                assert got == [i + 2, {"delta": i}]
            assert flushes.streams == [["chat"]] * 3
            assert remote.statistics().events_stale == 0


class _Notify:
    def __init__(self, relname: bytes, extra: bytes) -> None:
        self.relname, self.extra, self.be_pid = relname, extra, 0


class _Handler:
    def __init__(self, emitter: str) -> None:
        self.emitter = emitter
        self.got: list[list[chatbus.Event]] = []

    def events(self, events: list[chatbus.Event]) -> None:
        self.got.append(events)


class _Conn:
    socket = -1


async def test_a_listener_skips_its_own_buses_events_undecoded() -> None:
    """Payloads end with their emitter (see _sql.events_payload_tail): a bus's own
    events came to its subscriptions at once, so its listener skips them unread."""
    with trio.fail_after(30):
        async with (
            fresh_schema() as (dsn, schema),
            open_postgres(dsn, schema=schema) as (store, notifier),
            chatbus.open_bus(store=store, notifier=notifier) as bus,
        ):
            payloads: list[bytes] = []
            arrived = trio.Event()
            send = ListenSession._dispatch

            def record(self: ListenSession, notify: Any) -> bool:
                if notify.extra.startswith(b'{"events":'):
                    payloads.append(notify.extra)
                    arrived.set()
                return send(self, notify)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(ListenSession, "_dispatch", record)
                event = await bus.emit("chat", {"delta": "hi"})
                with trio.fail_after(10):
                    await arrived.wait()
            (payload,) = payloads
            mine, other = _Handler(event.emitter), _Handler("someone-else")
            channel = notifier.channel.encode()
            for handler in (mine, other):
                session = ListenSession(_Conn(), channel, b"ping", handler)  # type: ignore[arg-type]
                assert session._dispatch(_Notify(channel, payload)) is (handler is other)  # type: ignore[arg-type]
            assert mine.got == []
            assert [[e.body for e in batch] for batch in other.got] == [[{"delta": "hi"}]]
