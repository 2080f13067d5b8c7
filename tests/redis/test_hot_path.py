"""The store's append hot path: RESP3 by hand, batch tokens, one round trip in flight.

The parser and encoder need no server; the round-trip count runs on the standalone
server ($CHATBUS_TEST_REDIS_URL).
"""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from chatbus._codec import parse_notice
from chatbus.redis._append import (
    CLUSTER_DURABLE_MAX_IN_FLIGHT,
    DEFAULT_MAX_IN_FLIGHT,
    default_max_in_flight,
)
from chatbus.redis._resp import Parser, Push, RespError, encode, hash_slot
from chatbus.redis._session import quick_notice

from support.pg import draft
from support.redis import fresh_redis_pair, redis_cluster_url, redis_url

#: One of every RESP3 type the parser knows, and what it gives for each.
WIRE = (
    b"*3\r\n+ok\r\n$5\r\nhello\r\n:-42\r\n"  # array: simple, bulk, integer
    b">3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$0\r\n\r\n"  # push, an empty bulk string
    b"%2\r\n+a\r\n:1\r\n$1\r\nb\r\n,1.5\r\n"  # map, a double
    b"-ERR wrong\r\n!4\r\nbulk\r\n"  # error, bulk error
    b"|1\r\n+key\r\n+attribute\r\n(123456789012345678901\r\n"  # attribute, big number
    b"=8\r\ntxt:abcd\r\n~2\r\n#t\r\n#f\r\n_\r\n$-1\r\n*-1\r\n"  # verbatim, set, null
)
EXPECTED = [
    [b"ok", b"hello", -42],
    Push([b"smessage", b"ch", b""]),
    {b"a": 1, b"b": 1.5},
    RespError("ERR wrong"),
    RespError("bulk"),
    b"123456789012345678901",
    b"txt:abcd",
    [True, False],
    None,
    None,
    None,
]


def _comparable(values: list[object]) -> list[object]:
    return [repr(value) if isinstance(value, RespError) else value for value in values]


def test_every_value_parses_alike_whole_and_byte_by_byte() -> None:
    whole = Parser()
    whole.feed(WIRE)
    assert _comparable(list(whole.values())) == _comparable(EXPECTED)
    trickle = Parser()
    got: list[object] = []
    for at in range(len(WIRE)):
        trickle.feed(WIRE[at : at + 1])
        got += trickle.values()
    assert _comparable(got) == _comparable(EXPECTED)


def test_a_command_encodes_as_bulk_strings() -> None:
    args = ["EVALSHA", "☃", 0, -7, b"\r\n", True]
    parser = Parser()
    parser.feed(encode(*args))
    assert list(parser.values()) == [[b"EVALSHA", "☃".encode(), b"0", b"-7", b"\r\n", b"True"]]


def test_a_malformed_reply_is_a_protocol_error() -> None:
    parser = Parser()
    parser.feed(b"?what\r\n")
    with pytest.raises(RespError, match="unknown type"):
        list(parser.values())


@pytest.mark.redis
async def test_batch_tokens_differ_between_batches_and_between_stores() -> None:
    with trio.fail_after(20):
        async with (
            fresh_redis_pair(redis_url()) as (one, _),
            fresh_redis_pair(redis_url()) as (two, _),
        ):
            tokens = [one._appender.token() for _ in range(1000)]
            tokens += [two._appender.token() for _ in range(1000)]
            assert len(set(tokens)) == len(tokens)


@pytest.mark.redis
async def test_appends_made_while_one_is_in_flight_join_the_next_round_trip() -> None:
    """One round trip in flight per server by default: of eight appends made at once
    (to eight streams), the first goes alone and the seven others in one script call."""
    assert DEFAULT_MAX_IN_FLIGHT == 1
    with trio.fail_after(20):
        async with fresh_redis_pair(redis_url()) as (store, _):
            await store.append("warm-up", [draft(0)])  # connected, scripts loaded
            before = store.statistics()
            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(store.append, f"s{n}", [draft(n)])
            after = store.statistics()
            assert after.round_trips - before.round_trips == 2
            assert after.largest_round_trip == 7
            for n in range(8):
                assert [m.body for m in await store.read(f"s{n}", 0, 10)] == [n]


