"""The Redis store on its own: keys and names, the batch token, replays, the lifecycle.

Runs on the standalone server ($CHATBUS_TEST_REDIS_URL) and, where the slot layout
matters, on the Cluster ($CHATBUS_TEST_REDIS_CLUSTER_URL).
"""

from __future__ import annotations

import sys
import textwrap
import time
from typing import Any

import pytest
import trio

import chatbus
from chatbus.redis import RedisStore, open_redis, stream_tag
from chatbus.redis._lua import (
    APPEND,
    KEY_CHUNK,
    KEYS_HASH_NOTE,
    TOKENS_KEPT,
    TOKENS_MAX,
    TOKENS_MIN_AGE_SECONDS,
    TOKENS_SLACK,
    TOKENS_TTL,
    StreamKeys,
)
from chatbus.redis._resp import hash_slot

from support.pg import draft
from support.redis import (
    fresh_prefix,
    fresh_redis_pair,
    redis_cluster_url,
    redis_url,
    unique_prefix,
)

pytestmark = pytest.mark.redis

HOSTILE = [
    "{",
    "}",
    "{}",
    "a{b}c",
    "}{",
    "{{x}}",
    "room:1",
    "a" * 256,
    "☃ chat 🎉",
    "ünïcødé",
    "\x01\x1e\x7f",
    " ",
    "*?[]\\",
]


@pytest.fixture(params=["redis", "redis-cluster"])
def url(request: pytest.FixtureRequest) -> str:
    return redis_url() if request.param == "redis" else redis_cluster_url()


def test_every_key_of_a_stream_shares_one_slot_and_names_stay_distinct() -> None:
    tags = {stream_tag(name) for name in HOSTILE}
    assert len(tags) == len(HOSTILE)  # injective
    for name in HOSTILE:
        keys = StreamKeys.of("chatbus", name)
        assert "{" not in stream_tag(name) and "}" not in stream_tag(name)
        slots = {hash_slot(key.encode()) for key in [*keys.all, keys.channel]}
        assert len(slots) == 1, name


async def test_hostile_names_round_trip_and_stay_apart(url: str) -> None:
    with trio.fail_after(30):
        async with fresh_redis_pair(url) as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                for n, name in enumerate(HOSTILE):
                    async with bus.open_subscriber(name) as sub:
                        for i in range(n + 1):
                            await bus.publish(name, {"name": name, "i": i}, key=f"k{i}")
                        got = [(await sub.receive()).body for _ in range(n + 1)]
                        assert got == [{"name": name, "i": i} for i in range(n + 1)]
                for n, name in enumerate(HOSTILE):
                    page = await bus.read(name, after=0)
                    assert [m.body["i"] for m in page] == list(range(n + 1))
                    assert {m.stream for m in page} == {name}
                    assert (await bus.stream_info(name)).head == n + 1


def _append_args(
    store: RedisStore, stream: str, token: str, bodies: list[str], keys: list[str] | None = None
) -> list[object]:
    names = store.keys(stream)
    return [0, 0, TOKENS_KEPT, 1, token, names.channel, stream, 7, len(bodies),
            *(keys or [""] * len(bodies)), *bodies]  # fmt: skip


def _append_keys(store: RedisStore, stream: str) -> list[str]:
    keys = store.keys(stream)
    return [keys.meta, keys.entries, keys.keys, keys.tokens, keys.token_order, keys.redactions]


async def test_running_a_batch_again_returns_the_first_outcome_and_stores_nothing(
    url: str,
) -> None:
    """What a re-run after a lost reply does: same token, same outcome, no copy."""
    with trio.fail_after(20):
        async with fresh_redis_pair(url) as (store, _):
            await store.append("s", [draft("before")])
            args = _append_args(store, "s", "token-1", ['"a"', '"b"'])
            first = await store._script(APPEND, _append_keys(store, "s"), args)
            await store.append("s", [draft("between")])
            args[1] = 5_000_000  # a re-run, 5 s after the first send
            again = await store._script(APPEND, _append_keys(store, "s"), args)
            assert first[0] == b"ok" and again[0] == b"again"
            assert again[3:5] == first[3:5] == [3, first[4]]  # last id 3, same created_at
            page = await store.read("s", 0, 10)
            assert [m.body for m in page] == ["before", "a", "b", "between"]


