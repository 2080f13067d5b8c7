"""Committed notices: notices that carry the messages they announce.

A Postgres append of one stream sends its bodies and keys in its NOTIFY (see
``chatbus._codec.CommittedNotice``), so a subscriber in another process can take them
without reading the store. These tests pin the encoding and, on the bus's router, the
rule that decides when such messages may go in a topic's cache: only when nothing
else could be right (same history, all of them news, no local append in flight).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
import trio
from conftest import Backend

from chatbus import Message, StreamInfo
from chatbus._cache import DurableCache
from chatbus._codec import (
    CommittedNotice,
    parse_committed_notice,
)
from chatbus._topic import Router, Topic

EPOCH = 7_000_000_000_000_000_001
MICROS = 1_765_000_000_123_456
AT = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(microseconds=MICROS)


def _payload(
    stream: str, last_id: int, bodies: list[str], keys: list[str | None] | None = None
) -> bytes:
    """A payload as the Postgres append writes it: the server's header, the client's tail."""
    header = (
        b'{"stream":'
        + json.dumps(stream, ensure_ascii=False).replace(", ", ",").encode("utf-8")
        + b',"last_id":%d,"epoch":%d,"at":%d' % (last_id, EPOCH, MICROS)
    )
    tail = f',"n":{len(bodies)},"bodies":[{",".join(bodies)}]'
    if keys is not None:
        tail += ',"keys":' + json.dumps(keys, ensure_ascii=False)
    return header + (tail + "}").encode("utf-8")


def test_a_committed_notice_round_trips() -> None:
    payload = _payload("room", 12, ['{"text": "a"}', "[1,2]", '"é"'], ["k1", None, "k3"])
    notice = parse_committed_notice(payload)
    assert notice is not None
    assert (notice.stream, notice.last_id, notice.epoch, notice.count) == ("room", 12, EPOCH, 3)
    assert notice.messages() == [
        Message.from_row("room", 10, {"text": "a"}, "k1", AT),
        Message.from_row("room", 11, [1, 2], None, AT),
        Message.from_row("room", 12, "é", "k3", AT),
    ]


@pytest.mark.parametrize("stream", ['quo"te', "back\\slash", "tab\there", "ünï{c}ode ✓"])
def test_stream_names_with_escapes_take_the_exact_way(stream: str) -> None:
    notice = parse_committed_notice(_payload(stream, 1, ["true"]))
    assert notice is not None
    assert notice.stream == stream
    assert notice.messages() == [Message.from_row(stream, 1, True, None, AT)]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"stream" : "s", "last_id" : 1}',  # a plain notice
        b'{"stream":"s","last_id":1,"epoch":1,"at":0,"n":2,"bodies":[1,2]}',  # n > last_id
        b'{"stream":"","last_id":1,"epoch":1,"at":0,"n":1,"bodies":[1]}',  # no stream
        b'{"stream":"s","last_id":0,"epoch":1,"at":0,"n":1,"bodies":[1]}',
        b'{"stream":"s","last_id":1,"epoch":0,"at":0,"n":1,"bodies":[1]}',
        b'{"stream":"\\"","last_id":1,"epoch":1,"at":0,"n":"1","bodies":[1]}',
        b'{"stream":"\\"","last_id":1,"epoch":1,"at":0}',
        b'{"stream":"\\"", not json',
    ],
)
def test_what_is_not_a_committed_notice_is_refused(payload: bytes) -> None:
    assert parse_committed_notice(payload) is None


@pytest.mark.parametrize(
    "tail",
    [
        b',"n":2,"bodies":[1]}',  # fewer bodies than announced
        b',"n":1,"bodies":[1],"keys":[]}',
        b',"n":1,"bodies":[1],"keys":[5]}',
        b',"n":1,"bodies":{}}',
        b',"n":1,"bodies":[1]',  # cut short
    ],
)
def test_a_header_without_its_messages_decodes_to_none(tail: bytes) -> None:
    notice = parse_committed_notice(b'{"stream":"s","last_id":5,"epoch":1,"at":0' + tail)
    assert notice is not None
    assert notice.messages() is None


def _router(epoch: int | None = EPOCH, subscribers: int = 1) -> tuple[Router, Topic]:
    topic = Topic("room", DurableCache(16))
    topic.epoch, topic.subscribers = epoch, subscribers
    return Router({"room": topic}, emitter="me"), topic


def _notice(last_id: int, count: int = 1, epoch: int = EPOCH) -> CommittedNotice:
    bodies = [str(i) for i in range(last_id - count + 1, last_id + 1)]
    payload = _payload("room", last_id, bodies).replace(
        b'"epoch":%d' % EPOCH, b'"epoch":%d' % epoch
    )
    notice = parse_committed_notice(payload)
    assert notice is not None
    return notice


def test_the_router_caches_the_messages_of_a_committed_notice() -> None:
    router, topic = _router()
    router.committed(_notice(2, count=2))
    router.committed(_notice(3))
    assert [m.body for m in topic.cache.run_after(0, 10)] == [1, 2, 3]
    assert topic.high_water == 3
    assert router.notices == 2


@pytest.mark.parametrize(
    "why",
    ["another epoch", "epoch unknown", "no subscription", "a local append", "not news"],
)
def test_the_router_takes_a_committed_notice_as_a_plain_one_unless_sure(why: str) -> None:
    router, topic = _router(
        epoch=None if why == "epoch unknown" else EPOCH,
        subscribers=0 if why == "no subscription" else 1,
    )
    if why == "a local append":
        topic.appending = 1
    if why == "not news":
        topic.advance(4)  # a later plain notice came first
    changed = topic.changed
    router.committed(_notice(5, count=2, epoch=EPOCH + 1 if why == "another epoch" else EPOCH))
    assert len(topic.cache) == 0
    assert topic.high_water == 5
    assert changed.is_set()


def test_a_committed_notice_overtaken_by_a_redaction_is_not_cached() -> None:
    # A notifier that reorders (chatbus.testing.FaultyNotifier) can hand over the
    # redaction of message 3 before the notice of its append: the body it carries is
    # gone from the store, and must not be served from the cache.
    router, topic = _router()
    router.committed(_notice(2, count=2))
    router.redacted("room", 3)
    router.committed(_notice(3))
    assert [m.id for m in topic.cache.run_after(0, 10)] == [1, 2]


def test_messages_read_from_the_store_meanwhile_are_kept() -> None:
    router, topic = _router()
    tombstone = Message(stream="room", id=1, body=None, key=None, created_at=AT, redacted=True)
    topic.cache.put([tombstone])
    router.committed(_notice(2, count=2))
    assert topic.cache.run_after(0, 10) == [tombstone, Message.from_row("room", 2, 2, None, AT)]


async def test_a_committed_notice_wakes_the_subscriptions() -> None:
    router, topic = _router()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            woken = trio.Event()

            async def wait() -> None:
                await topic.changed.wait()
                woken.set()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            router.committed(_notice(1))
            await woken.wait()


@pytest.mark.parametrize(
    "backend_name",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ],
    indirect=True,
)
async def test_a_subscriber_of_another_bus_takes_them_without_reading_the_store(
    backend: Backend,
) -> None:
    with trio.fail_after(30):
        async with backend.open_bus() as writer, backend.open_bus() as reader:
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


def test_a_look_overtaken_by_a_reset_does_not_make_old_notices_trusted() -> None:
    # A subscription asks the stream's info; a delete's reset arrives before the
    # answer, which is of the old history: its epoch must not become the cache's, or
    # a late notice of the old history (a notifier that reorders) would be cached.
    router, topic = _router(epoch=None)
    info = StreamInfo(stream="room", head=3, first_id=1, epoch=EPOCH, exists=True)
    topic.validate(info, current=False)
    router.committed(_notice(4))
    assert len(topic.cache) == 0
    topic.validate(info)
    router.committed(_notice(5))
    assert [m.id for m in topic.cache.run_after(4, 10)] == [5]


def test_a_notice_delayed_across_a_resync_is_not_cached_after_the_look() -> None:
    # A notifier that delays (FaultyNotifier) can hand over, after a reconnect and its
    # resync, a notice of before it: the message it carries may have been redacted
    # since. The look at the stream that follows the resync says which ids exist.
    router, topic = _router()
    router.committed(_notice(1))
    router.resync()
    topic.validate(StreamInfo(stream="room", head=1, first_id=1, epoch=EPOCH, exists=True))
    router.committed(_notice(1))
    assert len(topic.cache) == 0
    router.committed(_notice(2))
    assert [m.id for m in topic.cache.run_after(1, 10)] == [2]
