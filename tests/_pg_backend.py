"""The Postgres world of the conformance suite: one fresh schema per test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
import trio

import chatbus
from chatbus.postgres import channel_for_schema, open_postgres

from _pg import fresh_schema


@asynccontextmanager
async def postgres_backend() -> AsyncIterator[
    tuple[Callable[..., AbstractAsyncContextManager[chatbus.Bus]], Callable[[str, int], Any]]
]:
    async with fresh_schema() as (dsn, schema):

        @asynccontextmanager
        async def open_bus(**options: Any) -> AsyncIterator[chatbus.Bus]:
            """A bus with its own pool and LISTEN connection: another "process"."""
            async with open_postgres(dsn, schema=schema) as (store, notifier):
                async with chatbus.open_bus(
                    store=options.pop("store", store), notifier=notifier, **options
                ) as bus:
                    yield bus

        def notify(stream: str, last_id: int) -> None:
            payload = json.dumps({"stream": stream, "last_id": last_id})
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", [channel_for_schema(schema), payload])

        async def inject_notice(stream: str, last_id: int) -> None:
            await trio.to_thread.run_sync(notify, stream, last_id)

        yield open_bus, inject_notice
