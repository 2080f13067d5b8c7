"""A reply lost after COMMIT: the caller is never told "failed" about a committed message.

A proxy forwards the append to the server, which commits it, and swallows the reply.
The store then finds out from the batch's token whether it committed (and returns the
message), or says the outcome is unknown (:class:`chatbus.OutcomeUnknown`), never a
:class:`chatbus.StoreError`, which means nothing was stored.
"""

from __future__ import annotations

import pytest
import trio
from psycopg import sql

import chatbus

from support.pg import TcpProxy, admin_execute, draft, fresh_postgres_pair, pg_dsn

pytestmark = pytest.mark.postgres


async def test_lone_unkeyed_append_whose_reply_is_lost_returns_the_committed_message() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with fresh_postgres_pair(dsn=proxy.dsn(pg_dsn()), acquire_timeout=2) as (
                store,
                _,
            ):
                await store.append("lost-reply", [draft("first")])
                proxy.lose_reply_to(b"lost-reply")
                [message] = await store.append("lost-reply", [draft("second")])
                assert proxy.replies_lost == 1
                assert (message.id, message.body) == (2, "second")
                stored = await store.read("lost-reply", 0, 10)
                assert [(m.id, m.body) for m in stored] == [(1, "first"), (2, "second")]
                assert stored[1].created_at == message.created_at
            nursery.cancel_scope.cancel()


async def test_keyed_and_unkeyed_batch_whose_reply_is_lost_is_never_reported_failed() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy.to_dsn(pg_dsn())
            await proxy.start(nursery)
            async with (
                fresh_postgres_pair(dsn=proxy.dsn(pg_dsn()), acquire_timeout=2) as (
                    store,
                    notifier,
                ),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
                bus.open_publisher("lost-mixed") as pub,
            ):
                await pub.publish("warm-up")
                proxy.lose_reply_to(b"lost-mixed")
                outcomes: list[object] = []

                async def publish(body: str, key: str | None) -> None:
                    try:
                        outcomes.append(await pub.publish(body, key=key))
                    except (chatbus.StoreError, chatbus.OutcomeUnknown) as exc:
                        outcomes.append(exc)

                async with trio.open_nursery() as callers:  # one batch: keyed + unkeyed
                    callers.start_soon(publish, "keyed", "k1")
                    callers.start_soon(publish, "unkeyed", None)
                assert proxy.replies_lost == 1
                stored = [m.body for m in await bus.read("lost-mixed")]
                assert sorted(stored) == ["keyed", "unkeyed", "warm-up"]  # it did commit
                for outcome in outcomes:
                    # Committed: returned, or "unknown" — never a StoreError.
                    assert not isinstance(outcome, chatbus.StoreError), outcome
                # The documented way out: retry keyed publishes with the same key.
                again = await pub.publish("keyed", key="k1")
                assert again.replay and again.body == "keyed"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("key", [None, "k"])
async def test_append_the_server_refused_is_a_store_error_not_unknown(key: str | None) -> None:
    with trio.fail_after(20):
        async with fresh_postgres_pair() as (store, _):
            await store.append("s", [draft("before")])
            drop = sql.SQL("DROP TABLE {}").format(sql.Identifier(store.schema, "messages"))
            await trio.to_thread.run_sync(admin_execute, drop)
            with pytest.raises(chatbus.StoreError, match="UndefinedTable"):
                await store.append("s", [draft("refused", key)])
