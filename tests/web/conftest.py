"""Fixtures for the web chat tests: app processes on 127.0.0.1 and a real Chromium.

The browser is the system Chromium (``/usr/bin/chromium``), driven by Playwright; no
browser is ever downloaded. When none can start the browser tests are skipped with
the reason, unless ``CHATBUS_REQUIRE_BROWSER=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
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

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM; the exit code (killed if it does not stop in time)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
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
