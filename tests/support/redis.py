"""Test support for the Redis backend: the servers from the environment, fresh prefixes.

* :func:`redis_url` / :func:`redis_cluster_url` return ``$CHATBUS_TEST_REDIS_URL`` /
  ``$CHATBUS_TEST_REDIS_CLUSTER_URL`` if the server answers, else skip the test (fail
  it under ``CHATBUS_REQUIRE_REDIS=1``).
* :func:`fresh_redis_pair` yields a ``(RedisStore, RedisNotifier)`` pair on a new
  key prefix that is dropped afterwards.
* :func:`redis_backend` is the Redis world of the conformance suite.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio

import chatbus
from chatbus._codec import encode_notice
from chatbus.redis import RedisNotifier, RedisStore, drop_prefix, open_redis
from chatbus.redis._lua import StreamKeys
from chatbus.redis._open import parse_url

URL_VARIABLES = {
    "redis": "CHATBUS_TEST_REDIS_URL",
    "redis-cluster": "CHATBUS_TEST_REDIS_CLUSTER_URL",
}


@functools.cache
def _probe(url: str) -> str | None:
    """``None`` if every seed of ``url`` accepts a TCP connection, else why not."""
    server, _ = parse_url(url)
    for host, port in server.addresses:
        try:
            with socket.create_connection((host, port), timeout=3) as sock:
                sock.sendall(b"PING\r\n")
                if not sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return f"{host}:{port} does not answer PING"
        except OSError as exc:
            return f"{host}:{port}: {exc}"
    return None


def url_for(kind: str) -> str:
    """The URL of the ``kind`` ("redis" or "redis-cluster") test server, or skip/fail."""
    variable = URL_VARIABLES[kind]
    url = os.environ.get(variable)
    required = os.environ.get("CHATBUS_REQUIRE_REDIS") == "1"
    reason = f"${variable} is not set" if not url else _probe(url)
    if reason is not None:
        message = f"Redis ({kind}) not available: {reason}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    assert url is not None
    return url


def redis_url() -> str:
    return url_for("redis")


def redis_cluster_url() -> str:
    return url_for("redis-cluster")


def unique_prefix() -> str:
    return f"chatbus_test_{uuid.uuid4().hex[:16]}"


@asynccontextmanager
async def fresh_prefix(url: str) -> AsyncIterator[str]:
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_prefix(url, prefix)


@asynccontextmanager
async def fresh_redis_pair(
    url: str, **options: Any
) -> AsyncIterator[tuple[RedisStore, RedisNotifier]]:
    async with fresh_prefix(url) as prefix, open_redis(url, prefix=prefix, **options) as pair:
        yield pair


@asynccontextmanager
async def redis_backend(
    kind: str,
) -> AsyncIterator[
    tuple[Callable[..., AbstractAsyncContextManager[chatbus.Bus]], Callable[[str, int], Any], str]
]:
    url = url_for(kind)
    async with fresh_prefix(url) as prefix, open_redis(url, prefix=prefix) as (admin, _):

        @asynccontextmanager
        async def open_bus(**options: Any) -> AsyncIterator[chatbus.Bus]:
            """A bus with its own client and listener: another "process"."""
            wrap = options.pop("wrap_notifier", lambda n: n)
            async with open_redis(url, prefix=prefix) as (store, notifier):
                async with chatbus.open_bus(
                    store=options.pop("store", store), notifier=wrap(notifier), **options
                ) as bus:
                    yield bus

        async def inject_notice(stream: str, last_id: int) -> None:
            channel = StreamKeys.of(prefix, stream).channel
            await admin.client.spublish(channel, encode_notice(stream, last_id))

        sep = "&" if "?" in url else "?"
        yield open_bus, inject_notice, f"{url}{sep}prefix={prefix}"
