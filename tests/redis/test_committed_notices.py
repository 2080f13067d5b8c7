"""Committed notices on real Redis servers (standalone and Cluster): the append
script's notice carries the batch's new messages, and a subscriber of another bus
takes them from it instead of the store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from chatbus._codec import NOTICE_DATA_BYTES
from chatbus.redis import RedisNotifier, RedisStore

from support.pg import CommittedRecorder, draft, eventually
from support.redis import fresh_redis_pair, redis_cluster_url, redis_url

pytestmark = pytest.mark.redis


@pytest.fixture(params=["redis", "redis-cluster"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def pair(kind: str) -> AsyncIterator[tuple[RedisStore, RedisNotifier]]:
    url = redis_url() if kind == "redis" else redis_cluster_url()
    async with fresh_redis_pair(url) as pair:
        yield pair


@pytest.mark.parametrize("stream", ["plain", 'a "quoted" / \\ {name} ✓'])
async def test_an_append_notifies_what_it_stored(
    pair: tuple[RedisStore, RedisNotifier], nursery: trio.Nursery, stream: str
) -> None:
    store, notifier = pair
    recorder = CommittedRecorder()
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
    recorder = CommittedRecorder()
    with trio.fail_after(20):
        await nursery.start(notifier.listen, recorder)
        await notifier.watch("big")
        await store.append("big", [draft("x" * (NOTICE_DATA_BYTES // 2))] * 2)
        await eventually(lambda: recorder.notices == [("big", 2)])
        assert recorder.committed_notices == []
