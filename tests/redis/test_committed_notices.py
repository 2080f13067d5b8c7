"""Committed notices on real Redis servers (standalone and Cluster): the append
script's notice carries the batch's new messages, and a subscriber of another bus
takes them from it instead of the store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from chatbus._codec import NOTICE_DATA_BYTES, CommittedNotice
from chatbus.redis import RedisNotifier, RedisStore

from support.pg import Recorder, draft, eventually
from support.redis import fresh_redis_pair, redis_backend, redis_cluster_url, redis_url

pytestmark = pytest.mark.redis


@pytest.fixture(params=["redis", "redis-cluster"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def pair(kind: str) -> AsyncIterator[tuple[RedisStore, RedisNotifier]]:
    url = redis_url() if kind == "redis" else redis_cluster_url()
    async with fresh_redis_pair(url) as pair:
        yield pair


@attrs.define(eq=False)
class _CommittedRecorder(Recorder):
    committed_notices: list[CommittedNotice] = attrs.Factory(list)

    def committed(self, notice: CommittedNotice) -> None:
        self.committed_notices.append(notice)


@pytest.mark.parametrize("stream", ["plain", 'a "quoted" / \\ {name} ✓'])
async def test_an_append_notifies_what_it_stored(
    pair: tuple[RedisStore, RedisNotifier], nursery: trio.Nursery, stream: str
) -> None:
    store, notifier = pair
    recorder = _CommittedRecorder()
    with trio.fail_after(20):
        await nursery.start(notifier.listen, recorder)
        await notifier.watch(stream)
        await store.append(stream, [draft({"n": 1}), draft([1, "é"])])
        # A replayed key stores nothing: only the new draft rides in the notice.
        await store.append(stream, [draft("k", key="key-1/é")])
        await store.append(stream, [draft("k", key="key-1/é"), draft(None)])
        await eventually(lambda: len(recorder.committed_notices) == 3)
        stored = await store.read(stream, 0, 10)
        decoded = [m for n in recorder.committed_notices for m in n.messages() or []]
        assert decoded == stored
        assert [m.key for m in decoded] == [None, None, "key-1/é", None]
        assert {n.epoch for n in recorder.committed_notices} == {
            (await store.stream_info(stream)).epoch
        }
        assert recorder.notices == []


async def test_bodies_too_big_for_a_notice_get_a_plain_one(
    pair: tuple[RedisStore, RedisNotifier], nursery: trio.Nursery
) -> None:
    store, notifier = pair
    recorder = _CommittedRecorder()
    with trio.fail_after(20):
        await nursery.start(notifier.listen, recorder)
        await notifier.watch("big")
        await store.append("big", [draft("x" * (NOTICE_DATA_BYTES // 2))] * 2)
        await eventually(lambda: recorder.notices == [("big", 2)])
        assert recorder.committed_notices == []


async def test_a_subscriber_of_another_bus_takes_them_without_reading_the_store(
    kind: str,
) -> None:
    async with redis_backend(kind) as (open_bus, _, _):
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