@pytest.mark.redis
@pytest.mark.parametrize(("topology", "expected"), [("standalone", 1), ("cluster", 1)])
async def test_the_default_in_flight_budget_is_one_per_server_three_per_durable_primary(
    topology: str, expected: int
) -> None:
    """In fast mode a Cluster primary's batch is one call (APPEND_SLOTS), as on one
    server: one in flight. In durable mode it is one call per hash slot anyway: its
    primaries keep three."""
    assert (DEFAULT_MAX_IN_FLIGHT, CLUSTER_DURABLE_MAX_IN_FLIGHT) == (1, 3)
    assert default_max_in_flight(True, "durable") == 3
    assert default_max_in_flight(False, "durable") == default_max_in_flight(True) == 1
    url = redis_url() if topology == "standalone" else redis_cluster_url()
    with trio.fail_after(20):
        async with fresh_redis_pair(url) as (store, _):
            await store.append("s", [draft(0)])
            budgets = {group.max_in_flight for group in store._appender.groups.values()}
            assert budgets == {expected}
        async with fresh_redis_pair(url, max_in_flight=2) as (store, _):
            await store.append("s", [draft(0)])
            budgets = {group.max_in_flight for group in store._appender.groups.values()}
            assert budgets == {2}


def test_a_plain_notice_is_read_without_json_and_alike() -> None:
    payload = b'{"stream":"chat-1","last_id":1234567890123}'
    assert quick_notice(payload) == parse_notice(payload) == ("chat-1", 1234567890123)
    # Left to the JSON parser: escapes, a zero id, a leading zero, anything else.
    for other in (
        b'{"stream":"a\\/b","last_id":1}',
        b'{"stream":"a\\"b","last_id":1}',
        b'{"stream":"x","last_id":0}',
        b'{"stream":"x","last_id":01}',
        b'{"stream":"","last_id":1}',
        b'{"stream":"x","reset":true}',
        b'{"stream":"x","last_id":1,"last_id":2}',
    ):
        assert quick_notice(other) is None


@given(
    stream=st.text(min_size=0, max_size=12),
    last_id=st.integers(min_value=-2, max_value=2**53),
    cut=st.integers(min_value=0, max_value=80),
    junk=st.binary(max_size=3),
)
def test_the_quick_notice_reader_never_disagrees_with_the_json_one(
    stream: str, last_id: int, cut: int, junk: bytes
) -> None:
    """What the script writes (cjson leaves UTF-8 unescaped), whole or mangled: the
    quick reader gives parse_notice's answer, or leaves it to parse_notice."""
    name = json.dumps(stream, ensure_ascii=False)
    payload = ('{"stream":' + name + ',"last_id":' + str(last_id) + "}").encode("utf-8", "replace")
    for candidate in (payload, payload[:cut] + junk + payload[cut:]):
        quick = quick_notice(candidate)
        assert quick is None or quick == parse_notice(candidate)
    if "\\" not in name[1:-1] and last_id > 0 and parse_notice(payload) is not None:
        assert quick_notice(payload) == parse_notice(payload)


@pytest.mark.redis
async def test_hash_slots_agree_with_the_cluster() -> None:
    keys = [b"", b"foo", b"123456789", b"{user1000}.following", b"a{}b", b"{}{x}", b"x{y"]
    keys += ["☃ {tag} {other}".encode(), bytes(range(256))]
    keys += [b"cb:{%x}:m" % n for n in range(0, 5000, 37)]
    with trio.fail_after(20):
        async with fresh_redis_pair(redis_cluster_url()) as (store, _):
            for key in keys:
                assert hash_slot(key) == await store.client.cluster_keyslot(key), key