async def test_running_a_keyed_batch_again_returns_the_first_outcome_and_stores_nothing(
    url: str,
) -> None:
    """A keyed batch re-run with its token (its reply was lost) gets the first run's
    outcome: the same last id, the same stored message for the key found before it,
    and no key or entry written twice, though another batch ran in between."""
    with trio.fail_after(20):
        async with fresh_redis_pair(url) as (store, _):
            await store.append("s", [draft("old", key="a")])
            keys = ["b", "a", "", "b", "c"]  # new, stored before, none, repeated, new
            bodies = ['"b"', '"a2"', '"none"', '"b"', '"c"']
            args = _append_args(store, "s", "token-k", bodies, keys)
            first = await store._script(APPEND, _append_keys(store, "s"), args)
            await store.append("s", [draft("between", key="d")])
            args[1] = 5_000_000  # a re-run, 5 s after the first send
            again = await store._script(APPEND, _append_keys(store, "s"), args)
            assert first[0] == b"ok" and again[0] == b"again"
            assert first[3] == again[3] == 4  # b, the unkeyed one, c: ids 2 to 4
            assert first[5] == again[5] == 1  # one draft found a stored key: a, draft 2
            assert first[6:11] == again[6:11]
            index, id_, _, body, redacted = first[6:11]
            assert (index, id_, body, redacted) == (2, 1, b'"old"', 0)
            page = await store.read("s", 0, 10)
            assert [(m.id, m.key, m.body) for m in page] == [
                (1, "a", "old"),
                (2, "b", "b"),
                (3, None, "none"),
                (4, "c", "c"),
                (5, "d", "between"),
            ]
            replays = await store.append("s", [draft("b", key="b"), draft("c", key="c")])
            assert [(m.id, m.replay) for m in replays] == [(2, True), (4, True)]


async def test_a_batch_of_more_keys_than_one_command_takes_stores_each_once(url: str) -> None:
    """The script looks the keys up and records them in chunks of KEY_CHUNK: a batch of
    several chunks, with keys stored before it and keys repeated in it on both sides of
    a chunk's edge, stores every new key once with dense ids and replays the rest."""
    size = 3 * KEY_CHUNK
    with trio.fail_after(60):
        async with fresh_redis_pair(url) as (store, _):
            drafts = []
            for i in range(size):
                if i % 5 == 4:
                    key: str | None = f"k{i - KEY_CHUNK}" if i >= KEY_CHUNK else f"k{i - 1}"
                else:
                    key = f"k{i}" if i % 11 else None
                drafts.append(draft(key, key=key))
            distinct = list(dict.fromkeys(d.key for d in drafts if d.key is not None))
            assert len(distinct) > 2 * KEY_CHUNK + 1
            edges = {KEY_CHUNK - 1, KEY_CHUNK, 2 * KEY_CHUNK - 1, 2 * KEY_CHUNK, len(distinct) - 1}
            stored_before = {distinct[j] for j in range(0, len(distinct), 97)} | {
                distinct[j] for j in edges
            }
            await store.append("s", [draft(key, key=key) for key in sorted(stored_before)])
            head = len(stored_before)
            messages = await store.append("s", drafts)
            expected_ids: dict[str, int] = {}
            next_id = head
            for message, d in zip(messages, drafts, strict=True):
                if d.key is None:
                    next_id += 1
                    assert (message.id, message.replay) == (next_id, False)
                elif d.key in stored_before:
                    assert message.replay and message.body == d.key, (d.key, message)
                elif d.key in expected_ids:
                    assert (message.id, message.replay) == (expected_ids[d.key], True)
                else:
                    next_id += 1
                    expected_ids[d.key] = next_id
                    assert (message.id, message.replay) == (next_id, False)
            page = await store.read("s", head, size + 10)
            assert [m.id for m in page] == list(range(head + 1, next_id + 1))
            assert len({m.key for m in page if m.key is not None}) == len(expected_ids)
            again = await store.append("s", [draft(key, key=key) for key in expected_ids])
            assert all(m.replay for m in again)
            assert [m.id for m in again] == list(expected_ids.values())


