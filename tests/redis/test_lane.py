"""The store's pipelined script connections (``chatbus.redis._lane``).

Calls made at the same time share socket writes and each caller still gets its own
reply; a caller that gives up mid-call leaves the replies of the others in order.
"""

from __future__ import annotations

import uuid

import pytest
import trio

from chatbus.redis._lane import Lane
from chatbus.redis._lua import READ, Script

from support.pg import draft
from support.redis import fresh_redis_pair, redis_cluster_url, redis_url

pytestmark = pytest.mark.redis

TOPOLOGIES = ["standalone", "cluster"]


def _url(topology: str) -> str:
    return redis_url() if topology == "standalone" else redis_cluster_url()


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_concurrent_calls_share_writes_and_each_gets_its_own_reply(topology: str) -> None:
    with trio.fail_after(30):
        async with fresh_redis_pair(_url(topology)) as (store, _):
            streams = [f"s{i}" for i in range(40)]
            got: dict[str, list[int]] = {stream: [] for stream in streams}

            async def publish(stream: str) -> None:
                for n in range(5):
                    [message] = await store.append(stream, [draft({"n": n})])
                    got[stream].append(message.id)
                    page = await store.read(stream, 0, 100)
                    assert [m.body for m in page] == [{"n": i} for i in range(n + 1)]

            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(publish, stream)
            assert got == {stream: [1, 2, 3, 4, 5] for stream in streams}
            stats = store.statistics()
            # Every read, and every append round trip, on the lanes; fewer writes.
            assert stats.pipelined_calls >= 5 * len(streams) + stats.round_trips
            assert stats.pipelined_writes < stats.pipelined_calls  # shared writes


async def test_a_caller_cancelled_mid_call_leaves_the_others_in_order() -> None:
    """Callers cancelled after sending (their replies still come) and before (their
    request never left, or the connection is dropped): every other call gets its
    own reply, and the lane stays usable."""
    with trio.fail_after(30):
        async with fresh_redis_pair(redis_url()) as (store, _):
            for n in range(3):
                await store.append(f"c{n}", [draft(n)] * (n + 1))
            location = store.client.connection_pool.location  # type: ignore[union-attr]
            lane = Lane((location.host, location.port), None, None, 0, "chatbus-test", 5.0, 5.0)

            async def read(stream: str) -> int:
                keys = store.keys(stream)
                args = ["EVALSHA", READ.sha, 3, keys.meta, keys.entries, keys.redactions]
                flat = await lane.call([*args, 0, 100])
                return len(flat) // 5

            await store.read("c0", 0, 1)  # the script is loaded
            results: dict[int, int] = {}

            async def keep(n: int) -> None:
                results[n] = await read(f"c{n % 3}")

            for delay in (0, 0.0005, 0.002):
                results.clear()

                async with trio.open_nursery() as nursery:
                    for n in range(30):
                        if n % 4 == 0:
                            with trio.move_on_after(delay):  # gives up, maybe mid-call
                                await read(f"c{n % 3}")
                        else:
                            nursery.start_soon(keep, n)
                assert results == {n: n % 3 + 1 for n in range(30) if n % 4}
            assert await read("c2") == 3
            lane.close()


async def test_an_error_reply_is_that_call_s_own() -> None:
    """NOSCRIPT and script errors come back to their caller as coredis errors; the
    calls around them are answered normally."""
    import coredis.exceptions

    with trio.fail_after(30):
        async with fresh_redis_pair(redis_url()) as (store, _):
            location = store.client.connection_pool.location  # type: ignore[union-attr]
            lane = Lane((location.host, location.port), None, None, 0, "chatbus-test", 5.0, 5.0)
            missing = Script("missing", f"return 1 -- never loaded {uuid.uuid4().hex}")
            with pytest.raises(coredis.exceptions.NoScriptError):
                await lane.call(["EVALSHA", missing.sha, 0])
            with pytest.raises(coredis.exceptions.ResponseError, match="boom"):
                await lane.call(["EVAL", "return redis.error_reply('boom')", 0])
            assert await lane.call(["EVAL", "return 7", 0]) == 7
            lane.close()
