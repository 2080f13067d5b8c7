"""What the suite runs against: availability probes and the one chatbus bus opener.

Every "is X there?" question (the Postgres server, ``chatbus.postgres``, the NATS
and Redis peers and their clients, ``redis-server`` for the Redis servers the suite
starts itself, ``chatbus.redis``) is asked here, once per run, and answered with
``None`` or a one-line reason that becomes a ``skipped: <reason>`` row. Every
chatbus bus the suite opens, in this process or in a child, comes from
:func:`open_backend_bus`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio

import chatbus

from . import _pg

#: The chatbus backends a scenario may run on (``--backends``).
BACKENDS = ("memory", "postgres", "redis")

#: What a chatbus Postgres run needs: the server, and ``chatbus.postgres`` importable.
CHATBUS_POSTGRES = ("postgres", "chatbus.postgres")

#: What a chatbus Redis run needs: ``redis-server`` (the suite starts its own servers,
#: see ``_redis``) and ``chatbus.redis`` importable (coredis installed).
CHATBUS_REDIS = ("redis-server", "chatbus.redis")

#: Client import name and default URL of each peer system (``peers`` scenario).
PEER_CLIENTS = {"nats": "nats", "redis": "redis"}
DEFAULT_PEER_URLS = {"nats": "nats://127.0.0.1:4222", "redis": "redis://127.0.0.1:6379"}


def _tcp_problem(what: str, url: str) -> str | None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    if port is None:
        return f"{what}: no port in {url}"
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as exc:
        return f"{what} not reachable at {url}: {exc}"


def _chatbus_redis_missing() -> str | None:
    try:
        importlib.import_module("chatbus.redis")
    except ImportError as exc:
        return f"chatbus.redis not importable ({exc}; pip install -e '.[redis]')"
    return None


def _redis_server_missing() -> str | None:
    from ._redis import binaries_problem

    return binaries_problem()


def _client_problem(module: str, package: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{package} not installed (pip install -e '.[bench]')"
    return None


@dataclasses.dataclass(kw_only=True)
class Availability:
    """Cached answers to "can the suite use X?" (None, or why not)."""

    dsn: str
    peer_urls: dict[str, str]
    _answers: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def _probe(self, need: str) -> str | None:
        probes: dict[str, Callable[[], str | None]] = {
            "postgres": lambda: _pg.unreachable_reason(self.dsn),
            "chatbus.postgres": _pg.chatbus_postgres_missing,
            "redis-server": _redis_server_missing,
            "chatbus.redis": _chatbus_redis_missing,
            "nats-py": lambda: _client_problem("nats", "nats-py"),
            "redis-py": lambda: _client_problem("redis", "redis"),
            "nats": lambda: _tcp_problem("NATS", self.peer_urls["nats"]),
            "redis": lambda: _tcp_problem("Redis", self.peer_urls["redis"]),
        }
        return probes[need]()

    def problem(self, *needs: str) -> str | None:
        """The first reason one of ``needs`` is unavailable, or None if all are there."""
        for need in needs:
            if need not in self._answers:
                self._answers[need] = self._probe(need)
            if (answer := self._answers[need]) is not None:
                return answer
        return None


@asynccontextmanager
async def open_postgres_pair(
    dsn: str, *, schema: str | None = None, drop_schema: bool = True
) -> AsyncIterator[tuple[chatbus.Store, chatbus.Notifier]]:
    """``chatbus.postgres.open_postgres`` in a scratch schema (fresh unless given).

    The schema is dropped afterwards unless ``drop_schema`` is false (a child
    process joining its parent's schema, or a caller that still needs the table).
    """
    from chatbus.postgres import open_postgres

    schema = schema or _pg.scratch_schema("cb")
    try:
        async with open_postgres(dsn, schema=schema) as (store, notifier):
            yield store, notifier
    finally:
        if drop_schema:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_pg.drop_schema, dsn, schema)


@asynccontextmanager
async def open_redis_pair(
    url: str, *, prefix: str | None = None, drop_prefix: bool = True, **redis_options: Any
) -> AsyncIterator[tuple[chatbus.Store, chatbus.Notifier]]:
    """``chatbus.redis.open_redis`` under a scratch key prefix (fresh unless given),
    whose keys are deleted afterwards unless ``drop_prefix`` is false."""
    from chatbus.redis import drop_prefix as drop
    from chatbus.redis import open_redis

    prefix = prefix or _pg.scratch_schema("cb")
    try:
        async with open_redis(url, prefix=prefix, **redis_options) as (store, notifier):
            yield store, notifier
    finally:
        if drop_prefix:
            with trio.move_on_after(60, shield=True):
                await drop(url, prefix)


@asynccontextmanager
async def open_backend_bus(
    backend: str,
    dsn: str,
    *,
    schema: str | None = None,
    drop_schema: bool = True,
    redis_options: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[chatbus.Bus]:
    """Open a bus on ``backend``; for Postgres in a scratch schema (see above).

    For Redis, ``dsn`` is the server's URL (``redis://`` or ``redis+cluster://``) and
    ``schema`` the key prefix; ``redis_options`` go to ``open_redis``.
    """
    if backend == "memory":
        async with chatbus.open_bus(**options) as bus:
            yield bus
        return
    if backend == "redis":
        async with (
            open_redis_pair(
                dsn, prefix=schema, drop_prefix=drop_schema, **(redis_options or {})
            ) as (store, notifier),
            chatbus.open_bus(store=store, notifier=notifier, **options) as bus,
        ):
            yield bus
        return
    async with (
        open_postgres_pair(dsn, schema=schema, drop_schema=drop_schema) as (store, notifier),
        chatbus.open_bus(store=store, notifier=notifier, **options) as bus,
    ):
        yield bus
