"""pytest plugin, registered through the ``pytest11`` entry point.

Fixtures for users' pytest-trio suites (each test must be a trio test: pytest-trio's
``trio_mode = true``, or ``@pytest.mark.trio``):

* ``chatbus_backend``: a :class:`chatbus.testing.ScratchBackend`, this test's fresh
  world of the selected backend (memory; a new Postgres schema, dropped after the
  test; a new Redis key prefix).
* ``chatbus_bus``: a :class:`chatbus.Bus` on that world, closed after the test.
* ``chatbus_bus_factory``: a :class:`chatbus.testing.BusFactory`;
  ``await chatbus_bus_factory(**options)`` opens another bus ("process") with its own
  notifier over the same store, optionally with faults (``drop``, ``duplicate``,
  ``reorder``, ``max_delay``, ``seed``, ``lag``) and bus options; all are closed after
  the test.

Choosing the backend, most specific first:

* ``@pytest.mark.chatbus(backend="postgres", dsn=..., require=True, **options)`` on a
  test, class or module; ``options`` are :func:`chatbus.open_bus` options
  (``poll_interval``, ``cache_size``, …) and faults, the defaults of every bus the
  test opens;
* ``--chatbus-backend memory|postgres|redis`` and ``--chatbus-dsn URL`` on the command
  line;
* ``chatbus_backend`` / ``chatbus_dsn`` in the pytest ini configuration;
* memory. A DSN applies to the backend of its scheme (``postgresql://`` or a libpq
  keyword string: Postgres; ``redis://``: Redis); without one, Postgres uses
  ``$CHATBUS_TEST_DSN`` or ``postgresql://postgres@127.0.0.1:5432/test``.

An unreachable backend skips the test with the reason; with ``--chatbus-require``
(or ini ``chatbus_require = true``, ``require=True`` in the marker,
``CHATBUS_REQUIRE_POSTGRES=1`` / ``CHATBUS_REQUIRE_REDIS=1``) it fails instead. A test
using ``autojump_clock`` is skipped on a networked backend: an auto-jumping clock
skips over every wait for the server.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Generator
from contextlib import AsyncExitStack
from typing import Any, Final, NoReturn

import attrs
import pytest
import trio

from ._bus import Bus
from ._open import open_bus
from .testing import (
    BACKENDS,
    BackendUnavailable,
    BusFactory,
    ScratchBackend,
    ScratchBusOptions,
    open_scratch_backend,
)

_FIXTURES: Final = frozenset({"chatbus_backend", "chatbus_bus", "chatbus_bus_factory"})
_FAULTS: Final = frozenset(ScratchBusOptions.__annotations__) - frozenset(
    name for name in inspect.signature(open_bus).parameters
)
_BUS_OPTIONS: Final = frozenset(inspect.signature(open_bus).parameters) - {
    "url",
    "store",
    "notifier",
}
_MARKER_KEYS: Final = frozenset({"backend", "dsn", "require"})
_REQUIRE_ENV: Final = {"postgres": "CHATBUS_REQUIRE_POSTGRES", "redis": "CHATBUS_REQUIRE_REDIS"}
#: Why a chatbus fixture skipped or failed its test: pytest-trio re-raises a skip from
#: an async fixture without its message, and a failure inside an exception group, so
#: the report gets the plain reason back from here.
_SKIP_REASON: Final = pytest.StashKey[str]()
_FAIL_REASON: Final = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--chatbus-*`` options and ``chatbus_*`` ini values."""
    group = parser.getgroup("chatbus", "chatbus fixtures")
    group.addoption(
        "--chatbus-backend",
        choices=BACKENDS,
        default=None,
        help="backend of the chatbus_* fixtures (default: ini chatbus_backend, or memory)",
    )
    group.addoption(
        "--chatbus-dsn",
        default=None,
        metavar="URL",
        help="server of the chatbus_* fixtures' networked backend (default: ini chatbus_dsn)",
    )
    group.addoption(
        "--chatbus-require",
        action="store_true",
        default=False,
        help="fail, instead of skipping, tests whose chatbus backend is unreachable",
    )
    parser.addini("chatbus_backend", "backend of the chatbus_* fixtures", default="memory")
    parser.addini("chatbus_dsn", "server of the chatbus_* fixtures' backend", default="")
    parser.addini(
        "chatbus_require",
        "fail, instead of skipping, when the chatbus backend is unreachable",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``chatbus`` marker; reject an unknown ini ``chatbus_backend``."""
    config.addinivalue_line(
        "markers",
        "chatbus(backend=None, dsn=None, require=None, **options): backend and bus "
        "options of this test's chatbus_* fixtures",
    )
    backend = config.getini("chatbus_backend")
    if backend not in BACKENDS:
        raise pytest.UsageError(
            f"ini chatbus_backend = {backend!r}: expected one of {', '.join(BACKENDS)}"
        )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a non-trio test that uses a chatbus fixture, saying what to set.

    Without this, pytest reports an unhandled async fixture (or pytest-trio "Trio
    fixtures can only be used by Trio tests"), which does not say what to change.
    """
    used = sorted(_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if not used or item.get_closest_marker("trio") is not None:
        return
    if len(used) > 1:
        used.remove("chatbus_backend")  # the others' dependency: name what was asked for
    where = f"{item.nodeid} uses the chatbus fixture {', '.join(map(repr, used))}"
    if not item.config.pluginmanager.hasplugin("trio"):
        pytest.fail(
            f"{where}, which needs pytest-trio: pip install pytest-trio, then set "
            "`trio_mode = true` under [tool.pytest.ini_options] in pyproject.toml "
            "or mark the test `@pytest.mark.trio`",
            pytrace=False,
        )
    test = getattr(item, "obj", None)
    if test is not None and not inspect.iscoroutinefunction(test):
        pytest.fail(
            f"{where} but is not an `async def` function: chatbus fixtures run only in "
            "async trio tests",
            pytrace=False,
        )
    pytest.fail(
        f"{where} but is not a trio test: set `trio_mode = true` under "
        "[tool.pytest.ini_options] in pyproject.toml (or under [pytest] in pytest.ini), "
        "or mark the test `@pytest.mark.trio`",
        pytrace=False,
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Put a chatbus fixture's skip or failure reason, plainly, into its report."""
    report = yield
    skipped = item.stash.get(_SKIP_REASON, None)
    failed = item.stash.get(_FAIL_REASON, None)
    if skipped is not None and report.skipped and isinstance(report.longrepr, tuple):
        path, lineno, _ = item.location  # reportinfo() would name pytest-trio's wrapper
        report.longrepr = (path, (lineno or 0) + 1, f"Skipped: {skipped}")
    elif failed is not None and report.failed and report.when == "call":
        report.longrepr = failed
    return report


def _skip(request: pytest.FixtureRequest, reason: str) -> NoReturn:
    request.node.stash[_SKIP_REASON] = reason
    pytest.skip(reason)


def _fail(request: pytest.FixtureRequest, reason: str) -> NoReturn:
    request.node.stash[_FAIL_REASON] = reason
    pytest.fail(reason, pytrace=False)


@attrs.frozen(kw_only=True)
class _Settings:
    backend: str
    dsn: str | None
    require: bool
    options: dict[str, Any]


def _settings(request: pytest.FixtureRequest) -> _Settings:
    """This test's backend, DSN, require flag and bus options."""
    config = request.config
    marked: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("chatbus"))):  # closest wins
        if len(marker.args) > 1:
            _usage(request, "takes at most one positional argument, the backend")
        if marker.args:
            marked["backend"] = marker.args[0]
        marked.update(marker.kwargs)
    unknown = set(marked) - _MARKER_KEYS - _BUS_OPTIONS - _FAULTS
    if unknown:
        known = ", ".join(sorted(_MARKER_KEYS | _BUS_OPTIONS | _FAULTS))
        _usage(request, f"unknown option {', '.join(sorted(unknown))}; known: {known}")
    backend = (
        marked.pop("backend", None)
        or config.getoption("chatbus_backend")
        or config.getini("chatbus_backend")
    )
    if backend not in BACKENDS:
        _usage(request, f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    dsn = marked.pop("dsn", None)
    if dsn is None:
        configured = config.getoption("chatbus_dsn") or config.getini("chatbus_dsn") or None
        if configured is not None and _backend_of(configured) == backend:
            dsn = configured
    require = marked.pop("require", None)
    if require is None:
        require = (
            config.getoption("chatbus_require")
            or config.getini("chatbus_require")
            or os.environ.get(_REQUIRE_ENV.get(backend, ""), "") == "1"
        )
    return _Settings(backend=backend, dsn=dsn, require=bool(require), options=marked)


def _backend_of(dsn: str) -> str:
    """The backend a DSN's scheme names; a libpq keyword string is Postgres."""
    if dsn.startswith(("redis://", "rediss://", "redis+")):
        return "redis"
    return "postgres"


def _usage(request: pytest.FixtureRequest, problem: str) -> NoReturn:
    _fail(request, f"{request.node.nodeid}: @pytest.mark.chatbus: {problem}")


@pytest.fixture
async def chatbus_backend(request: pytest.FixtureRequest) -> AsyncIterator[ScratchBackend]:
    """This test's fresh world of the selected backend; cleaned up after the test."""
    settings = _settings(request)
    if settings.backend != "memory" and "autojump_clock" in request.fixturenames:
        _skip(
            request,
            f"autojump_clock needs the memory backend, not {settings.backend}: the clock "
            "would jump over every wait for the server",
        )
    async with AsyncExitStack() as stack:
        unavailable = None
        try:
            backend = await stack.enter_async_context(
                open_scratch_backend(settings.backend, dsn=settings.dsn, **settings.options)
            )
        except BackendUnavailable as exc:
            unavailable = str(exc)
        if unavailable is not None:
            if settings.require:
                _fail(request, f"the chatbus backend is required, but {unavailable}")
            _skip(request, unavailable)
        yield backend


@pytest.fixture
async def chatbus_bus(chatbus_backend: ScratchBackend) -> AsyncIterator[Bus]:
    """A bus on this test's backend, with the marker's options; closed after the test."""
    async with chatbus_backend.open_bus() as bus:
        yield bus


@pytest.fixture
async def chatbus_bus_factory(chatbus_backend: ScratchBackend) -> AsyncIterator[BusFactory]:
    """Opens more buses ("processes") on this test's backend; all closed after it."""
    async with trio.open_nursery() as nursery:
        factory = BusFactory(chatbus_backend, nursery=nursery)
        try:
            yield factory
        finally:
            factory.close()
