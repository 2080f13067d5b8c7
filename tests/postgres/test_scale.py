"""Many subscriptions on one Postgres bus: they start without a read storm."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import chatbus
from chatbus.postgres import open_postgres

from support.pg import fresh_schema

pytestmark = pytest.mark.postgres

COUNT = 1500


async def test_many_subscriptions_start_at_once_without_store_errors():
    async with fresh_schema() as (dsn, schema):
        with trio.fail_after(90):
            async with (
                open_postgres(dsn, schema=schema, acquire_timeout=1.0) as (store, notifier),
                chatbus.open_bus(store=store, notifier=notifier) as bus,
                trio.open_nursery() as nursery,
            ):
                subscribers: list[chatbus.Subscriber] = []
                got: list[int] = []
                all_got = trio.Event()

                async def follow(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
                    async with bus.open_subscriber(f"room-{i}") as sub:
                        subscribers.append(sub)
                        task_status.started()
                        got.append((await sub.receive()).id)
                        if len(got) == COUNT // 100:
                            all_got.set()

                for i in range(COUNT):
                    await nursery.start(follow, i)
                for i in range(0, COUNT, 100):
                    await bus.publish(f"room-{i}", "hello")
                await all_got.wait()
                # Every start-up read queued in trio rather than timing out in the pool.
                assert sum(s.statistics().store_errors for s in subscribers) == 0
                assert got == [1] * (COUNT // 100)
                nursery.cancel_scope.cancel()
