"""Committed notices on a real server: a one-stream append's NOTIFY carries its
messages, and a subscriber of another bus takes them from it instead of the store.

Every test runs on a fresh schema and is bounded by an absolute ``trio.fail_after``.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

from chatbus._codec import NOTICE_DATA_BYTES, CommittedNotice
from chatbus.postgres import PostgresNotifier, PostgresStore

from support.pg import Recorder, draft, eventually, postgres_backend

pytestmark = pytest.mark.postgres


@attrs.define(eq=False)
class _CommittedRecorder(Recorder):
    committed_notices: list[CommittedNotice] = attrs.Factory(list)

    def committed(self, notice: CommittedNotice) -> None:
        self.committed_notices.append(notice)


@pytest.mark.parametrize("stream", ["plain", 'a "quoted" \\ name ✓'])
async def test_a_one_stream_append_notifies_what_it_stored(
    pair: tuple[PostgresStore, PostgresNotifier], stream: str
) -> None:
    store, notifier = pair
    recorder = _CommittedRecorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            await store.append(stream, [draft({"n": 1}), draft([1, "é"])])
            await store.append(stream, [draft("k", key="key-1"), draft(None)])
            await eventually(lambda: len(recorder.committed_notices) == 2)
            stored = await store.read(stream, 0, 10)
            decoded = [m for n in recorder.committed_notices for m in n.messages() or []]
            assert decoded == stored
            assert [m.key for m in decoded] == [None, None, "key-1", None]
            assert {n.epoch for n in recorder.committed_notices} == {
                (await store.stream_info(stream)).epoch
            }
            assert recorder.notices == []
            nursery.cancel_scope.cancel()


async def test_bodies_too_big_for_a_notice_get_a_plain_one(
    pair: tuple[PostgresStore, PostgresNotifier],
) -> None:
    store, notifier = pair
    recorder = _CommittedRecorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.listen, recorder)
            await store.append("big", [draft("x" * NOTICE_DATA_BYTES)])
            await eventually(lambda: recorder.notices == [("big", 1)])
            assert recorder.committed_notices == []
            nursery.cancel_scope.cancel()


async def test_a_subscriber_of_another_bus_takes_them_without_reading_the_store() -> None:
    async with postgres_backend() as (open_bus, _, _):
        with trio.fail_after(30):
            async with open_bus() as writer, open_bus() as reader:
                await writer.publish("room", {"i": 0})
                async with reader.open_subscriber("room") as sub:
                    received: list[Any] = [(await anext(aiter(sub))).body]
                    reads_at_start = sub.statistics().store_reads
                    async with writer.open_publisher("room") as pub:
                        for i in range(1, 30):
                            await pub.publish({"i": i}, key=f"k{i}" if i % 2 else None)
                            received.append((await anext(aiter(sub))).body)
                    assert received == [{"i": i} for i in range(30)]
                    assert sub.statistics().store_reads == reads_at_start
