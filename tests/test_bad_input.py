"""Bad input is rejected before anything is stored, and the bus keeps serving."""

from __future__ import annotations

import math
import re

import pytest

import chatbus

BAD_STREAMS = [
    ("", "empty"),
    (None, "str"),
    (42, "str"),
    (b"bytes", "str"),
    ("x" * (chatbus.MAX_STREAM_LENGTH + 1), "257 characters"),
    ("nul\x00inside", "NUL"),
    ("\ud800", "surrogate"),
]


def nested(depth: int) -> list[object]:
    body: list[object] = []
    for _ in range(depth - 1):
        body = [body]
    return body


BAD_BODIES = [
    (object(), chatbus.InvalidMessage, "JSON-serialisable"),
    ({1, 2}, chatbus.InvalidMessage, "JSON-serialisable"),
    (math.nan, chatbus.InvalidMessage, "JSON-serialisable"),
    ({"text": "\udc80"}, chatbus.InvalidMessage, "surrogate"),
    ("x" * 2000, chatbus.MessageTooLarge, "limit is 1000 bytes"),
    (nested(101), chatbus.InvalidMessage, "nested 101 levels deep"),
    (nested(5000), chatbus.InvalidMessage, "nested too deeply"),
]

BAD_KEYS = [(7, "str or None"), ("", "1 to 256"), ("k" * 257, "1 to 256"), ("a\x00b", "NUL")]


async def check_still_serving(bus: chatbus.Bus, backend) -> None:
    async with bus.open_subscriber("ok") as sub:
        msg = await bus.publish("ok", {"fine": True})
        assert (await sub.receive()) == msg
    assert [m.body for m in await bus.read("ok")] == [{"fine": True}]


@pytest.mark.parametrize(("stream", "names"), BAD_STREAMS)
async def test_bad_stream_names(backend, stream, names):
    async with backend.open_bus() as bus:
        with pytest.raises(chatbus.InvalidStream, match=names):
            await bus.publish(stream, "x")
        with pytest.raises(ValueError, match=names):  # InvalidStream is a ValueError
            await bus.read(stream)
        with pytest.raises(chatbus.InvalidStream, match=names):
            async with bus.open_publisher(stream):
                pass
        with pytest.raises(chatbus.InvalidStream, match=names):
            async with bus.open_subscriber(stream):
                pass
        await check_still_serving(bus, backend)


async def test_longest_stream_name_is_stored_verbatim(backend):
    name = "ß" * chatbus.MAX_STREAM_LENGTH
    async with backend.open_bus() as bus:
        assert (await bus.publish(name, 1)).stream == name
        assert [m.stream for m in await bus.read(name)] == [name]


@pytest.mark.parametrize(("body", "error", "names"), BAD_BODIES)
async def test_bad_bodies(backend, body, error, names):
    async with backend.open_bus(max_body_bytes=1000) as bus:
        async with bus.open_publisher("room") as pub:
            await pub.publish("before")
            with pytest.raises(error, match=names):
                await pub.publish(body)
            with pytest.raises(error, match=names):
                await bus.publish("room", body)
            after = await pub.publish("after")
        assert after.id == 2  # nothing of the bad one was stored
        assert [m.body for m in await bus.read("room")] == ["before", "after"]
        await check_still_serving(bus, backend)


async def test_deep_but_allowed_body_round_trips(backend):
    async with backend.open_bus() as bus, bus.open_subscriber("room") as sub:
        body = {"deep": nested(chatbus.MAX_BODY_DEPTH - 1), "text": "[[[[{{{{ not nesting"}
        await bus.publish("room", body)
        assert (await sub.receive()).body == body
        assert (await bus.read("room"))[0].body == body


async def test_body_exactly_at_the_limit_is_accepted(backend):
    async with backend.open_bus(max_body_bytes=1000) as bus:
        body = "é" * 499  # 998 bytes of UTF-8 plus two quotes
        assert (await bus.publish("room", body)).body == body
        with pytest.raises(chatbus.MessageTooLarge, match="1001 bytes"):
            await bus.publish("room", body + "x")


def test_invalid_message_is_also_value_and_type_error():
    assert issubclass(chatbus.InvalidMessage, ValueError)
    assert issubclass(chatbus.InvalidMessage, TypeError)
    assert issubclass(chatbus.InvalidStream, ValueError)
    for error in (chatbus.InvalidMessage, chatbus.InvalidStream, chatbus.MessageTooLarge):
        assert issubclass(error, chatbus.BusError)


@pytest.mark.parametrize(("key", "names"), BAD_KEYS)
async def test_bad_keys(backend, key, names):
    async with backend.open_bus() as bus:
        with pytest.raises(chatbus.InvalidMessage, match=names):
            await bus.publish("room", "x", key=key)
        assert await bus.read("room") == []
        await check_still_serving(bus, backend)


@pytest.mark.parametrize(
    ("after", "error", "names"),
    [
        (-1, ValueError, ">= 0"),
        ("3", TypeError, "int"),
        (1.5, TypeError, "int"),
        (True, TypeError, "int"),
        (2**63, ValueError, "<= 9223372036854775807"),
    ],
)
async def test_bad_cursor(backend, after, error, names):
    async with backend.open_bus() as bus:
        with pytest.raises(error, match=names):
            async with bus.open_subscriber("room", after=after):
                pass
        with pytest.raises(error, match=names):
            await bus.read("room", after=after)
        # A bad `before` is named as such, not as `after`.
        with pytest.raises(error, match=f"^before must .*{re.escape(names)}"):
            await bus.read("room", before=after)
        await check_still_serving(bus, backend)


@pytest.mark.parametrize("limit", [0, -5, 10_001, 2.5])
async def test_bad_read_limit(limit):
    async with chatbus.open_bus() as bus:
        with pytest.raises((ValueError, TypeError), match="limit"):
            await bus.read("room", limit=limit)


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"cache_size": 0}, "cache_size"),
        ({"max_batch": 0}, "max_batch"),
        ({"read_batch": 10**6}, "read_batch"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"cache_size": "big"}, "cache_size"),
        ({"cache_size": 1.5}, "cache_size must be an int"),
        ({"max_batch": 2.5}, "max_batch must be an int"),
        ({"max_pending": 1.5}, "max_pending must be an int"),
        ({"read_batch": 3.5}, "read_batch must be an int"),
        ({"max_body_bytes": 10.5}, "max_body_bytes must be an int"),
    ],
)
async def test_bad_bus_options(options, names):
    with pytest.raises((ValueError, TypeError), match=names):
        async with chatbus.open_bus(**options):
            pass


async def test_bad_urls():
    with pytest.raises(ValueError, match="'mongodb'"):
        async with chatbus.open_bus("mongodb://localhost"):
            pass
    with pytest.raises(ValueError, match="unknown Redis url option 'shema'"):
        async with chatbus.open_bus("redis://localhost:1/0?shema=x"):
            pass
    with pytest.raises(TypeError, match="not both"):
        async with chatbus.open_bus("memory://", store=chatbus.memory.MemoryStore()):
            pass
    from chatbus.redis import open_redis

    with pytest.raises(ValueError, match=r"got 'rediss://:\*\*\*@h:1'") as caught:
        async with open_redis("rediss://:s3cret@h:1"):
            pass
    assert "s3cret" not in str(caught.value)  # a URL's password is never shown
    async with chatbus.open_bus("memory://") as bus:
        await bus.publish("s", 1)
