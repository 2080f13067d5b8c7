"""The web chat's HTTP interface, against a real app process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid

import pytest
import trio

from .conftest import postgres_or_skip

httpx = pytest.importorskip("httpx", reason="needs httpx (pip install -e '.[test]')")

#: The header of a raw JSON body (httpx's ``json=`` sets it itself).
JSON = {"content-type": "application/json"}


@pytest.fixture
def client(start_app):
    app = start_app("--heartbeat", "0.3")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        yield client


def sse_lines(client, url: str, *, headers=None, until: int) -> list[str]:
    """Read an SSE response until ``until`` message frames came; its lines."""
    lines: list[str] = []
    with client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if sum(x == "event: message" for x in lines) >= until and line == "":
                break
    return lines


def message_ids(lines: list[str]) -> list[str]:
    """The message ids of the ``id:`` lines (``id: <id>:<epoch>``), in order."""
    return [x.removeprefix("id: ").partition(":")[0] for x in lines if x.startswith("id: ")]


def post(client, room: str, text: object, key: str | None = None, **extra):
    return client.post(f"/rooms/{room}/messages", json={"text": text, "key": key, **extra})


def test_post_returns_201_and_a_repeated_key_the_original(client):
    r = post(client, "r1", "hello", "k1", name="al")
    assert r.status_code == 201
    assert r.json()["id"] == 1 and r.json()["body"] == {"name": "al", "text": "hello"}
    again = post(client, "r1", "hello", "k1", name="al")
    assert again.status_code == 200 and again.json()["id"] == 1
    conflict = post(client, "r1", "other", "k1", name="al")
    assert conflict.status_code == 409 and "different body" in conflict.json()["error"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"key": "k"}', "text is required"),
        (b'{"text": 5}', "text must be a string"),
        (b'{"text": "   "}', "must not be empty"),
        (b'{"text": "' + b"x" * 2001 + b'"}', "longer than 2000"),
        (b'{"text": "hi", "key": 7}', "key must be a string"),
        (b'{"text": "hi", "name": "' + b"n" * 41 + b'"}', "name is longer"),
        (b'{"text": "' + b"x" * 20000 + b'"}', "over 16384 bytes"),
        (b"\xff\xfe", "not JSON"),
        (b'{"text": ' + b"1" * 5000 + b"}", "a number is too long"),
    ],
)
def test_bad_post_bodies_get_400_with_a_reason(client, body, reason):
    r = client.post("/rooms/r/messages", content=body, headers=JSON)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]


@pytest.mark.parametrize("route", ["messages", "typing"])
@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "json"]
)
def test_a_body_not_said_to_be_json_gets_415_and_nothing_is_sent(client, route, content_type):
    # A form or text/plain POST from another site needs no CORS preflight: refused.
    headers = {} if content_type is None else {"content-type": content_type}
    body = b'{"text": "hi", "name": "al"}'
    r = client.post(f"/rooms/ct/{route}", content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert "Content-Type must be application/json" in r.json()["error"]
    assert client.get("/rooms/ct/messages").json()["messages"] == []
    # The type's parameters and case do not matter.
    ok = {"content-type": "Application/JSON; charset=utf-8"}
    r = client.post(f"/rooms/ct/{route}", content=body, headers=ok)
    assert r.status_code in (201, 204), r.text


def test_two_content_types_or_another_charset_are_refused(client):
    body = b'{"text": "hi"}'
    two = [("content-type", "application/json"), ("content-type", "text/plain")]
    r = client.post("/rooms/ct2/messages", content=body, headers=two)
    assert r.status_code == 400 and "more than one Content-Type" in r.json()["error"]
    latin = {"content-type": "application/json; charset=latin-1"}
    r = client.post("/rooms/ct2/messages", content=body, headers=latin)
    assert r.status_code == 415 and "UTF-8 only" in r.json()["error"]
    assert client.get("/rooms/ct2/messages").json()["messages"] == []


def test_a_typing_name_with_nul_gets_400_naming_the_name(client):
    r = client.post("/rooms/r/typing", json={"name": "a\x00"})
    assert r.status_code == 400 and r.json()["error"] == "name must not contain NUL characters"


def test_a_client_gone_mid_body_is_no_app_error(start_app):
    app = start_app()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", app.port)) as sock:
            sock.sendall(
                b"POST /rooms/r/messages HTTP/1.1\r\nhost: x\r\n"
                b"content-type: application/json\r\ncontent-length: 100\r\n\r\n"
                b'{"text": "'
            )
    with httpx.Client(base_url=app.url, timeout=10) as client:
        assert post(client, "r", "after them").status_code == 201  # still serving
    time.sleep(0.3)
    assert "Traceback" not in app.log.read_text()


@pytest.mark.parametrize("room", ["%00x", "x" * 300])
def test_bad_room_names_get_400(client, room):
    assert post(client, room, "hi").status_code == 400
    assert client.get(f"/rooms/{room}/messages").status_code == 400
    assert client.get(f"/rooms/{room}/events").status_code == 400
    r = client.post(f"/rooms/{room}/typing", json={"name": "al"})
    assert r.status_code == 400 and r.json()["error"]


@pytest.mark.parametrize(
    "query", ["after=x", "after=-1", "last=abc", "after=1&last=2", "last=99999999"]
)
def test_bad_cursors_get_400(client, query):
    r = client.get(f"/rooms/r/events?{query}")
    assert r.status_code == 400 and r.json()["error"]


def test_bad_last_event_id_gets_400(client):
    r = client.get("/rooms/r/events?last=5", headers={"last-event-id": "seven"})
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["error"]


@pytest.mark.parametrize("query", ["before=0", "before=x", "limit=0", "limit=1000", "after=-3"])
def test_bad_history_queries_get_400(client, query):
    r = client.get(f"/rooms/r/messages?{query}")
    assert r.status_code == 400 and r.json()["error"]


def test_unknown_routes_and_methods(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/rooms/r").status_code == 404
    assert client.delete("/rooms/r/messages").status_code == 405
    assert client.get("/rooms/r/typing").status_code == 405
    assert client.post("/rooms/r/events").status_code == 405
    assert client.head("/rooms/r/events").status_code == 405
    assert client.get("/rooms/r/events/x").status_code == 404


def test_sse_response_headers(client):
    with client.stream("GET", "/rooms/hdr/events?last=0") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"


def test_history_pages(client):
    for i in range(1, 8):
        assert post(client, "h", f"m{i}").status_code == 201
    ids = lambda r: [m["id"] for m in r.json()["messages"]]  # noqa: E731
    assert ids(client.get("/rooms/h/messages?limit=3")) == [5, 6, 7]
    assert ids(client.get("/rooms/h/messages?before=5&limit=3")) == [2, 3, 4]
    assert ids(client.get("/rooms/h/messages?before=3&limit=50")) == [1, 2]
    assert ids(client.get("/rooms/h/messages?after=5")) == [6, 7]
    assert ids(client.get("/rooms/empty/messages")) == []


def test_sse_frames_resume_and_header_wins(client):
    for i in range(1, 6):
        post(client, "s", f"m{i}")
    lines = sse_lines(client, "/rooms/s/events?last=2", until=2)
    # First the start: retry hint and the id before the first message (last=2
    # resolved), with no data, so a browser resumes there even if none came yet.
    epoch = lines[2].rpartition(":")[2]  # id: <message id>:<the stream's epoch>
    assert lines[:4] == [": chatbus", "retry: 2000", f"id: 3:{epoch}", ""]
    assert [x for x in lines if x.startswith("id: ")] == [f"id: {i}:{epoch}" for i in (3, 4, 5)]
    lines = sse_lines(client, "/rooms/s/events?last=2", headers={"last-event-id": "1"}, until=4)
    assert message_ids(lines) == ["1", "2", "3", "4", "5"]
    headers = {"last-event-id": f"2:{epoch}"}  # the header wins over ?last
    assert message_ids(sse_lines(client, "/rooms/s/events?last=2", headers=headers, until=3)) == [
        "2",
        "3",
        "4",
        "5",
    ]
    lines = sse_lines(client, "/rooms/s/events?after=5", until=0)
    assert lines[:4] == [": chatbus", "retry: 2000", f"id: 5:{epoch}", ""]


@pytest.mark.parametrize("direct", [True, False], ids=["direct-writes", "through-send"])
def test_sse_chunks_written_straight_to_the_socket_or_through_send_are_the_same(start_app, direct):
    """The app's direct socket writes (``_DirectBody``) are taken under this
    hypercorn (a hypercorn whose objects changed would silently fall back to
    ``send``), and a stream through either path carries the same frames: chunked
    framing right, every message once, in order, across many chunks."""
    app = start_app("--heartbeat", "60", *([] if direct else ["--no-direct-writes"]))
    with httpx.Client(base_url=app.url, timeout=10) as client:
        with client.stream("GET", "/rooms/w/events?last=0") as response:
            lines = response.iter_lines()
            assert next(lines) == ": chatbus"
            texts = []
            for i in range(1, 41):
                sent = post(client, "w", f"m{i} " + "x" * (i * 47))  # chunks of many sizes
                assert sent.status_code == 201, sent.text
                for line in lines:
                    if line.startswith("data: "):
                        texts.append(json.loads(line.removeprefix("data: "))["body"]["text"])
                        break
        assert [t.partition(" ")[0] for t in texts] == [f"m{i}" for i in range(1, 41)]
        assert [len(t) for t in texts] == [len(f"m{i} ") + i * 47 for i in range(1, 41)]
        direct_chunks = client.get("/stats").json()["sse_direct_chunks"]
    assert (direct_chunks > 0) is direct, direct_chunks
    assert app.stop() == 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct-writes", "through-send"])
def test_sse_a_client_that_stops_reading_gets_everything_in_order_after(start_app, direct):
    """A client whose socket buffer fills (writes taken in part, the rest sent before
    anything later; the stream falls behind its room's hub) still gets every message
    once, in order, when it reads again."""
    app = start_app("--heartbeat", "60", *([] if direct else ["--no-direct-writes"]))
    with httpx.Client(base_url=app.url, timeout=30) as client:
        with client.stream("GET", "/rooms/z/events?last=0") as response:
            lines = response.iter_lines()
            assert next(lines) == ": chatbus"
            for line in lines:
                if line.startswith("id: "):
                    break
            with httpx.Client(base_url=app.url, timeout=30) as poster:
                for i in range(1, 2501):  # ~5 MB: far more than the socket buffers
                    sent = post(poster, "z", f"m{i} " + "y" * 1_990)
                    assert sent.status_code == 201, sent.text
                    if i % 250 == 0:
                        time.sleep(0.05)  # (a few lulls)
            texts = []
            for line in lines:
                if line.startswith("data: "):
                    texts.append(json.loads(line.removeprefix("data: "))["body"]["text"])
                    if len(texts) == 2500:
                        break
        assert [t.partition(" ")[0] for t in texts] == [f"m{i}" for i in range(1, 2501)]
        assert all(len(t) == len(t.partition(" ")[0]) + 1_991 for t in texts)
        assert (client.get("/stats").json()["sse_direct_chunks"] > 0) is direct
    assert app.stop() == 0


def test_sse_heartbeats_and_typing_events_have_no_id(client):
    with client.stream("GET", "/rooms/t/events?last=0") as response:
        lines = response.iter_lines()
        assert next(lines).startswith(": ")
        assert client.post("/rooms/t/typing", json={"name": "al"}).status_code == 204
        seen: list[str] = []
        for line in lines:
            seen.append(line)
            if ": ping" in seen and "event: event" in seen:
                break
    block = seen[seen.index("event: event") - 1 : seen.index("event: event") + 2]
    assert not any(x.startswith("id:") for x in block)
    assert '"key":"typing:al"' in block[-1]


def subscribers(client) -> int:
    return int(client.get("/stats").json()["subscribers"])


def sse_clients(client) -> int:
    return int(client.get("/stats").json()["sse_clients"])


def test_disconnected_clients_close_their_subscriptions_at_once(start_app):
    """SSE clients come and go: each closes its subscription when it goes, at once
    (not at the next heartbeat's failed write: there is none within the test)."""
    app = start_app("--heartbeat", "60")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        for _ in range(3):
            with contextlib.ExitStack() as streams:
                readers = []  # (dropping a reader would close its response)
                for _ in range(20):
                    response = streams.enter_context(client.stream("GET", "/rooms/d/events"))
                    readers.append(response.iter_lines())
                    assert next(readers[-1]) == ": chatbus"
                assert sse_clients(client) == 20
                # Each its own subscription, or the room's hub's (one for them all).
                assert 1 <= subscribers(client) <= 21
            deadline = time.monotonic() + 2.0
            while subscribers(client) or sse_clients(client):
                assert time.monotonic() < deadline, "closed streams left subscriptions open"
                time.sleep(0.02)
        assert post(client, "d", "still here").status_code == 201
    assert app.stop() == 0


def test_two_processes_on_postgres_share_a_room(start_app):
    dsn = postgres_or_skip()
    one, two = start_app("--dsn", dsn), start_app("--dsn", dsn)
    room = "p-" + uuid.uuid4().hex[:8]
    with httpx.Client(timeout=10) as client:
        assert (
            client.post(f"{one.url}/rooms/{room}/messages", json={"text": "a"}).status_code == 201
        )
        r = client.post(f"{two.url}/rooms/{room}/messages", json={"text": "b"})
        assert r.status_code == 201 and r.json()["id"] == 2
        lines = sse_lines(client, f"{one.url}/rooms/{room}/events?after=0", until=2)
    assert message_ids(lines) == ["0", "1", "2"]


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_two_processes_on_redis_share_a_room(start_app, kind):
    """The README's `--dsn redis://…` (and `redis+cluster://…`): two app processes, one
    room, sends on either, a replayed key, a conflicting one, and scroll-back."""
    import chatbus.redis

    from support.redis import unique_prefix, url_for

    prefix = unique_prefix()
    dsn = f"{url_for(kind)}?prefix={prefix}"
    try:
        one, two = start_app("--dsn", dsn), start_app("--dsn", dsn)
        room = "r-" + uuid.uuid4().hex[:8]
        with httpx.Client(timeout=10) as client:
            first = client.post(
                f"{one.url}/rooms/{room}/messages", json={"text": "a", "key": "k1"}
            )
            assert first.status_code == 201 and first.json()["id"] == 1
            again = client.post(
                f"{two.url}/rooms/{room}/messages", json={"text": "a", "key": "k1"}
            )
            assert again.status_code in (200, 201) and again.json()["id"] == 1
            clash = client.post(
                f"{two.url}/rooms/{room}/messages", json={"text": "b", "key": "k1"}
            )
            assert clash.status_code == 409
            r = client.post(f"{two.url}/rooms/{room}/messages", json={"text": "b"})
            assert r.status_code == 201 and r.json()["id"] == 2
            lines = sse_lines(client, f"{one.url}/rooms/{room}/events?after=0", until=2)
            page = client.get(f"{two.url}/rooms/{room}/messages", params={"before": 3, "limit": 5})
        assert message_ids(lines) == ["0", "1", "2"]
        assert [m["body"]["text"] for m in page.json()["messages"]] == ["a", "b"]
    finally:
        trio.run(chatbus.redis.drop_prefix, url_for(kind), prefix)


# -- review B: D1, D5, D7, D8 ----------------------------------------------------------


@pytest.mark.parametrize("route", ["messages", "typing"])
def test_deeply_nested_json_gets_400_not_500(client, route):
    """A 3 KB body nested 1,500 deep blew the JSON decoder's recursion limit: a 500."""
    deep = b'{"text": "x", "name": "al", "extra": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    r = client.post(f"/rooms/r/{route}", content=deep, headers=JSON)
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["error"]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("a%2Fb", "must not contain '/'"),
        ("a/b", "must not contain '/'"),
        ("%FF", "not valid UTF-8"),
        ("%ED%A0%80", "not valid UTF-8"),  # a surrogate, which UTF-8 never encodes
    ],
)
def test_refused_room_paths_get_400_with_a_reason(client, path, reason):
    for method, route in [("GET", "events"), ("GET", "messages"), ("POST", "messages")]:
        # (streamed: an accepted events request would never end)
        with client.stream(method, f"/rooms/{path}/{route}", json={"text": "hi"}) as r:
            assert r.status_code == 400, (method, route)
            assert reason in json.loads(r.read())["error"]
    r = client.post(f"/rooms/{path}/typing", json={"name": "al"})
    assert r.status_code == 400 and reason in r.json()["error"]