async def _age_token_records(store: RedisStore, stream: str, seconds: float) -> None:
    """Make every token record of ``stream`` look ``seconds`` older (its order list)."""
    client, keys = store.client, store.keys(stream)
    for index, entry in enumerate(await client.lrange(keys.token_order, 0, -1)):
        token, us = entry.split(b" ")
        older = int(us) - round(seconds * 1_000_000)
        await client.lset(keys.token_order, index, token + b" %d" % older)


async def test_a_rerun_whose_record_may_have_been_dropped_is_unknown(url: str) -> None:
    with trio.fail_after(30):
        async with fresh_redis_pair(url) as (store, _):
            args = _append_args(store, "s", "lost-token", ['"x"'])
            for i in range(TOKENS_KEPT + TOKENS_SLACK + 1):
                await store.append("s", [draft(i)])
            # Older than a re-run can come: the next append drops the oldest.
            await _age_token_records(store, "s", TOKENS_MIN_AGE_SECONDS + 1)
            await store.append("s", [draft("drops")])
            args[1] = 60_000_000  # within the last minute: records of that age were dropped
            reply = await store._script(APPEND, _append_keys(store, "s"), args)
            assert reply[0] == b"unknown"
            args[1] = 1  # 1 µs: no record that young was dropped, so it never ran
            reply = await store._script(APPEND, _append_keys(store, "s"), args)
            assert reply[0] == b"ok" and reply[3] == TOKENS_KEPT + TOKENS_SLACK + 3


async def test_a_rerun_on_a_busy_stream_finds_its_record(url: str) -> None:
    """Records go by age, not by count alone: a batch re-run after a lost reply gets
    its first run's outcome although hundreds of batches were appended to the stream
    meanwhile (a count of 64 to 80 records lasted a fraction of a second on a busy
    stream, and every lost reply there was an unknown outcome)."""
    with trio.fail_after(30):
        async with fresh_redis_pair(url) as (store, _):
            args = _append_args(store, "s", "lost-reply", ['"x"'])
            first = await store._script(APPEND, _append_keys(store, "s"), args)
            for i in range(4 * (TOKENS_KEPT + TOKENS_SLACK)):
                await store.append("s", [draft(i)])
            args[1] = 3_000_000  # the re-run, 3 s after the first send
            again = await store._script(APPEND, _append_keys(store, "s"), args)
            assert first[0] == b"ok" and again[0] == b"again"
            assert again[3:5] == first[3:5] == [1, first[4]]


async def test_token_records_stay_bounded_and_expire_when_the_stream_idles(url: str) -> None:
    """A stream keeps the records of its batches of the last TOKENS_MIN_AGE_SECONDS,
    and of its last TOKENS_KEPT to TOKENS_KEPT + TOKENS_SLACK batches once older,
    the same in the order list as in the hash. Their expiry is renewed by an append
    when it was last renewed a minute ago or more (by the server's clock, a jump
    either way counting), so an idle stream's go within TOKENS_TTL and an active
    one's always have minutes left."""

    async def kept_records() -> list[bytes]:
        kept = await client.hkeys(keys.tokens)
        order = await client.lrange(keys.token_order, 0, -1)
        assert sorted(kept) == sorted(entry.split(b" ")[0] for entry in order)
        return kept

    with trio.fail_after(30):
        async with fresh_redis_pair(url) as (store, _):
            client = store.client
            keys = store.keys("s")
            for i in range(3 * (TOKENS_KEPT + TOKENS_SLACK)):
                await store.append("s", [draft(i)])
                assert len(await kept_records()) == i + 1  # all young: all kept
            await _age_token_records(store, "s", TOKENS_MIN_AGE_SECONDS + 1)
            for _ in range(5):  # at most TOKENS_DROP go per append
                await store.append("s", [draft("drops")])
            assert TOKENS_KEPT <= len(await kept_records()) <= TOKENS_KEPT + TOKENS_SLACK
            for key in (keys.tokens, keys.token_order):
                assert TOKENS_TTL - 5 < await client.ttl(key) <= TOKENS_TTL
                await client.expire(key, 100)
            await store.append("s", [draft("renewed a moment ago: not again")])
            for key in (keys.tokens, keys.token_order):
                assert 0 < await client.ttl(key) <= 100
            now = round(time.time() * 1_000_000)  # the servers run on this machine
            for renewed_at in (now - 61_000_000, now + 3_600_000_000):  # a minute ago; ahead
                await client.hset(keys.meta, {"ttl_us": renewed_at})
                await store.append("s", [draft("renews")])
                for key in (keys.tokens, keys.token_order):
                    assert TOKENS_TTL - 5 < await client.ttl(key) <= TOKENS_TTL
                    await client.expire(key, 100)


