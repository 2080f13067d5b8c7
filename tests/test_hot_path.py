"""The message path's shortcuts give exactly what the general code gives.

Each per-message shortcut (make_draft's fast encoder, the slot-setting message maker,
the notice regex, the batch scanner, the producer's skipped notify, the listener's
one cancel scope per liveness step) is checked against the way it replaced.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import chatbus
import chatbus._message as message_module
from chatbus._codec import BadBody, _json_object, encode_notice, pack_bodies, parse_notice
from chatbus._message import (
    MAX_BODY_DEPTH,
    Draft,
    Message,
    check_stream,
    make_draft,
    make_message,
)
from chatbus.memory import MemoryNotifier, MemoryStore

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)

# ---- make_draft: the fast encoder agrees with the exact path ----

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)  # lone surrogates and NUL included
)
_bodies = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


def _outcome(body: object, key: str | None, max_body_bytes: int) -> tuple[str, Any]:
    try:
        draft = make_draft(body, key, max_body_bytes=max_body_bytes)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", draft


def _exact_outcome(
    monkeypatch: pytest.MonkeyPatch, body: object, key: str | None, max_body_bytes: int
) -> tuple[str, Any]:
    with monkeypatch.context() as patch:
        patch.setattr(message_module, "_FAST_ENCODER", None)
        return _outcome(body, key, max_body_bytes)


@settings(max_examples=300, deadline=None)
@given(body=_bodies, limit=st.sampled_from([8, 40, 65536]))
def test_make_draft_agrees_with_the_exact_path(body: object, limit: int) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _outcome(body, "k", limit) == _exact_outcome(monkeypatch, body, "k", limit)


@pytest.mark.parametrize(
    "body",
    [
        "x" * 10 + "\ud800",  # a lone surrogate: ASCII check
        [[[[1]]]],
        "é",
        float("nan"),
        10**5000,  # too many digits for int(str) elsewhere
        {"a": [1, {"b": None}]},
        object(),  # not JSON at all
    ],
    ids=["surrogate", "nested", "non-ascii", "nan", "long-int", "object-of-lists", "object"],
)
def test_make_draft_edge_cases_agree(monkeypatch: pytest.MonkeyPatch, body: object) -> None:
    assert _outcome(body, None, 65536) == _exact_outcome(monkeypatch, body, None, 65536)


def test_circular_body_is_named() -> None:
    body: dict[str, Any] = {}
    body["self"] = body
    with pytest.raises(chatbus.InvalidMessage, match="Circular reference"):
        make_draft(body, None, max_body_bytes=65536)


def test_deep_body_is_refused_with_its_depth() -> None:
    body: Any = 1
    for _ in range(MAX_BODY_DEPTH + 1):
        body = [body]
    with pytest.raises(chatbus.InvalidMessage, match="nested"):
        make_draft(body, None, max_body_bytes=65536)


def test_draft_is_a_plain_draft() -> None:
    draft = make_draft({"a": 1}, "key", max_body_bytes=65536)
    assert draft == Draft(body_json='{"a":1}', key="key")
    assert repr(draft) == repr(Draft(body_json='{"a":1}', key="key"))


# ---- make_message: the slot-setting maker makes the same value ----


def test_make_message_equals_the_constructor() -> None:
    made = make_message("s", 7, {"a": 1}, "k", NOW)
    built = Message(stream="s", id=7, body={"a": 1}, key="k", created_at=NOW)
    assert made == built
    assert repr(made) == repr(built)
    assert made.replay is False and made.redacted is False
    assert attrs.asdict(made) == attrs.asdict(built)
    assert attrs.evolve(made, replay=True).replay is True
    assert Message.from_row("s", 7, {"a": 1}, "k", NOW) == built


def test_from_row_of_a_subclass_makes_the_subclass() -> None:
    @attrs.frozen(kw_only=True)
    class Tagged(Message):
        pass

    made = Tagged.from_row("s", 1, None, None, NOW)
    assert type(made) is Tagged


# ---- parse_notice: the regex agrees with the JSON decoding ----


def _reference_notice(payload: bytes | str) -> tuple[str, int] | None:
    """parse_notice as it was: JSON, then the checks."""
    data = _json_object(payload)
    if data is None:
        return None
    stream, last_id = data.get("stream"), data.get("last_id")
    if not isinstance(stream, str) or type(last_id) is not int or last_id < 1:
        return None
    try:
        check_stream(stream)
    except ValueError:
        return None
    return stream, last_id


def _postgres_notice(stream: str, last_id: int) -> bytes:
    """What json_build_object('stream', s, 'last_id', n)::text sends."""
    name = json.dumps(stream, ensure_ascii=False)
    return f'{{"stream" : {name}, "last_id" : {last_id}}}'.encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None)
@given(
    stream=st.text(max_size=300),
    last_id=st.integers(min_value=-3, max_value=2**70),
    mutation=st.sampled_from(["none", "space", "zero", "quote", "cut"]),
    as_bytes=st.booleans(),
    postgres=st.booleans(),
)
def test_parse_notice_agrees_with_json(
    stream: str, last_id: int, mutation: str, as_bytes: bool, postgres: bool
) -> None:
    payload: bytes | str
    if postgres:
        payload = _postgres_notice(stream, last_id)
    else:
        payload = encode_notice(stream, last_id).encode("utf-8", "surrogatepass")
    if mutation == "space":
        payload = payload + b" "
    elif mutation == "zero":
        payload = payload.replace(b'"last_id" : ', b'"last_id" : 0').replace(
            b'"last_id": ', b'"last_id": 0'
        )
    elif mutation == "quote":
        payload = payload.replace(b'"stream', b'"str\\"eam', 1)
    elif mutation == "cut":
        payload = payload[:-1]
    if not as_bytes:
        payload = payload.decode("utf-8", "surrogatepass")
    assert parse_notice(payload) == _reference_notice(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"stream" : "a\\"b", "last_id" : 1}',  # an escape: decoded, not taken raw
        b'{"stream" : "a\\\\", "last_id" : 1}',
        b'{"stream" : "a\\u0000", "last_id" : 1}',  # NUL: no stream name
        b'{"stream" : "\xff", "last_id" : 1}',  # not UTF-8
        b'{"stream" : "a", "last_id" : 9223372036854775807}',
        b'{"stream" : "a", "last_id" : 1}\n',
        '{"stream": "a", "last_id": 3}',
    ],
)
def test_parse_notice_edge_cases(payload: bytes | str) -> None:
    assert parse_notice(payload) == _reference_notice(payload)


# ---- pack_bodies: the scanner refuses what json.loads refused ----


@pytest.mark.parametrize(
    "texts",
    [
        ['{"a":'],  # a value missing: the scanner stops, it does not raise ValueError
        ["1 2"],
        ["1,2"],
        ["1]"],
        ["[1]] , [2"],
        ["NaN"],
        ["-Infinity"],
        ["1\x1e2"],
        [""],
    ],
)
def test_pack_bodies_refuses_bad_bodies(texts: list[str]) -> None:
    with pytest.raises(BadBody):
        pack_bodies([Draft(body_json=text, key=None) for text in texts])


def test_pack_bodies_decodes() -> None:
    texts = ['{"a":1}', " [1, 2] ", '"x"', "1.5"]
    packed, bodies = pack_bodies([Draft(body_json=text, key=None) for text in texts])
    assert packed == "\x1e".join(texts)
    assert bodies == [{"a": 1}, [1, 2], "x", 1.5]


# ---- the producer calls notify unless the notifier notifies at commit ----


@attrs.define(eq=False)
class CountingNotifier:
    inner: MemoryNotifier
    notifies_at_commit: bool
    notifies: int = 0

    async def notify(self, stream: str, last_id: int) -> None:
        self.notifies += 1
        await self.inner.notify(stream, last_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("at_commit", [False, True])
async def test_producer_notifies_unless_the_notifier_does_at_commit(at_commit: bool) -> None:
    notifier = CountingNotifier(MemoryNotifier(), at_commit)
    async with (
        chatbus.open_bus(store=MemoryStore(), notifier=notifier) as bus,  # type: ignore[arg-type]
        bus.open_publisher("s") as publisher,
    ):
        for i in range(3):
            await publisher.publish(i)
    assert notifier.notifies == (0 if at_commit else 3)


# ---- the listener steps its liveness schedule when a ping is answered ----


class _FakeSession:
    """Stands for a ListenSession: a ping is answered 1 ms after it is sent."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.pings = 0
        self.ping_channel = b"chan_ping"
        self.ping_token: bytes | None = None
        self.ping_answered = False
        self.query_in_flight = False
        self._input = trio.Event()

    @property
    def ping_done(self) -> bool:
        return self.ping_answered and not self.query_in_flight

    async def drain(self) -> None:
        await self._input.wait()
        self._input = trio.Event()

    def pump(self) -> None:
        pass

    async def send(self, query: bytes, params: list[bytes]) -> None:
        self.pings += 1

        async def answer() -> None:
            await trio.sleep(0.001)
            self.ping_answered = True
            self._input.set()

        self.nursery.start_soon(answer)


async def test_listener_pings_every_interval_after_the_answer() -> None:
    pytest.importorskip("psycopg")
    from chatbus.postgres._listen import PostgresNotifier

    notifier = PostgresNotifier("", "chan", ping_interval=0.05, ping_timeout=5.0)
    async with trio.open_nursery() as nursery:
        session = _FakeSession(nursery)
        with trio.move_on_after(1.0):
            await notifier._serve(session)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    # One ping per interval (plus its 1 ms answer), not one per interval + timeout.
    assert session.pings >= math.floor(1.0 / 0.051) - 4
