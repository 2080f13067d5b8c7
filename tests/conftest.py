"""Shared fixtures: the conformance suite runs every guarantee against each backend."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

import chatbus
from chatbus.memory import MemoryNotifier, MemoryStore


@attrs.define
class Backend:
    """One storage world. Every ``open_bus`` call is a separate "process" on it."""

    name: str
    open_bus: Callable[..., AbstractAsyncContextManager[chatbus.Bus]]
    #: Send a raw notice the way another process's notifier would.
    inject_notice: Callable[[str, int], Any]
    #: An ``open_bus`` URL for this world, if it has one.
    url: str | None = None


def _memory_backend() -> Backend:
    store, notifier = MemoryStore(), MemoryNotifier()

    @asynccontextmanager
    async def open_bus(**options: Any) -> AsyncIterator[chatbus.Bus]:
        wrap = options.pop("wrap_notifier", lambda n: n)
        async with chatbus.open_bus(
            store=options.pop("store", store), notifier=wrap(notifier), **options
        ) as bus:
            yield bus

    return Backend("memory", open_bus, notifier.notify)


@asynccontextmanager
async def _backend(name: str) -> AsyncIterator[Backend]:
    if name == "memory":
        yield _memory_backend()
        return
    if name in ("redis", "redis-cluster"):
        from support.redis import redis_backend

        async with redis_backend(name) as (open_bus, inject_notice, url):
            yield Backend(name, open_bus, inject_notice, url)
        return
    from support.pg import postgres_backend

    async with postgres_backend() as (open_bus, inject_notice, url):
        yield Backend("postgres", open_bus, inject_notice, url)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each backend's name in turn, once its server answers: else the test is skipped
    (or failed, under $CHATBUS_REQUIRE_…) here, in a plain fixture, since pytest-trio
    re-raises a skip from an async one without its reason."""
    name: str = request.param
    if name == "postgres":
        from support.pg import pg_dsn

        pg_dsn()
    elif name in ("redis", "redis-cluster"):
        from support.redis import url_for

        url_for(name)
    return name


@pytest.fixture
async def backend(backend_name: str) -> AsyncIterator[Backend]:
    """Each backend in turn; Postgres tests get a fresh schema, Redis ones a fresh key
    prefix (servers from $CHATBUS_TEST_REDIS_URL and $CHATBUS_TEST_REDIS_CLUSTER_URL)."""
    async with _backend(backend_name) as backend:
        yield backend


def _must_not_be_cancelled(test: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return await test(*args, **kwargs)
        except trio.Cancelled as exc:
            raise AssertionError("a Cancelled escaped the test body") from exc

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fail tests whose body a stray Cancelled ended early.

    pytest-trio reports such a test as passed, which would let a test that stopped
    halfway (say, because closing the bus cancelled the caller's own code) look green.
    """
    for item in items:
        test = getattr(item, "obj", None)
        if (
            isinstance(item, pytest.Function)
            and inspect.iscoroutinefunction(test)
            and not getattr(test, "is_hypothesis_test", False)
        ):
            item.obj = _must_not_be_cancelled(test)


def pytest_ignore_collect(collection_path: Any, config: pytest.Config) -> bool | None:
    """Run the browser tests (tests/web) only when they are asked for by path.

    Playwright drives its own asyncio loop, which cannot run in a process where
    trio-asyncio (imported by the Postgres tests) patched asyncio: the README's test
    command runs them in a pytest of their own (`python3 -m pytest tests/web`).
    """
    if collection_path.name == "web" and collection_path.parent.name == "tests":
        asked = any(str(arg).rstrip("/").endswith("tests/web") for arg in config.args)
        return None if asked else True
    return None
