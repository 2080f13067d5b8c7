"""A stalled Cluster master holds up only its own streams' appends.

The group commit keeps a budget of round trips in flight per master: appends stuck on
a master that answers nothing (SIGSTOP: it holds its connections) must not use the
budget of the healthy ones. Bounded by an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import itertools

import pytest
import trio

from chatbus.redis import RedisStore
from chatbus.redis._resp import hash_slot

from support.pg import draft
from support.redis_bus import need_redis, open_redis_pair, unique_prefix
from support.redis_servers import RedisCluster, RedisServer, open_cluster

pytestmark = pytest.mark.redis
need_redis()


def _streams_by_master(nodes: RedisCluster, store: RedisStore, count: int) -> dict[int, list[str]]:
    """``count`` stream names for each master (by its port), found by their slots."""
    slots: dict[int, RedisServer] = {}
    for master in nodes.masters():
        for low, high in nodes.slots_of(master):
            for slot in range(low, high + 1):
                slots[slot] = master
    found: dict[int, list[str]] = {master.port: [] for master in nodes.masters()}
    for n in itertools.count():
        stream = f"room-{n}"
        meta = store.keys(stream).meta
        owned = found[slots[hash_slot(meta.encode())].port]
        if len(owned) < count:
            owned.append(stream)
        if all(len(names) >= count for names in found.values()):
            return found
    raise AssertionError("unreachable")  # pragma: no cover


async def test_a_stalled_master_does_not_hold_up_appends_to_the_others() -> None:
    """Appends stuck on a SIGSTOPped master (more of them than the whole in-flight
    budget) leave appends to streams on the other masters running: each completes
    within a second. Once the master resumes, the stuck appends complete too."""
    with trio.fail_after(60):
        async with open_cluster(masters=3) as nodes:
            options = {"max_in_flight": 2, "command_timeout": 20.0}
            async with open_redis_pair(nodes.url, prefix=unique_prefix(), **options) as (
                store,
                _,
            ):
                by_master = _streams_by_master(nodes, store, 4)
                everything = [stream for names in by_master.values() for stream in names]
                for stream in everything:  # warm: connections to every master open
                    await store.append(stream, [draft({"warm": True})])
                stalled_port, *healthy_ports = sorted(by_master)
                stalled = next(node for node in nodes.masters() if node.port == stalled_port)
                stuck_done: list[str] = []

                async def stuck(stream: str) -> None:
                    await store.append(stream, [draft({"stuck": stream})])
                    stuck_done.append(stream)

                stalled.pause()
                try:
                    async with trio.open_nursery() as nursery:
                        for stream in by_master[stalled_port]:
                            nursery.start_soon(stuck, stream)
                        await trio.sleep(0.3)  # all stuck (or queued) on the stalled master
                        for port in healthy_ports:
                            for stream in by_master[port]:
                                with trio.fail_after(1.0):
                                    messages = await store.append(
                                        stream, [draft({"healthy": stream})]
                                    )
                                assert [message.id for message in messages] == [2]
                        assert stuck_done == []  # the master really was stalled
                        stalled.resume()
                finally:
                    stalled.resume()
                assert sorted(stuck_done) == sorted(by_master[stalled_port])
                for stream in by_master[stalled_port]:
                    assert [m.id for m in await store.read(stream, 0, 10)] == [1, 2]
