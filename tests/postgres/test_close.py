"""Closing a Postgres bus under work it does not own: the README's "Shutdown" promise.

Each test uses a fresh schema and is bounded by an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import pytest
import trio

import chatbus
from chatbus.postgres import open_postgres

from support.pg import eventually, fresh_schema, row_lock

pytestmark = pytest.mark.postgres


async def test_closing_the_bus_mid_publish_raises_bus_closed_in_an_open_publisher() -> None:
    """The publisher's block (in a task the bus does not own) is mid-statement when the
    bus closes: the statement is cancelled on the server while the asyncio loop under
    the store closes, and the loop's own cancellation must not surface as a failed
    background task (``BusError: ... CancelledError()``): publishes get BusClosed."""
    rounds = 8
    outcomes: list[str] = []
    with trio.fail_after(60):
        async with fresh_schema() as (dsn, schema):
            async with open_postgres(dsn, schema=schema):
                pass  # the schema's tables, for the row lock
            for _ in range(rounds):
                async with row_lock(schema, "z"), trio.open_nursery() as outer:
                    async with (
                        open_postgres(dsn, schema=schema) as (store, notifier),
                        chatbus.open_bus(store=store, notifier=notifier) as bus,
                    ):

                        async def publish_in_a_loop(bus: chatbus.Bus = bus) -> None:
                            try:
                                async with bus.open_publisher("z") as pub:
                                    while True:
                                        await pub.publish({"x": 1})
                            except chatbus.BusClosed:
                                outcomes.append("BusClosed")
                            except Exception as exc:
                                outcomes.append(repr(exc))

                        outer.start_soon(publish_in_a_loop)
                        # The append blocks on the row lock: mid-statement for sure.
                        await eventually(lambda: store.statistics().in_flight == 1)
    assert outcomes == ["BusClosed"] * rounds, outcomes