async def test_a_stream_keeps_at_most_tokens_max_records_whatever_their_age(url: str) -> None:
    with trio.fail_after(60):
        async with fresh_redis_pair(url) as (store, _):
            keys = store.keys("s")
            for i in range(TOKENS_MAX + 200):
                await store.append("s", [draft(i)])
            kept = await store.client.llen(keys.token_order)
            assert TOKENS_MAX - 64 <= kept <= TOKENS_MAX
            assert await store.client.hlen(keys.tokens) == kept


async def test_keyed_replays_carry_the_stored_body(url: str) -> None:
    with trio.fail_after(20):
        async with fresh_redis_pair(url) as (store, _):
            [first] = await store.append("s", [draft({"v": 1}, key="k")])
            second, third, new = await store.append(
                "s", [draft({"v": 2}, key="k"), draft({"v": 1}, key="k"), draft(3, key="n")]
            )
            assert second.replay and third.replay and not new.replay
            assert second.id == third.id == first.id == 1 and new.id == 2
            assert second.body == {"v": 1}  # the stored body: the publisher sees a conflict
            assert second.created_at == first.created_at


REPLAYER = textwrap.dedent(
    """
    import sys, trio, chatbus
    from chatbus.redis import open_redis

    async def main(url, prefix):
        async with open_redis(url, prefix=prefix) as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                ids = []
                for i in range(50):
                    msg = await bus.publish("s", {"i": i}, key=f"key-{i}")
                    ids.append(msg.id)
                print(",".join(map(str, ids)))

    trio.run(main, sys.argv[1], sys.argv[2])
    """
)


async def test_two_processes_publishing_the_same_keys_at_once_store_each_once(url: str) -> None:
    with trio.fail_after(60):
        async with fresh_prefix(url) as prefix:
            results: list[str] = []

            async def run() -> None:
                done = await trio.run_process(
                    [sys.executable, "-c", REPLAYER, url, prefix], capture_stdout=True
                )
                results.append(done.stdout.decode().strip())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                nursery.start_soon(run)
            assert results[0] == results[1]  # each key got one id, seen by both
            async with open_redis(url, prefix=prefix) as (store, _):
                page = await store.read("s", 0, 1000)
                assert sorted(m.body["i"] for m in page) == list(range(50))
                assert [m.id for m in page] == list(range(1, 51))


