"""A small real chat app on chatbus: browsers over Server-Sent Events, with resume.

Run it (``pip install -e '.[web]'`` first)::

    python examples/web_chat/app.py                        # in memory, port 8000
    python examples/web_chat/app.py --port 8001 --dsn postgresql://postgres@127.0.0.1/test

and open http://127.0.0.1:8000/?room=lobby&name=al in two tabs.

Routes:

- ``GET /``: the chat page (``?room=NAME&name=USER``);
- ``GET /rooms/{room}/events``: the room as SSE (``?last=50``, ``?after=ID`` or the
  ``Last-Event-ID`` header), see :mod:`chatbus.sse`;
- ``GET /rooms/{room}/messages?before=ID&limit=N``: a page of history as JSON
  (``after=ID`` pages forward; neither gives the latest page);
- ``POST /rooms/{room}/messages``: JSON ``{"text": ..., "key": ..., "name": ...}``;
  the key is the page's idempotency key, so a retried send never doubles; 201 with the
  message's JSON, 400 with a reason for bad input, 409 for a key reused with another
  text;
- ``POST /rooms/{room}/typing``: JSON ``{"name": ...}``: an ephemeral keyed event
  ``typing:<name>`` with a ttl, shown as "who is typing";
- ``GET /stats``: the bus's statistics as JSON, and ``sse_clients``, the number of
  SSE clients connected now (``subscribers`` counts subscriptions: the caught-up
  clients of a room share one, see :mod:`chatbus.sse`), and ``sse_direct_chunks``, the
  SSE body chunks written straight to their sockets so far (see :class:`_DirectBody`).

It serves on hypercorn's trio worker with Starlette; see README.md for why.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pathlib
import re
import signal
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

import chatbus
import chatbus.sse

STATIC = pathlib.Path(__file__).parent / "static"
#: Longest message text accepted, in characters.
MAX_TEXT = 2000
#: Longest user name, in characters.
MAX_NAME = 40
#: Largest request body read, in bytes.
MAX_BODY = 16 * 1024
#: Most messages in one history page.
MAX_PAGE = 200
#: Seconds a client is asked to wait (``Retry-After``) when the store is unavailable.
RETRY_AFTER = 1
#: The garbage collector's young-generation threshold (``--gc-threshold``).
GC_THRESHOLD = 50_000


class BadRequest(Exception):
    """Bad input: answered 400 with the reason."""


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


class UnsupportedMediaType(BadRequest):
    """A body that does not say it is JSON: answered 415 with the reason."""


async def _json_body(request: Request) -> dict[str, Any]:
    # Only a body that says it is JSON: a form or text/plain POST from another site
    # needs no CORS preflight, one with this type does (a cross-site send is refused).
    types = request.headers.getlist("content-type")
    if len(types) > 1:
        raise BadRequest("more than one Content-Type header")
    content_type = types[0] if types else ""
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {content_type[:60]!r}"
        )
    charset = _charset(parameters)
    if charset is not None and charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"JSON is read as UTF-8 only, not charset {charset[:40]!r}")
    size = 0
    parts: list[bytes] = []
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes")
        parts.append(part)
    try:
        value = json.loads(b"".join(parts))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    except RecursionError:  # [[[[…]]]]: the decoder's recursion limit
        raise BadRequest("body is not JSON this app takes: nested too deeply") from None
    except ValueError:  # an integer past Python's int_max_str_digits
        raise BadRequest("body is not JSON this app takes: a number is too long") from None
    if not isinstance(value, dict):
        raise BadRequest("body must be a JSON object")
    return value


def _charset(parameters: str) -> str | None:
    """The ``charset`` parameter of a Content-Type's ``parameters``, lower case."""
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def _text_field(body: dict[str, Any], name: str, *, limit: int, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if required and not value.strip():
        raise BadRequest(f"{name} must not be empty")
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters")
    return value


def _query_int(request: Request, name: str, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise BadRequest(f"{name} must be a whole number, got {raw[:40]!r}")
    number = int(raw)
    if not low <= number <= high:
        raise BadRequest(f"{name} must be from {low} to {high}, got {number}")
    return number


def _room(request: Request) -> str:
    """The room of a ``/rooms/{room}/…`` route: a valid stream name, without ``/``,
    spelled in UTF-8 in the URL (``%FF`` would otherwise decode to U+FFFD, and
    ``%FF`` and ``%FE`` would be one room)."""
    return _room_name(request.path_params["room"], request.scope.get("raw_path"))


def _room_name(room: str, raw_path: object) -> str:
    if isinstance(raw_path, bytes):
        try:
            urllib.parse.unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("room name is not valid UTF-8 (percent-encoded)") from None
    if "/" in room:
        raise BadRequest("room name must not contain '/'")
    return room  # (chatbus checks the rest: InvalidStream, a 400)


Handler = Callable[[Request], Awaitable[Response]]


def _answers_bad_input(handler: Handler) -> Handler:
    """Turn bad input (ours or chatbus's ValueErrors) into 400 with the reason, and a
    store that cannot be reached into 503 (the page retries a send with its key)."""

    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:  # it went away mid-body: nobody reads an answer
            return Response(status_code=400)
        except chatbus.IdempotencyConflict as exc:
            return _error(409, str(exc))
        except UnsupportedMediaType as exc:
            return _error(415, str(exc))
        except (BadRequest, ValueError) as exc:  # InvalidStream, InvalidMessage, …
            return _error(400, str(exc))
        except (chatbus.StoreError, chatbus.OutcomeUnknown, chatbus.BusClosed) as exc:
            response = _error(503, f"the message store is unavailable: {exc}")
            response.headers["retry-after"] = str(RETRY_AFTER)
            return response

    return wrapper


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_EVENTS_PATH = re.compile(r"/rooms/(.*)/events")
_SSE_HEADERS = [(k.encode(), v.encode()) for k, v in chatbus.sse.SSE_HEADERS.items()]


async def _send_error(send: Send, status: int, reason: str) -> None:
    body = json.dumps({"error": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@attrs.define
class _Clients:
    """The SSE clients connected now, and the body chunks written straight to their
    sockets so far (for ``/stats``)."""

    count: int = 0
    direct_chunks: int = 0


@attrs.define(eq=False)
class _DirectBody:
    """The body chunks of one HTTP/1.1 streaming response, written straight to
    hypercorn's socket (chunked encoding, as its h11 would), skipping its per-chunk
    path: an ASGI message, an h11 event, a lock and a socket send, two of them trio
    checkpoints (three scheduler passes a chunk, with the wake-up). With 1,000 SSE
    clients of a busy room that path was most of the app's CPU.

    Only for a plain (no TLS) HTTP/1.1 response that h11 frames as chunked, once
    its headers and a first chunk went out through the server, and only while
    hypercorn's objects are what this expects (:meth:`of` checks; anything else:
    None, and the chunks go through ``send``). A write takes hypercorn's send lock
    without waiting when it is free and writes without blocking when the socket
    takes it all; otherwise it waits as hypercorn would. The response still ends
    through ``send`` (h11 writes the last chunk), so the server's state stays right.
    """

    fd: int
    stream: trio.SocketStream
    lock: trio.Lock

    @classmethod
    def of(cls, send: Send) -> _DirectBody | None:
        try:
            http_stream = send.__self__  # type: ignore[attr-defined]
            protocol = http_stream.send.__self__
            server = protocol.send.__self__
            writer = protocol.connection._writer
            stream, lock = server.stream, server.send_lock
        except AttributeError:
            return None
        if (
            type(http_stream).__name__ != "HTTPStream"
            or type(protocol).__name__ != "H11Protocol"
            or type(writer).__name__ != "ChunkedWriter"
            or not isinstance(stream, trio.SocketStream)
            or not isinstance(lock, trio.Lock)
        ):
            return None
        return cls(stream.socket.fileno(), stream, lock)

    async def write(self, data: bytes) -> None:
        """Write one chunk (a client gone: OSError or trio.BrokenResourceError)."""
        if not data:
            return
        frame = b"%x\r\n%b\r\n" % (len(data), data)
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            async with self.lock:
                await self.stream.send_all(frame)
            return
        try:
            try:
                sent = os.write(self.fd, frame)
            except BlockingIOError:
                sent = 0
            if sent < len(frame):  # the socket's buffer is full: wait, as the server would
                await self.stream.send_all(frame[sent:])
        finally:
            self.lock.release()


def _events_endpoint(
    bus: chatbus.Bus,
    clients: _Clients,
    *,
    heartbeat: float,
    flush: float,
    direct_writes: bool = True,
) -> ASGIApp:
    """``GET /rooms/{room}/events`` as a bare ASGI app.

    The SSE stream is the one route that writes all the time (1,000 clients of a busy
    room: tens of thousands of writes a second), so it skips Starlette's
    ``StreamingResponse`` and its middleware, which cost a task group and several
    wrappers per chunk: the chunks of ``chatbus.sse.sse_bytes`` go to the server as
    they are. It watches for ``http.disconnect`` as Starlette does, so a closed tab
    closes its subscription at once.
    """

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        match = _EVENTS_PATH.fullmatch(scope["path"])
        assert match is not None
        query = dict(
            urllib.parse.parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        )
        last_event_id = None
        for name, value in scope["headers"]:
            if name == b"last-event-id":
                last_event_id = value.decode("latin-1")
        try:
            cursor = chatbus.sse.parse_cursor(
                last_event_id=last_event_id, after=query.get("after"), last=query.get("last")
            )
            room = _room_name(match[1], scope.get("raw_path"))
            frames = chatbus.sse.sse_bytes(bus, room, cursor, heartbeat=heartbeat, flush=flush)
        except (BadRequest, ValueError) as exc:  # InvalidCursor, InvalidStream
            await _send_error(send, 400, str(exc))
            return

        async def stream(cancel_scope: trio.CancelScope) -> None:
            async with contextlib.aclosing(frames):
                await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                direct: _DirectBody | None = None
                async for chunk in frames:
                    if direct is not None:
                        try:
                            await direct.write(chunk)
                        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                            break  # the client is gone (its disconnect ends us)
                        clients.direct_chunks += 1
                        continue
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    # Headers and a first chunk went out through the server: the
                    # next chunks may go straight to the socket.
                    direct = _DirectBody.of(send) if direct_writes else None
            await send({"type": "http.response.body", "body": b""})
            cancel_scope.cancel()

        async def disconnected(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            cancel_scope.cancel()

        clients.count += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, nursery.cancel_scope)
                nursery.start_soon(disconnected, nursery.cancel_scope)
        finally:
            clients.count -= 1

    return endpoint


def make_app(
    bus: chatbus.Bus,
    *,
    typing_ttl: float = 4.0,
    heartbeat: float = 5.0,
    flush: float = chatbus.sse.DEFAULT_FLUSH,
    direct_writes: bool = True,
) -> ASGIApp:
    """Build the ASGI app serving chat rooms on ``bus`` (``direct_writes``: see
    :class:`_DirectBody`)."""

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def script(request: Request) -> Response:
        return FileResponse(STATIC / "chat.js", headers={"cache-control": "no-cache"})

    @_answers_bad_input
    async def history(request: Request) -> Response:
        room = _room(request)
        limit = _query_int(request, "limit", 1, MAX_PAGE) or 50
        before = _query_int(request, "before", 1, 2**63 - 1)
        after = _query_int(request, "after", 0, 2**63 - 1)
        if before is not None and after is not None:
            raise BadRequest("pass before or after, not both")
        if before is None and after is None:
            info = await bus.stream_info(room)
            before = info.head + 1
        page = await bus.read(room, after, limit, before=before)
        return JSONResponse({"messages": [chatbus.sse.message_json(m) for m in page]})

    @_answers_bad_input
    async def post_message(request: Request) -> Response:
        room = _room(request)
        body = await _json_body(request)
        text = _text_field(body, "text", limit=MAX_TEXT, required=True)
        key = _text_field(body, "key", limit=chatbus.MAX_KEY_LENGTH, required=False)
        name = _text_field(body, "name", limit=MAX_NAME, required=False) or "anon"
        message = await bus.publish(room, {"name": name, "text": text}, key=key or None)
        status = 200 if message.replay else 201
        return JSONResponse(chatbus.sse.message_json(message), status_code=status)

    @_answers_bad_input
    async def typing(request: Request) -> Response:
        room = _room(request)
        body = await _json_body(request)
        name = _text_field(body, "name", limit=MAX_NAME, required=True)
        if name is not None and "\x00" in name:  # it goes in the event's key and body
            raise BadRequest("name must not contain NUL characters")
        await bus.emit(room, {"typing": name}, key=f"typing:{name}", ttl=typing_ttl)
        return Response(status_code=204)

    async def stats(request: Request) -> Response:
        # For operators and the tests: the SSE clients now connected, and the open
        # subscriptions (a closed tab must leave neither behind).
        return JSONResponse(
            {
                **attrs.asdict(bus.statistics()),
                "sse_clients": clients.count,
                "sse_direct_chunks": clients.direct_chunks,
            }
        )

    async def events_head(request: Request) -> Response:
        # GET is served by the bare endpoint in front; this route makes the others
        # 405, as for every route (HEAD of an endless stream has no use).
        return Response(status_code=405, headers={"allow": "GET"})

    clients = _Clients()
    events = _events_endpoint(
        bus, clients, heartbeat=heartbeat, flush=flush, direct_writes=direct_writes
    )
    rest = Starlette(
        routes=[
            Route("/", page),
            Route("/chat.js", script),
            Route("/stats", stats),
            Route("/rooms/{room:path}/events", events_head, methods=["GET"]),
            Route("/rooms/{room:path}/messages", history, methods=["GET"]),
            Route("/rooms/{room:path}/messages", post_message, methods=["POST"]),
            Route("/rooms/{room:path}/typing", typing, methods=["POST"]),
        ]
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and _EVENTS_PATH.fullmatch(scope["path"])
        ):
            await events(scope, receive, send)
        else:
            await rest(scope, receive, send)

    return app


async def serve(
    host: str,
    port: int,
    dsn: str | None,
    *,
    typing_ttl: float = 4.0,
    heartbeat: float = 5.0,
    flush: float = chatbus.sse.DEFAULT_FLUSH,
    direct_writes: bool = True,
) -> None:
    """Serve the chat app until SIGINT or SIGTERM."""
    config = hypercorn.config.Config()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = 1.0  # SSE streams never end by themselves
    # Every open tab reconnects at once after a restart: hypercorn's default backlog
    # (100) overflows while the process is busy, and the kernel then resets some.
    config.backlog = 1024
    config.accesslog = None
    async with chatbus.open_bus(dsn) if dsn else chatbus.open_bus() as bus:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def shutdown_trigger() -> None:
                async for signum in signals:
                    print(f"web_chat: {signal.Signals(signum).name}, stopping", flush=True)
                    return

            app = make_app(
                bus,
                typing_ttl=typing_ttl,
                heartbeat=heartbeat,
                flush=flush,
                direct_writes=direct_writes,
            )
            print(f"web_chat: serving http://{host}:{port}/", flush=True)
            await hypercorn.trio.serve(
                app,  # type: ignore[arg-type]
                config,
                shutdown_trigger=shutdown_trigger,
            )


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dsn", help="PostgreSQL URL (default: in memory)")
    parser.add_argument("--typing-ttl", type=float, default=4.0, help="seconds")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds")
    parser.add_argument(
        "--flush",
        type=float,
        default=chatbus.sse.DEFAULT_FLUSH,
        help="seconds an SSE stream of a busy room gathers messages per write (0: none)",
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=GC_THRESHOLD,
        help="allocations between young-generation collections (0: Python's default)",
    )
    parser.add_argument(
        "--no-direct-writes",
        dest="direct_writes",
        action="store_false",
        help="send every SSE chunk through the ASGI server (see _DirectBody)",
    )
    args = parser.parse_args(argv)
    if args.gc_threshold:
        # 1,000 open streams are many long-lived objects, and a busy room allocates
        # fast: at Python's default (700) the collector ran often enough to take a
        # third of the app's CPU under the gateway benchmark.
        gc.set_threshold(args.gc_threshold, 20, 100)
    if not args.flush >= 0:
        parser.error("--flush must be >= 0")
    trio.run(
        lambda: serve(
            args.host,
            args.port,
            args.dsn,
            typing_ttl=args.typing_ttl,
            heartbeat=args.heartbeat,
            flush=args.flush,
            direct_writes=args.direct_writes,
        )
    )
    print("web_chat: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
