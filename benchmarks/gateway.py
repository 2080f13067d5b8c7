"""Gateway: many SSE clients of one web chat process; deliveries/s and receipt latency.

One ``examples/web_chat/app.py`` process (in memory, hypercorn's trio worker) serves
one room. A load generator in another OS process (this module run as
``python -m benchmarks.gateway --child …``, under trio) opens the SSE clients
(``?last=0``), waits until every one has its stream open, then POSTs messages at a
fixed offered rate on an absolute schedule (open loop: a slow answer never delays the
next send). Each message's text carries its sequence number and the ``time.time()``
at which its POST was started; a client's receipt time minus that is the publish →
client latency (one machine clock). A warm-up share of the messages is left out of
the latency figures. Deliveries/s is the messages every client received, over the
time from the first POST to the last receipt. Each client must get ids 1, 2, 3, …
once each, in order ("broken" clients did not); pairs (client, message) not received
within a drain timeout after the last POST are "pending", and count as infinitely
late in the percentiles. The sends start on schedule even when one round of the load
generator's scheduler takes longer than the interval (all that are due go at once);
the rate they actually started at is reported.

The clients: bare trio sockets by default (the request a browser's ``EventSource``
makes; one ``receive_some`` and one regex pass per network read; POSTs on keep-alive
sockets), or httpx (``CHATBUS_BENCH_GATEWAY_CLIENT=httpx``, the earlier generator).
The bare one is the fairer measure of the app: on one 2-core machine the generator
shares the cores with the app, and httpx's per-read and per-request work (and its
connection pool's bookkeeping) cost about six times the bare client's CPU per
delivery, taken from the app, so with httpx the figures say more about httpx. Each
side's CPU per delivery is reported, which the machine's other load does not change.

Sizes: full, 1,000 clients at 200 msgs/s for 10 s; ``--quick``, 50 clients at
100 msgs/s for 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import gc
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import trio

from ._config import Sizes
from ._report import Row, measured, percentile
from ._scenario import Context, Scenario

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = REPO_ROOT / "examples" / "web_chat" / "app.py"
ROOM = "gateway"
#: Network reads of all the clients (this process runs one load generator).
_READS = [0]
#: Streams per httpx client (connection pool) in the load generator.
_CLIENTS_PER_POOL = 50
#: Sends in flight at most (connections of the sending client).
_SENDERS = 64
#: Seconds after the last send started that clients may still take to get everything.
DRAIN = 30.0
#: Longest wait, once every client is connected, for the app's subscriptions to settle.
_SETTLE = 15.0
#: The SSE clients of the load generator: bare trio sockets, or httpx streams.
CLIENT_KINDS = ("epoll", "raw", "httpx")
_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_FRAME = re.compile(rb'"id":(\d+),"body":\{"name":"anon","text":"(\d+) ([0-9.]+)"')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the load generator (another process) --------------------------------------------


def _phase(what: str) -> None:
    # On stderr, with the time: where a slow run spends it (the parent shows it on failure).
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


async def _client_run(
    http: object,
    url: str,
    index: int,
    received: list[list[tuple[int, int, float]]],
    ready: list[int],
    all_ready: trio.Event,
    clients: int,
    connect_limit: trio.Semaphore,
    last_receipt: list[float],
) -> None:
    import httpx

    assert isinstance(http, httpx.AsyncClient)
    got = received[index]
    async with connect_limit:
        request = http.build_request("GET", f"{url}/rooms/{ROOM}/events?last=0")
        response = await http.send(request, stream=True)
    try:
        first = True
        rest = b""
        async for chunk in response.aiter_raw():
            now = time.time()
            _READS[0] += 1
            if first:
                first = False
                ready[0] += 1
                if ready[0] == clients:
                    all_ready.set()
            data = rest + chunk
            cut = data.rfind(b"\n\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 2 :]
            for match in _FRAME.finditer(data, 0, cut):
                got.append((int(match[1]), int(match[2]), now - float(match[3])))
                last_receipt[0] = max(last_receipt[0], now)
    finally:
        await response.aclose()


async def _raw_client_run(
    url: str,
    index: int,
    received: list[list[tuple[int, int, float]]],
    ready: list[int],
    all_ready: trio.Event,
    clients: int,
    connect_limit: trio.Semaphore,
    last_receipt: list[float],
) -> None:
    # The same HTTP/1.1 request a browser's EventSource makes, on a bare trio socket:
    # one receive_some() per network read and one regex pass, no HTTP client library.
    # The response is chunked; the app writes whole SSE frames per HTTP chunk, so the
    # chunk-size lines fall between frames, never inside one, and the frame pattern
    # below ignores them.
    host, _, port = url.removeprefix("http://").partition(":")
    got = received[index]
    request = (
        f"GET /rooms/{ROOM}/events?last=0 HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()
    for attempt in range(5):
        # A connection reset before the answer came (a full listen queue on a busy
        # machine) is retried, as a browser would; nothing was received on it.
        async with connect_limit:
            stream = await trio.open_tcp_stream(host, int(port))
            try:
                await stream.send_all(request)
                first = await stream.receive_some(1 << 16)
            except (OSError, trio.BrokenResourceError):
                await stream.aclose()
                if attempt == 4:
                    raise
                await trio.sleep(0.1)
                continue
        break
    try:
        rest = b""
        head = True
        pending = first
        while True:
            chunk = pending or await stream.receive_some(1 << 16)
            pending = b""
            if not chunk:
                return
            now = time.time()
            _READS[0] += 1
            data = rest + chunk
            if head:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    rest = data
                    continue
                status = data[: data.find(b"\r\n")]
                if b" 200 " not in status:
                    raise RuntimeError(f"SSE request answered {status!r}")
                head = False
                ready[0] += 1
                if ready[0] == clients:
                    all_ready.set()
                data = data[end + 4 :]
            cut = data.rfind(b"\n\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 2 :]
            for match in _FRAME.finditer(data, 0, cut):
                got.append((int(match[1]), int(match[2]), now - float(match[3])))
                last_receipt[0] = max(last_receipt[0], now)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


class _EpollClients:
    """The SSE clients on bare blocking-then-non-blocking sockets, read by one OS
    thread with one ``epoll``: no task, wake-up or scheduler pass per network read
    (the trio clients spent most of their CPU there), so the load generator costs
    the app's machine less per delivery. Per read it keeps the receipt time and the
    regex matches of the whole frames in it (their (id, seq, stamp) bytes); they are
    turned into numbers and checked (ids 1, 2, 3, … once each, in order) after the
    run, as the other clients' are during it."""

    def __init__(self, host: str, port: int, clients: int) -> None:
        self.host, self.port, self.clients = host, port, clients
        #: Per client: (receipt time, matches) per read with whole frames in it.
        self.logs: list[list[tuple[float, list[tuple[bytes, bytes, bytes]]]]] = [
            [] for _ in range(clients)
        ]
        self.counts = [0] * clients
        self.ready = 0
        self.reads = 0
        self.last_receipt = 0.0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sse-clients", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _connect(self) -> tuple[socket.socket, bytes]:
        request = (
            f"GET /rooms/{ROOM}/events?last=0 HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()
        for attempt in range(5):
            sock = socket.create_connection((self.host, self.port), timeout=30)
            try:
                sock.sendall(request)
                data = b""
                while (end := data.find(b"\r\n\r\n")) < 0:
                    more = sock.recv(1 << 16)
                    if not more:
                        raise OSError("connection closed by the app")
                    data += more
            except OSError:
                sock.close()
                if attempt == 4:
                    raise
                time.sleep(0.1)
                continue
            status = data[: data.find(b"\r\n")]
            if b" 200 " not in status:
                raise RuntimeError(f"SSE request answered {status!r}")
            sock.setblocking(False)
            return sock, data[end + 4 :]
        raise AssertionError("unreachable")

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # reported by the trio side
            self.error = exc

    def _serve(self) -> None:
        socks: dict[int, tuple[int, socket.socket]] = {}
        rests: list[bytes] = []
        poll = select.epoll()
        for index in range(self.clients):
            sock, rest = self._connect()
            socks[sock.fileno()] = (index, sock)
            rests.append(rest)
            poll.register(sock.fileno(), select.EPOLLIN)
            self.ready += 1
        frame, logs, counts = _FRAME, self.logs, self.counts
        try:
            while not self._stop.is_set():
                for fd, _ in poll.poll(0.05):
                    index, sock = socks[fd]
                    try:
                        chunk = sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        poll.unregister(fd)
                        continue
                    now = time.time()
                    self.reads += 1
                    data = rests[index] + chunk
                    cut = data.rfind(b"\n\n")
                    if cut < 0:
                        rests[index] = data
                        continue
                    rests[index] = data[cut + 2 :]
                    matches = frame.findall(data, 0, cut)
                    if matches:
                        logs[index].append((now, matches))
                        counts[index] += len(matches)
                        self.last_receipt = now
        finally:
            poll.close()
            for _, sock in socks.values():
                sock.close()

    def received(self) -> list[list[tuple[int, int, float]]]:
        """Per client, (id, seq, latency) of each frame, in the order received."""
        return [
            [(int(i), int(seq), now - float(stamp)) for now, ms in log for i, seq, stamp in ms]
            for log in self.logs
        ]


@dataclasses.dataclass
class _RawPoster:
    """POSTs on keep-alive HTTP/1.1 connections over bare trio sockets (a free one
    reused, else a new one: at most as many as posts in flight)."""

    host: str
    port: int
    _free: list[trio.SocketStream] = dataclasses.field(default_factory=list)

    async def post(self, path: str, body: bytes) -> int:
        """Send one POST with a JSON body; return the answer's status."""
        stream = self._free.pop() if self._free else None
        if stream is None:
            stream = await trio.open_tcp_stream(self.host, self.port)
        try:
            await stream.send_all(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            data = b""
            while (end := data.find(b"\r\n\r\n")) < 0:
                data += await self._more(stream)
            head = data[:end]
            length = _CONTENT_LENGTH.search(head)
            if length is None:
                raise OSError(f"no content-length in {head[:200]!r}")
            while len(data) < end + 4 + int(length[1]):
                data += await self._more(stream)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        self._free.append(stream)
        return int(head.split(b" ", 2)[1])

    @staticmethod
    async def _more(stream: trio.SocketStream) -> bytes:
        data = await stream.receive_some(1 << 16)
        if not data:
            raise OSError("connection closed by the app")
        return bytes(data)


async def _child(
    url: str, clients: int, rate: float, seconds: float, client_kind: str = "epoll"
) -> dict[str, object]:
    import httpx

    total = max(1, int(rate * seconds))
    received: list[list[tuple[int, int, float]]] = [[] for _ in range(clients)]
    ready = [0]
    all_ready = trio.Event()
    # httpcore's pool matches queued requests to connections in O(requests x
    # connections) at every change: 1,000 streams in one pool, or 2,000 sends queued
    # on 64 connections, stalled this process for minutes. So: a pool per
    # _CLIENTS_PER_POOL streams, and sends wait for a connection here, not in the pool.
    pools = -(-clients // _CLIENTS_PER_POOL)
    limits = httpx.Limits(max_connections=_CLIENTS_PER_POOL + 1)
    timeout = httpx.Timeout(30.0, read=None)
    in_flight = trio.Semaphore(_SENDERS)
    host, _, port = url.removeprefix("http://").partition(":")
    poster = _RawPoster(host, int(port))
    lag: list[float] = []
    post_errors = [0]
    post_times: list[float] = []  # POST started -> its answer read
    answered = [0]
    last_receipt = [0.0]
    async with contextlib.AsyncExitStack() as stack:
        readers = [
            await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=timeout))
            for _ in range(pools if client_kind == "httpx" else 0)
        ]
        writer = await stack.enter_async_context(
            httpx.AsyncClient(limits=httpx.Limits(max_connections=_SENDERS), timeout=30.0)
        )
        nursery = await stack.enter_async_context(trio.open_nursery())
        connect_limit = trio.Semaphore(50)
        epoll = _EpollClients(host, int(port), clients) if client_kind == "epoll" else None
        if epoll is not None:
            epoll.start()

            async def connected() -> None:
                while epoll.ready < clients:
                    if epoll.error is not None:
                        raise RuntimeError("an SSE client failed") from epoll.error
                    await trio.sleep(0.05)
                all_ready.set()

            nursery.start_soon(connected)
        for index in range(clients if epoll is None else 0):
            if client_kind == "httpx":
                nursery.start_soon(
                    _client_run, readers[index // _CLIENTS_PER_POOL], url, index, received,
                    ready, all_ready, clients, connect_limit, last_receipt,
                )  # fmt: skip
            else:
                nursery.start_soon(
                    _raw_client_run, url, index, received, ready, all_ready, clients,
                    connect_limit, last_receipt,
                )  # fmt: skip
        with trio.fail_after(120):
            await all_ready.wait()
        _phase(f"{clients} clients connected")
        # Then until the app settled: its streams, each opened on a subscription of its
        # own, share the room's one once caught up (chatbus.sse's hub); the run
        # measures a room's steady state, not 1,000 joins at once.
        with trio.move_on_after(_SETTLE):
            while True:
                stats = (await writer.get(f"{url}/stats")).json()
                if stats.get("subscribers", 0) <= 1:
                    break
                await trio.sleep(0.1)
        _phase(f"settled: {stats.get('subscribers')} subscriptions")

        async def post(seq: int, scheduled: float) -> None:
            stamp = time.time()
            lag.append(trio.current_time() - scheduled)
            body = {"text": f"{seq} {stamp:.6f}", "key": f"g{seq}"}
            for _ in range(5):
                try:
                    async with in_flight:  # (the wait counts in the latency)
                        if client_kind == "httpx":
                            r = await writer.post(f"{url}/rooms/{ROOM}/messages", json=body)
                            status = r.status_code
                        else:
                            status = await poster.post(
                                f"/rooms/{ROOM}/messages", json.dumps(body).encode()
                            )
                    if status in (200, 201):
                        answered[0] += 1
                        post_times.append(time.time() - stamp)
                        return
                except (httpx.HTTPError, OSError, trio.BrokenResourceError):
                    pass
                post_errors[0] += 1
                await trio.sleep(0.05)

        started = time.time()
        t0 = trio.current_time()
        seq = 1
        while seq <= total:
            # Start every send that is due: one round of this process's scheduler
            # may take longer than the interval (1,000 readers), and one send per
            # round would quietly offer a lower rate.
            now = trio.current_time()
            while seq <= total and t0 + (seq - 1) / rate <= now:
                nursery.start_soon(post, seq, t0 + (seq - 1) / rate)
                seq += 1
            if seq <= total:
                await trio.sleep_until(t0 + (seq - 1) / rate)
        posting_done = trio.current_time()
        _phase(f"{total} sends started")
        # The drain deadline runs from the last send started, whether or not the
        # sends were answered: an overloaded app cannot stretch the run without bound
        # (what it had not delivered by then counts as pending).
        counts = epoll.counts if epoll is not None else None
        with trio.move_on_after(DRAIN):
            while (min(counts) if counts else min(len(g) for g in received)) < total:  # noqa: ASYNC110
                await trio.sleep(0.05)  # (polling)
        client_cpu = time.process_time()  # (before the epoll clients' counting)
        if epoll is not None:
            epoll.stop()
            if epoll.error is not None:
                raise RuntimeError("an SSE client failed") from epoll.error
            received = epoll.received()
            last_receipt[0], _READS[0] = epoll.last_receipt, epoll.reads
        finished = max(last_receipt[0], started + 1e-3)
        _phase(f"drained: {sum(len(g) for g in received)} received, {answered[0]} sends answered")
        nursery.cancel_scope.cancel()
    _phase("clients closed")
    warm = int(total * 0.2)
    # A message a client had not got by the drain deadline is late, not fast: it
    # counts in the percentiles as infinitely late (so a p99 is never flattered by
    # leaving out what did not arrive).
    measured_seqs = total - warm
    late = sum(measured_seqs - len({seq for _, seq, _ in g if seq > warm}) for g in received)
    latencies = sorted([lat for g in received for _, seq, lat in g if seq > warm])
    latencies += [math.inf] * late
    # Each client must get ids 1, 2, 3, … once each, in order, with no gap (else it
    # is "broken": something lost, doubled or reordered); what it had not got yet at
    # the deadline is "pending" (its ids are still a gap-free prefix).
    broken = sum(1 for g in received if [i for i, _, _ in g] != list(range(1, len(g) + 1)))
    every = set(range(1, total + 1))
    pending = sum(len(every - {s for _, s, _ in g}) for g in received)
    delivered = sum(len(g) for g in received)
    return {
        "clients": clients,
        "messages": total,
        "delivered": delivered,
        "pending_at_deadline": pending,
        "broken_clients": broken,
        "elapsed": finished - started,
        "p50": percentile(latencies, 0.50) * 1e3,
        "p99": percentile(latencies, 0.99) * 1e3,
        "max": (latencies[-1] if latencies else float("nan")) * 1e3,
        "generator_lag_p99": percentile(sorted(lag), 0.99) * 1e3,
        "post_p50": percentile(sorted(post_times), 0.50) * 1e3,
        "post_p99": percentile(sorted(post_times), 0.99) * 1e3,
        "offered_rate": total / max(posting_done - t0, 1e-9),
        "post_retries": post_errors[0],
        "posts_answered": answered[0],
        "reads": _READS[0],  # network reads by all clients: deliveries per read = batching
        "client_cpu": client_cpu,  # this process, connecting and draining too
    }


# -- the parent ----------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``; else NaN)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _one_run(
    clients: int, rate: float, seconds: float, client_kind: str, flush: str | None
) -> dict[str, object]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # Another app file (another branch's, to compare in the same conditions).
    app_file = os.environ.get("CHATBUS_BENCH_GATEWAY_APP", str(APP))
    app = subprocess.Popen(
        [
            *(sys.executable, app_file, "--port", str(port), "--heartbeat", "5"),
            *(("--flush", flush) if flush is not None else ()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or app.poll() is not None:
                    raise RuntimeError("the web chat app did not start") from None
                time.sleep(0.1)
        app_cpu = _cpu_seconds(app.pid)
        child = subprocess.run(
            [
                *(sys.executable, "-m", "benchmarks.gateway", "--child", url),
                *("--clients", str(clients), "--rate", str(rate), "--seconds", str(seconds)),
                *("--client", client_kind),
            ],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
            check=False,
        )
        if child.returncode != 0:
            raise RuntimeError(f"load generator failed: {child.stderr[-2000:]}")
        result: dict[str, object] = json.loads(child.stdout.strip().splitlines()[-1])
        # CPU per delivery, each side: what the figures cost whatever else the
        # machine runs (the app's share of the cores is not ours to set).
        result["app_cpu"] = _cpu_seconds(app.pid) - app_cpu
        result["client_kind"] = client_kind
        return result
    finally:
        app.kill()
        app.wait(timeout=10)


def _shape(sizes: Sizes) -> tuple[int, float, float]:
    """(clients, msgs/s, seconds): full, or small under ``--quick`` (fewer repeats)."""
    if sizes.repeats < Sizes().repeats:
        return 50, 100.0, 2.0
    return 1000, 200.0, 10.0


def run(context: Context, backend: str) -> list[Row]:
    """The gateway rows: deliveries/s and receipt p99 at the offered rate."""
    clients, rate, seconds = _shape(context.sizes)
    repeats = min(context.sizes.repeats, 3)
    client_kind = os.environ.get("CHATBUS_BENCH_GATEWAY_CLIENT", "epoll")
    if client_kind not in CLIENT_KINDS:
        raise ValueError(f"CHATBUS_BENCH_GATEWAY_CLIENT must be one of {CLIENT_KINDS}")
    flush = os.environ.get("CHATBUS_BENCH_GATEWAY_FLUSH")  # the app's --flush
    results = [_one_run(clients, rate, seconds, client_kind, flush) for _ in range(repeats)]
    broken = sum(int(r["broken_clients"]) for r in results)  # type: ignore[call-overload]
    pending = sum(int(r["pending_at_deadline"]) for r in results)  # type: ignore[call-overload]
    lost = broken + pending
    lag = max(float(r["generator_lag_p99"]) for r in results)  # type: ignore[arg-type]
    offered = min(float(r["offered_rate"]) for r in results)  # type: ignore[arg-type]
    note = (
        f"{clients} SSE clients ({client_kind} load generator"
        + (f", app --flush {flush}" if flush is not None else "")
        + f"), 1 room, {rate:.0f} msgs/s offered for {seconds:.0f} s"
    )
    cpu = [
        (float(r["app_cpu"]), float(r["client_cpu"]), max(int(r["delivered"]), 1))  # type: ignore[arg-type,call-overload]
        for r in results
    ]
    app_us = sorted(a / d * 1e6 for a, _, d in cpu)[len(cpu) // 2]
    client_us = sorted(c / d * 1e6 for _, c, d in cpu)[len(cpu) // 2]
    extra = {"runs": results}
    return [
        measured(
            scenario="gateway",
            backend=backend,
            metric="deliveries/s",
            unit="msg/s",
            samples=[
                float(r["delivered"]) / float(r["elapsed"])  # type: ignore[arg-type]
                for r in results
            ],
            target="report",
            note=note + f"; clients with a gap, a double or a reordering: {broken};"
            f" (client, message) pairs not received within the drain deadline: {pending};"
            f" load generator's own lag p99 {lag:.0f} ms, sends started at"
            f" >= {offered:.0f} msgs/s; CPU per delivery (median run): app {app_us:.1f} us,"
            f" load generator {client_us:.1f} us",
            extra=extra,
        ),
        measured(
            scenario="gateway",
            backend=backend,
            metric="publish->client p99",
            unit="ms",
            samples=[float(r["p99"]) for r in results],  # type: ignore[arg-type]
            target="p99 <= 50 ms, nothing lost",
            max_value=50.0 if lost == 0 else -1.0,
            note=note
            + "; p50 "
            + "/".join(f"{float(r['p50']):.1f}" for r in results)  # type: ignore[arg-type]
            + " ms; POST answered p50 "
            + "/".join(f"{float(r['post_p50']):.1f}" for r in results)  # type: ignore[arg-type]
            + " ms (of the latency, the part before the message was committed)",
        ),
    ]


SCENARIO = Scenario(
    name="gateway",
    label="gateway",
    needs={"memory": ()},
    entry=run,
    summary="1,000 SSE clients of one web chat process (examples/web_chat), "
    "200 msgs/s: deliveries/s, publish->client p99",
)


def main() -> None:
    """The load generator: ``python -m benchmarks.gateway --child URL …``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, metavar="URL")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--client", choices=CLIENT_KINDS, default="epoll")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1`: where a stuck run is
    # The receipts (a tuple per client and message: 2,000,000 in a full run) made the
    # cyclic collector's full passes long: with it on, this process stalled for up to
    # about 200 ms at a time (its own sends' lag p99 150-220 ms; off: 3-7 ms), and
    # receipts read meanwhile were stamped late. It makes no cycles worth collecting.
    gc.disable()
    result = trio.run(_child, args.child, args.clients, args.rate, args.seconds, args.client)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