async def test_a_streams_keys_hash_is_a_hashtable_from_its_first_key(url: str) -> None:
    """A listpack hash is scanned by every lookup: the first keyed append gives the
    keys hash the field '' (never a key) with a value too long for a listpack. A
    stream whose keys hash is still a listpack (made before) gets it at its next keyed
    append, and its keys keep answering."""
    with trio.fail_after(20):
        async with fresh_redis_pair(url) as (store, _):
            client = store.client
            keys = store.keys("s")
            await store.append("s", [draft(0)])
            assert await client.exists([keys.keys]) == 0  # no key yet, no hash
            await store.append("s", [draft(1, key="a"), draft(2, key="b")])
            assert await client.object_encoding(keys.keys) == b"hashtable"
            assert await client.hget(keys.keys, "") == KEYS_HASH_NOTE.encode()
            # As a stream keyed before the note existed: a listpack without it.
            await client.hdel(keys.meta, ["kh"])
            records = await client.hgetall(keys.keys)
            await client.delete([keys.keys])
            await client.hset(keys.keys, {f: v for f, v in records.items() if f != b""})
            assert await client.object_encoding(keys.keys) == b"listpack"
            replay, new = await store.append("s", [draft(1, key="a"), draft(3, key="c")])
            assert (replay.id, replay.replay, new.id, new.replay) == (2, True, 4, False)
            assert await client.object_encoding(keys.keys) == b"hashtable"
            assert await client.hlen(keys.keys) == 4  # a, b, c and the note
            await store.trim("s", 5)
            [again] = await store.append("s", [draft(2, key="b")])
            assert (again.id, again.replay, again.body) == (3, True, 2)


async def test_trim_keeps_keys_and_redact_keeps_id_and_key(url: str) -> None:
    with trio.fail_after(20):
        async with fresh_redis_pair(url) as (store, _):
            await store.append("s", [draft(i, key=f"k{i}" if i % 2 else None) for i in range(10)])
            assert await store.trim("s", 6) == 6
            assert [m.id for m in await store.read("s", 0, 100)] == [6, 7, 8, 9, 10]
            [replay] = await store.append("s", [draft(1, key="k1")])
            assert replay.replay and (replay.id, replay.body) == (2, 1)
            tomb = await store.redact("s", 8)
            assert tomb is not None and (tomb.key, tomb.body, tomb.redacted) == ("k7", None, True)
            page = await store.read("s", 5, 100)
            assert [(m.id, m.redacted, m.body) for m in page] == [
                (6, False, 5),
                (7, False, 6),
                (8, True, None),
                (9, False, 8),
                (10, False, 9),
            ]
            assert await store.redact("s", 3) is None  # trimmed
            await store.delete_stream("s")
            assert not (await store.stream_info("s")).exists
            keys = store.keys("s")
            assert await store.client.exists(keys.all) == 0


async def test_a_redis_that_is_down_fails_promptly_with_a_store_error() -> None:
    with trio.fail_after(10):
        for url in ("redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1,127.0.0.1:2"):
            with pytest.raises(chatbus.StoreError, match="opening the Redis store"):
                async with open_redis(url, connect_timeout=1):
                    pass


def test_bad_options_and_urls_say_what_is_wrong() -> None:
    from chatbus.redis._open import parse_url

    with pytest.raises(ValueError, match="prefix must not contain braces"):
        trio.run(_open_with, {"prefix": "a{b}"})
    with pytest.raises(ValueError, match="durability must be 'fast' or 'durable'"):
        trio.run(_open_with, {"durability": "eventually"})
    with pytest.raises(ValueError, match="unknown Redis url option 'schema'"):
        parse_url("redis://h:1/0?schema=x")
    with pytest.raises(ValueError, match="use redis\\+cluster://"):
        parse_url("redis://a:1,b:2")
    server, options = parse_url("redis+cluster://u:p%40ss@a:1,b:2?prefix=chat&wait_timeout=2")
    assert server.addresses == (("a", 1), ("b", 2)) and server.cluster
    assert (server.username, server.password) == ("u", "p@ss")
    assert options == {"prefix": "chat", "wait_timeout": 2.0}


async def _open_with(options: dict[str, object]) -> None:
    async with open_redis("redis://127.0.0.1:1/0", **options):  # type: ignore[arg-type]
        pass


async def _proxied(nursery: trio.Nursery) -> tuple[Any, str, str]:
    """A TCP proxy (support.tcp_proxy) in front of the standalone test server:
    ``(proxy, url through it, url of the server)``."""
    from chatbus.redis._open import parse_url

    from support.tcp_proxy import TcpProxy

    url = redis_url()
    server = parse_url(url)[0]
    (host, port), *_ = server.addresses
    proxy = TcpProxy(host, port)
    await proxy.start(nursery)
    return proxy, f"redis://127.0.0.1:{proxy.port}/{server.db}", url


