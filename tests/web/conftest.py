"""Fixtures for the web chat tests: app processes on 127.0.0.1 and a real Chromium.

The browser is the system Chromium (``/usr/bin/chromium``), driven by Playwright; no
browser is ever downloaded. When none can start the browser tests are skipped with
the reason, unless ``CHATBUS_REQUIRE_BROWSER=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "web_chat" / "app.py"
CHROMIUM = os.environ.get("CHATBUS_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("CHATBUS_REQUIRE_BROWSER") == "1"
DSN = os.environ.get("CHATBUS_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (CHATBUS_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class App:
    """One app process (``examples/web_chat/app.py``) on a port of 127.0.0.1."""

    def __init__(self, port: int, args: list[str], log: pathlib.Path) -> None:
        self.port = port
        self.args = args
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> App:
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(APP),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1):
                    return self
            except OSError as exc:
                if time.monotonic() > deadline:
                    tail = self.log.read_text()[-2000:]
                    raise RuntimeError(f"app did not start: {tail}") from exc
                time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 10.0, signum: int = signal.SIGTERM) -> int:
        """Send ``signum``; the exit code (killed if it does not stop in time)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.process.returncode


@pytest.fixture
def start_app(tmp_path: pathlib.Path) -> Iterator[Callable[..., App]]:
    """Start app processes; every one is killed when the test ends."""
    pytest.importorskip("hypercorn", reason="needs the web extra: pip install -e '.[web]'")
    pytest.importorskip("starlette", reason="needs the web extra: pip install -e '.[web]'")
    apps: list[App] = []

    def start(*args: str, port: int | None = None) -> App:
        app = App(port or free_port(), list(args), tmp_path / f"app{len(apps)}.log")
        apps.append(app)
        return app.start()

    try:
        yield start
    finally:
        for app in apps:
            app.kill()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """The system Chromium, headless, under Playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        _unavailable(f"no browser at {CHROMIUM} (apt-get install chromium)")
    manager = sync_playwright().start()
    try:
        try:
            browser = manager.chromium.launch(
                executable_path=CHROMIUM, headless=True, timeout=30_000, args=["--no-sandbox"]
            )
        except Exception as exc:
            _unavailable(f"chromium at {CHROMIUM} did not start: {exc}")
        yield browser
        browser.close()
    finally:
        manager.stop()


@pytest.fixture
def new_page(browser: object) -> Iterator[Callable[[str], object]]:
    """Open pages (each in its own context, like separate browsers)."""
    contexts = []

    def open_page(url: str) -> object:
        context = browser.new_context(viewport={"width": 520, "height": 640})  # type: ignore[attr-defined]
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(url)
        page.wait_for_function("document.body.dataset.state === 'live'")
        return page

    try:
        yield open_page
    finally:
        for context in contexts:
            context.close()


def postgres_or_skip() -> str:
    """The test DSN, or skip (fail under CHATBUS_REQUIRE_POSTGRES=1) if unreachable."""
    try:
        import psycopg

        psycopg.connect(DSN, connect_timeout=3).close()
    except Exception as exc:
        if os.environ.get("CHATBUS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL at {DSN} unreachable: {exc}")
        pytest.skip(f"PostgreSQL at {DSN} unreachable: {exc}")
    return DSN


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 that can be cut: every connection through it closed
    and new ones closed at once, until restored. An unreachable server, for a test."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._cut = False
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                if self._cut:
                    raise OSError("cut")
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        for sock in socks:
            with self._lock:
                self._open.discard(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
            sock.close()

    def cut(self) -> None:
        """Close every connection through the proxy and refuse new ones."""
        self._cut = True
        with self._lock:
            socks = list(self._open)
        self._close(*socks)

    def restore(self) -> None:
        """Let connections through again."""
        self._cut = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        self.listener.close()
        self.cut()


@pytest.fixture
def postgres_proxy() -> Iterator[tuple[str, CuttableProxy]]:
    """(a DSN through a cuttable proxy to the test Postgres, the proxy)."""
    dsn = postgres_or_skip()
    url = urllib.parse.urlsplit(dsn)
    proxy = CuttableProxy((url.hostname or "127.0.0.1", url.port or 5432))
    netloc = url.netloc.rsplit("@", 1)[0] + "@" if "@" in url.netloc else ""
    try:
        yield url._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}").geturl(), proxy
    finally:
        proxy.close()