def test_store_outage_gives_json_503_with_retry_after(start_app, postgres_proxy):
    """A store that cannot be reached was a bare 500 with a traceback in the log."""
    dsn, proxy = postgres_proxy
    app = start_app("--dsn", dsn)
    room = "o-" + uuid.uuid4().hex[:8]
    with httpx.Client(base_url=app.url, timeout=30) as client:
        assert client.post(f"/rooms/{room}/messages", json={"text": "a"}).status_code == 201
        proxy.cut()
        for r in (
            client.post(f"/rooms/{room}/messages", json={"text": "b", "key": "k"}),
            client.get(f"/rooms/{room}/messages"),
        ):
            assert r.status_code == 503, r.text
            assert "store is unavailable" in r.json()["error"]
            assert r.headers["retry-after"] == "1"
        proxy.restore()
        deadline = time.monotonic() + 20
        while (
            r := client.post(f"/rooms/{room}/messages", json={"text": "b", "key": "k"})
        ).status_code == 503:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert r.status_code in (200, 201) and r.json()["id"] == 2
    assert "Traceback" not in app.log.read_text()


def last_id(lines: list[str]) -> str:
    return [x for x in lines if x.startswith("id: ")][-1].removeprefix("id: ")


def test_resume_after_an_in_memory_restart_ends_instead_of_splicing(start_app):
    """Review B, D8 (t_mem_restart): the page's Last-Event-ID names id 5 of the old
    history; the restarted server has 8 new messages. It resumed after id 5 of the NEW
    history (new5..new7 shown as if they followed old0..old4); it must end the stream
    with a reason instead."""
    app = start_app()
    with httpx.Client(base_url=app.url, timeout=10) as client:
        for i in range(5):
            assert post(client, "mr", f"old{i}").status_code == 201
        seen = last_id(sse_lines(client, "/rooms/mr/events?last=50", until=5))
        app.kill()
        start_app(port=app.port)
        for i in range(8):
            assert post(client, "mr", f"new{i}").status_code == 201
        lines = []
        with client.stream(
            "GET", "/rooms/mr/events?last=50", headers={"last-event-id": seen}
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():  # ends with the end frame
                lines.append(line)
                if "event: message" in lines:
                    break
        assert "event: message" not in lines, f"spliced another history: {lines}"
        assert "event: end" in lines
        assert '"reason":"history_reset"' in lines[lines.index("event: end") + 1]
        # A client without the epoch (an old page, ?after=5) is checked only against
        # the head, as documented.
        lines = sse_lines(client, "/rooms/mr/events?after=5", until=3)
        assert message_ids(lines) == ["5", "6", "7", "8"]