async def test_a_lost_reply_is_resolved_by_running_the_batch_again(nursery: trio.Nursery) -> None:
    """The reply to the append is lost after the server ran it (the proxy cuts the
    connection): the store runs the batch again with its token and returns the first
    run's messages. Nothing is stored twice; no OutcomeUnknown."""
    proxy, through, url = await _proxied(nursery)
    with trio.fail_after(20):
        async with (
            fresh_prefix(url) as prefix,
            open_redis(through, prefix=prefix) as (store, _),
        ):
            await store.append("s", [draft("first")])
            proxy.lose_reply_to(b"lost-reply-marker")
            messages = await store.append("s", [draft("lost-reply-marker"), draft("too")])
            assert proxy.replies_lost == 1
            assert store.statistics().reruns >= 1
            assert [(m.id, m.body) for m in messages] == [(2, "lost-reply-marker"), (3, "too")]
            page = await store.read("s", 0, 10)
            assert [m.body for m in page] == ["first", "lost-reply-marker", "too"]


async def test_a_keyed_batch_whose_reply_is_lost_is_stored_once(nursery: trio.Nursery) -> None:
    """As above with keys: the re-run returns the first run's messages (the key stored
    before the batch as a replay, the repeated one as its first draft's) and neither
    run's keys or entries are stored twice."""
    proxy, through, url = await _proxied(nursery)
    with trio.fail_after(20):
        async with (
            fresh_prefix(url) as prefix,
            open_redis(through, prefix=prefix) as (store, _),
        ):
            await store.append("s", [draft("first", key="a")])
            proxy.lose_reply_to(b"lost-keyed-marker")
            messages = await store.append(
                "s",
                [
                    draft("lost-keyed-marker", key="m"),
                    draft("other", key="a"),
                    draft("lost-keyed-marker", key="m"),
                    draft("new", key="n"),
                ],
            )
            assert proxy.replies_lost == 1
            assert store.statistics().reruns >= 1
            assert [(m.id, m.body, m.replay) for m in messages] == [
                (2, "lost-keyed-marker", False),
                (1, "first", True),
                (2, "lost-keyed-marker", True),
                (3, "new", False),
            ]
            page = await store.read("s", 0, 10)
            assert [(m.id, m.key) for m in page] == [(1, "a"), (2, "m"), (3, "n")]
            again = await store.append("s", [draft("new", key="n"), draft("x", key="m")])
            assert [(m.id, m.replay) for m in again] == [(3, True), (2, True)]


@pytest.mark.parametrize("meanwhile", ["trim", "trim and reuse", "redact"])
async def test_a_rerun_never_rebuilds_a_replay_from_what_changed_since(
    nursery: trio.Nursery, meanwhile: str
) -> None:
    """A keyed batch replays key "a" (id 1) and its reply is lost; before the re-run,
    message 1 is trimmed with its key forgotten (and "a" maybe used again), or
    redacted. The re-run tells the first outcome only if it still can (a tombstone:
    yes); else OutcomeUnknown. Never the replay rebuilt from the stream as it is now
    (a None body, or another message's: an IdempotencyConflict for an identical body,
    or an undecodable reply failing a batch that was stored). Found by a review."""
    proxy, through, url = await _proxied(nursery)
    with trio.fail_after(20):
        async with (
            fresh_prefix(url) as prefix,
            open_redis(through, prefix=prefix) as (via, _),
            open_redis(url, prefix=prefix) as (direct, _),
        ):
            (first,) = await direct.append("s", [draft({"v": "A"}, key="a")])
            await direct.append("s", [draft("filler")])
            proxy.lose_reply_to(b"lost-replay-marker")
            outcome: list[object] = []

            async def lost() -> None:
                try:
                    outcome.append(
                        await via.append(
                            "s", [draft("lost-replay-marker", key="m"), draft({"v": "A"}, key="a")]
                        )
                    )
                except chatbus.BusError as exc:
                    outcome.append(exc)

            async def meddle() -> None:
                while proxy.replies_lost == 0:  # noqa: ASYNC110 - the proxy has no event
                    await trio.sleep(0.001)
                proxy.down()
                if meanwhile.startswith("trim"):
                    await direct.trim("s", 3, keys_for=0)  # 1 and 2 go, key "a" forgotten
                if meanwhile == "trim and reuse":
                    await direct.append("s", [draft({"v": "B"}, key="a")])
                if meanwhile == "redact":
                    await direct.redact("s", first.id)
                await proxy.up()

            async with trio.open_nursery() as inner:
                inner.start_soon(meddle)
                inner.start_soon(lost)
            (result,) = outcome
            if meanwhile == "redact":
                assert isinstance(result, list), result
                marker, replay = result
                assert (marker.id, marker.replay) == (3, False)
                assert (replay.id, replay.replay, replay.redacted) == (1, True, True)
                assert replay.created_at == first.created_at
            else:
                assert isinstance(result, chatbus.OutcomeUnknown), result
            # Stored once either way: a retry with the marker's key replays it.
            (again,) = await direct.append("s", [draft("lost-replay-marker", key="m")])
            assert (again.id, again.replay) == (3, True)


