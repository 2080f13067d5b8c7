"""The Redis listener: watch confirms before it returns, losses become resyncs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from chatbus._codec import encode_notice
from chatbus.redis import LISTEN_CLIENT_NAME, RedisNotifier, RedisStore
from chatbus.redis._open import parse_url

from support.pg import Recorder, eventually
from support.redis import fresh_redis_pair, redis_cluster_url, redis_url
from support.redis_servers import command as redis_command

pytestmark = pytest.mark.redis


@pytest.fixture(params=["redis", "redis-cluster"])
def url(request: pytest.FixtureRequest) -> str:
    return redis_url() if request.param == "redis" else redis_cluster_url()


@pytest.fixture
async def pair(url: str) -> AsyncIterator[tuple[RedisStore, RedisNotifier]]:
    async with fresh_redis_pair(url, ping_interval=0.2, ping_timeout=1, max_backoff=0.1) as pair:
        yield pair


async def _on_every_node(url: str, *command: object) -> None:
    """Run ``command`` on every server of ``url`` (each primary of a Cluster)."""
    server, _ = parse_url(url)
    ports = [port for _, port in server.addresses]
    if server.cluster:
        nodes = redis_command(ports[0], "CLUSTER", "NODES")
        ports = [
            int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            for line in nodes.splitlines()
            if "master" in line.split()[2]
        ]
    for port in ports:
        await trio.to_thread.run_sync(lambda p=port: redis_command(p, *command))


async def _notice(store: RedisStore, stream: str, last_id: int) -> None:
    await store.client.spublish(store.keys(stream).channel, encode_notice(stream, last_id))


async def test_watch_returns_once_the_subscription_is_confirmed(
    pair: tuple[RedisStore, RedisNotifier], nursery: trio.Nursery
) -> None:
    store, notifier = pair
    recorder = Recorder()
    with trio.fail_after(10):
        await nursery.start(notifier.listen, recorder)
        for n in range(20):
            stream = f"s{n}"
            await notifier.watch(stream)
            assert stream in notifier.confirmed  # the server said so
            await _notice(store, stream, n + 1)  # at once: it must not be lost
        await eventually(lambda: len(recorder.notices) == 20)
        # Every notice, once (on a Cluster, streams of different shards come over
        # different connections: no order between them).
        assert sorted(recorder.notices) == sorted((f"s{n}", n + 1) for n in range(20))
        notifier.unwatch("s0")
        await eventually(lambda: "s0" not in notifier.watched)
        await trio.sleep(0.2)  # the SUNSUBSCRIBE is sent in the background
        await _notice(store, "s0", 99)
        await _notice(store, "s1", 99)
        await eventually(lambda: ("s1", 99) in recorder.notices)
        assert ("s0", 99) not in recorder.notices


async def test_a_cancelled_watch_never_holds_up_the_next_one(
    pair: tuple[RedisStore, RedisNotifier], nursery: trio.Nursery
) -> None:
    """A watch cancelled on its way (a client gone while its subscription opened)
    leaves nothing that takes the next watch's confirmation: that one returns at once,
    with no lost session and no resync."""
    _, notifier = pair
    await nursery.start(notifier.listen, Recorder())
    await notifier.watch("kept")  # its connection is up: a watch goes straight to send
    for n in range(5):
        with trio.CancelScope() as scope:
            scope.cancel()
            await notifier.watch(f"s{n}")
        notifier.unwatch(f"s{n}")
    for n in range(5):
        with trio.fail_after(0.5):  # ping_timeout is 1 s: a stuck watch waits it out
            await notifier.watch(f"s{n}")
        assert f"s{n}" in notifier.confirmed
    assert notifier.reconnects == 0


async def test_a_killed_listen_connection_resubscribes_and_resyncs(
    url: str, pair: tuple[RedisStore, RedisNotifier], nursery: trio.Nursery
) -> None:
    store, notifier = pair
    recorder = Recorder()
    with trio.fail_after(20):
        await nursery.start(notifier.listen, recorder)
        await notifier.watch("s")
        for round_ in range(1, 4):
            await _on_every_node(url, "CLIENT", "KILL", "TYPE", "pubsub")
            await eventually(lambda: recorder.resyncs >= round_)  # noqa: B023
            await eventually(lambda: notifier.reconnects >= round_)  # noqa: B023
            # Subscribed again: a notice now arrives.
            await eventually(lambda: "s" in notifier.watched)
            while ("s", round_) not in recorder.notices:
                await _notice(store, "s", round_)
                await trio.sleep(0.05)


async def test_a_silent_server_is_noticed_by_the_ping(
    url: str, pair: tuple[RedisStore, RedisNotifier], nursery: trio.Nursery
) -> None:
    """CLIENT PAUSE holds the listener's ping: after ping_timeout it reconnects."""
    _, notifier = pair
    recorder = Recorder()
    with trio.fail_after(20):
        await nursery.start(notifier.listen, recorder)
        await notifier.watch("s")
        await _on_every_node(url, "CLIENT", "PAUSE", 1500)
        await eventually(lambda: recorder.resyncs >= 1)


def test_listen_connections_are_named() -> None:
    assert LISTEN_CLIENT_NAME == "chatbus-listen"


async def test_the_cluster_layout_is_asked_of_known_nodes_when_no_seed_answers() -> None:
    """After a failover the seeds of the URL may all be gone: the listener then asks
    the nodes the last CLUSTER SLOTS named."""
    from chatbus._listener import ListenLost
    from chatbus.redis._session import Server, cluster_slots

    server, _ = parse_url(redis_cluster_url())
    with trio.fail_after(10):
        slots, nodes = await cluster_slots(server, 2)
        assert set(server.addresses) <= set(nodes)
        gone = Server(addresses=(("127.0.0.1", 1),), cluster=True)
        with pytest.raises(ListenLost, match="no cluster node answered"):
            await cluster_slots(gone, 2)
        assert await cluster_slots(gone, 2, nodes) == (slots, nodes)