async def test_a_refused_connection_is_a_store_error_and_a_lost_one_is_unknown(
    nursery: trio.Nursery,
) -> None:
    """Redis out of reach before the append was sent: a plain StoreError (nothing
    stored), at once. Lost while in flight, then out of reach for the re-run: an
    OutcomeUnknown that says so, after about command_timeout at most."""
    proxy, through, url = await _proxied(nursery)
    with trio.fail_after(20):
        async with (
            fresh_prefix(url) as prefix,
            open_redis(
                through,
                prefix=prefix,
                command_timeout=1,
            ) as (store, _),
        ):
            await store.append("s", [draft("first")])
            proxy.down()
            await trio.sleep(0.2)  # the client has seen its connections cut
            started = trio.current_time()
            with pytest.raises(chatbus.StoreError, match="Unable to establish"):
                await store.append("s", [draft("refused")])
            assert trio.current_time() - started < 0.5
            assert store.statistics().reruns == 0

            await proxy.up()

            async def down_once_lost() -> None:
                while not proxy.replies_lost:  # noqa: ASYNC110
                    await trio.sleep(0.001)
                proxy.down()

            nursery.start_soon(down_once_lost)
            proxy.lose_reply_to(b"lost-then-down")
            started = trio.current_time()
            with pytest.raises(chatbus.OutcomeUnknown) as caught:
                await store.append("s", [draft("lost-then-down")])
            assert trio.current_time() - started < 1.5
            text = str(caught.value)
            assert "lost while the append was in flight" in text, text
            assert "re-running it with its token did not tell" in text, text
            assert "Unable to establish" in text, text
            await proxy.up()
            page = await store.read("s", 0, 10)
            assert [m.body for m in page] == ["first", "lost-then-down"]  # it had run


async def test_durable_mode_on_a_cluster_without_replicas_is_refused_at_open() -> None:
    url = redis_cluster_url()
    with trio.fail_after(60), pytest.raises(chatbus.StoreError, match="durable mode needs"):
        async with open_redis(url, prefix=unique_prefix(), durability="durable"):
            pass


async def test_drop_prefix_leaves_a_prefix_that_starts_with_it_alone(url: str) -> None:
    base = unique_prefix()
    with trio.fail_after(60):
        for prefix in (base, base + ":eu"):
            async with open_redis(url, prefix=prefix) as (store, notifier):
                async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                    await bus.publish("room", prefix)
        await chatbus.redis.drop_prefix(url, base)
        async with open_redis(url, prefix=base + ":eu") as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                assert [m.body for m in await bus.read("room")] == [base + ":eu"]
        async with open_redis(url, prefix=base) as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                assert await bus.read("room") == []
        await chatbus.redis.drop_prefix(url, base + ":eu")
