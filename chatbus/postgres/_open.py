"""Opening the Postgres backend: :func:`open_postgres`, its options, and ``open_backend``.

Owns: option validation and defaults (one record, :class:`_Settings`), the two
conninfo strings (pool, LISTEN), choosing or opening the trio-asyncio loop, and the
order of opening and closing pool, store and notifier. Imports every other module of
this package; nothing imports it but :mod:`chatbus.postgres`.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, final

import attrs
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._exceptions import store_error
from .._options import check_identifier, check_int_range, check_range
from .._tasks import shielded_cleanup, unwrapped_groups
from . import _aio
from ._aio import AioRunner
from ._connections import LentConnections
from ._listen import PostgresNotifier
from ._pq import DB_ERRORS
from ._sql import Queries, channel_for_schema
from ._store import DEFAULT_MAX_IN_FLIGHT, PostgresStore

logger = logging.getLogger("chatbus.postgres")

#: ``application_name`` of the LISTEN connection (find it in ``pg_stat_activity``).
LISTEN_APPLICATION_NAME: Final = "chatbus-listen"
#: ``application_name`` of pooled connections, unless the DSN sets one.
POOL_APPLICATION_NAME: Final = "chatbus"

# libpq TCP keepalives: a peer that vanished without a FIN is noticed in about
# idle + interval * count seconds even when no traffic flows.
_KEEPALIVES: Final[dict[str, int]] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}


@final
@attrs.frozen(kw_only=True)
class _Settings:
    """Everything :func:`open_postgres` was asked for, validated."""

    dsn: str
    schema: str = "chatbus"
    min_connections: int = 1
    max_connections: int = 10
    max_in_flight: int | None = None
    acquire_timeout: float = 5.0
    connect_timeout: float = 5
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    max_backoff: float = 5.0
    idle_in_transaction_timeout: float = 60.0
    tcp_user_timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.dsn, str):
            raise TypeError(f"dsn must be a str, not {type(self.dsn).__name__}")
        # Postgres truncates identifiers to 63 bytes: two long names could collide.
        check_identifier("schema", self.schema, max_bytes=63)
        check_int_range("min_connections", self.min_connections, 1, 100)
        check_int_range("max_connections", self.max_connections, self.min_connections, 1000)
        if self.max_in_flight is not None:
            check_int_range("max_in_flight", self.max_in_flight, 1, self.most_in_flight)
        check_range("acquire_timeout", self.acquire_timeout, 0.1, 600)
        check_range("connect_timeout", self.connect_timeout, 1, 600)
        check_range("ping_interval", self.ping_interval, 0.1, 3600)
        check_range("ping_timeout", self.ping_timeout, 0.1, 3600)
        check_range("max_backoff", self.max_backoff, 0.1, 600)
        check_range("idle_in_transaction_timeout", self.idle_in_transaction_timeout, 0, 86_400)
        check_range("tcp_user_timeout", self.tcp_user_timeout, 0, 3600)

    @property
    def most_in_flight(self) -> int:
        """Leave a connection for reads (unless the pool has only one)."""
        return max(1, self.max_connections - 1)

    @property
    def in_flight(self) -> int:
        """``max_in_flight``, or its default."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        return min(DEFAULT_MAX_IN_FLIGHT, self.most_in_flight)

    def conninfo(self, application_name: str, *, override_name: bool) -> str:
        """The DSN with keepalives, timeouts, UTF-8 and an application name added.

        UTF-8 on every connection: :mod:`chatbus.postgres._pq` sends and reads text
        as UTF-8. Options the DSN sets win, except the name when ``override_name``.
        """
        defaults: dict[str, Any] = {
            "connect_timeout": math.ceil(self.connect_timeout),
            "tcp_user_timeout": round(self.tcp_user_timeout * 1000),
            **_KEEPALIVES,
        }
        if not override_name:
            defaults["application_name"] = application_name
        try:
            given = conninfo_to_dict(self.dsn)
            extra = {name: value for name, value in defaults.items() if name not in given}
            # A session that died inside a transaction (its client frozen or cut off)
            # must not hold a stream's lock for long: the server ends it. And the
            # store's prepared statements are planned once per session, not per run
            # (their plans do not depend on the parameters; planning the keyed append
            # costs more than running it).
            idle_ms = round(self.idle_in_transaction_timeout * 1000)
            session = (
                f"-c idle_in_transaction_session_timeout={idle_ms}"
                " -c plan_cache_mode=force_generic_plan"
            )
            options = " ".join(filter(None, [str(given.get("options") or ""), session]))
            forced: dict[str, Any] = {"client_encoding": "UTF8", "options": options}
            if override_name:
                forced["application_name"] = application_name
            return make_conninfo(make_conninfo(self.dsn, **extra), **forced)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"invalid Postgres DSN: {exc}") from None


@asynccontextmanager
async def open_postgres(
    dsn: str,
    *,
    schema: str = "chatbus",
    min_connections: int = 1,
    max_connections: int = 10,
    max_in_flight: int | None = None,
    acquire_timeout: float = 5.0,
    connect_timeout: float = 5,
    ping_interval: float = 5.0,
    ping_timeout: float = 5.0,
    max_backoff: float = 5.0,
    idle_in_transaction_timeout: float = 60.0,
    tcp_user_timeout: float = 10.0,
) -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    """Open a Postgres store and notifier pair for ``dsn``; close both on exit.

    Works from plain trio code: a trio-asyncio loop of its own is opened for the
    lifetime of the block (never one inherited from the context, whose lifetime
    this block does not control).
    Creates the schema and tables if they do not exist (safe when several processes
    start at once: the DDL runs under a transaction-scoped advisory lock).

    Example::

        async with chatbus.postgres.open_postgres(dsn) as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                ...

    (``chatbus.open_bus("postgresql://…?schema=name")`` does the same in one step.)

    Args:
        dsn: A libpq connection string or ``postgresql://`` URL. Keepalives, a
            ``connect_timeout`` and an ``application_name`` are added unless given.
        schema: The schema holding the tables; each schema is an independent
            namespace with its own NOTIFY channel.
        min_connections: Connections the pool keeps open (1 to 100).
        max_connections: Most connections the pool opens (``min_connections`` to 1000).
        max_in_flight: Most append statements (keyed or not) running at once (1 to
            ``max_connections - 1``, so reads always find a connection; 1 when the pool
            has a single connection). Appends made while that many are running are
            merged, across streams, into the next statement (group commit). Default:
            ``min(3, max_connections - 1)``.
        acquire_timeout: Seconds an operation waits for a pool connection before it
            fails with :class:`~chatbus.StoreError` (0.1 to 600). This is what makes
            a publish fail promptly while the database is unreachable.
        connect_timeout: Seconds a new connection may take (1 to 600); libpq's
            ``connect_timeout`` (whole seconds, rounded up) unless the DSN sets one.
        ping_interval: Seconds between LISTEN liveness pings (0.1 to 3600).
        ping_timeout: Seconds a ping may take before the LISTEN connection is
            declared dead and replaced (0.1 to 3600).
        max_backoff: Longest pause between LISTEN reconnect attempts (0.1 to 600).
        idle_in_transaction_timeout: Seconds the server lets one of this store's
            sessions sit idle inside a transaction before ending it (0 to 86400; 0:
            never). chatbus itself never leaves a transaction open across client
            work; this bounds what a session cut off mid-transaction can hold.
        tcp_user_timeout: Seconds sent data may stay unacknowledged before the
            connection is dropped (libpq ``tcp_user_timeout``; 0 to 3600, 0: the
            system's default), so a network partition is noticed in seconds, not
            minutes, even mid-statement. Keepalives cover idle connections.

    Raises:
        StoreError: the database could not be reached or the schema not created.
    """
    settings = _Settings(
        dsn=dsn,
        schema=schema,
        min_connections=min_connections,
        max_connections=max_connections,
        max_in_flight=max_in_flight,
        acquire_timeout=acquire_timeout,
        connect_timeout=connect_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        max_backoff=max_backoff,
        idle_in_transaction_timeout=idle_in_transaction_timeout,
        tcp_user_timeout=tcp_user_timeout,
    )
    async with _open_on_a_loop(settings) as pair:
        yield pair


@asynccontextmanager
async def _open_on_a_loop(
    settings: _Settings,
) -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    """Open the pair on a trio-asyncio loop of its own, closed when the pair is.

    Never a loop found in the context: a task spawned inside another block inherits
    that block's loop, which closes when that block ends, under this store. Owning
    the loop ties its lifetime to this block alone.

    trio-asyncio's nurseries wrap whatever passes through them (our errors and the
    body's) in ExceptionGroups: the body's exception comes out as the very object the
    body raised (a group included), a single failure of ours as itself.
    """
    async with unwrapped_groups(_open_loop_and_pair(settings)) as pair:
        yield pair


@asynccontextmanager
async def _open_loop_and_pair(
    settings: _Settings,
) -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    async with _aio.open_loop() as loop, _open_pair(AioRunner(loop), settings) as pair:
        yield pair


@asynccontextmanager
async def _open_pair(
    aio: AioRunner, settings: _Settings
) -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    schema = settings.schema
    channel = channel_for_schema(schema)
    pool = _aio.make_pool(
        settings.conninfo(POOL_APPLICATION_NAME, override_name=False),
        schema=schema,
        min_size=settings.min_connections,
        max_size=settings.max_connections,
        acquire_timeout=settings.acquire_timeout,
    )
    connections = LentConnections(pool, aio, settings.max_connections, settings.acquire_timeout)
    store = PostgresStore(
        connections,
        aio,
        schema,
        channel,
        Queries.for_schema(schema),
        max_in_flight=settings.in_flight,
        # Long enough for any pool wait (acquire_timeout) plus a slow statement.
        shield_timeout=settings.acquire_timeout + 60.0,
    )
    notifier = PostgresNotifier(
        settings.conninfo(LISTEN_APPLICATION_NAME, override_name=True),
        channel,
        connect_timeout=settings.connect_timeout,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        max_backoff=settings.max_backoff,
    )
    try:
        await aio.run(_aio.open_pool, pool, schema, settings.acquire_timeout)
    except BaseException as exc:
        # Cancelled or failed half-way: the pool's workers may be running (and
        # retrying connections); close it, or the asyncio loop never finishes.
        with shielded_cleanup():
            try:
                await aio.run(pool.close, 1.0)
            except Exception:  # cleanup must not mask the real error
                logger.exception("closing the chatbus connection pool failed")
        if isinstance(exc, DB_ERRORS):
            raise store_error("opening the Postgres store", exc) from exc
        raise
    try:
        yield store, notifier
    finally:
        store.close()
        with shielded_cleanup():
            try:
                await connections.aclose()
                await aio.run(pool.close, 3.0)
            except Exception:  # cleanup must not mask the body's error
                logger.exception("closing the chatbus connection pool failed")


#: ``open_bus`` URL query options, with how to read each one.
_URL_OPTIONS: Final = {
    "schema": str,
    "min_connections": int,
    "max_connections": int,
    "max_in_flight": int,
    "acquire_timeout": float,
    "connect_timeout": float,
    "idle_in_transaction_timeout": float,
    "tcp_user_timeout": float,
}


def open_backend(
    url: str,
) -> AbstractAsyncContextManager[tuple[PostgresStore, PostgresNotifier]]:
    """The store and notifier for a ``postgresql://`` URL (``open_bus``'s scheme table).

    chatbus's own options may ride in the URL's query (``?schema=chat&max_connections=20``,
    see :func:`open_postgres`); the rest of the URL goes to libpq as it is.

    Raises:
        ValueError: a chatbus option in the query is not valid.
    """
    parts = urllib.parse.urlsplit(url)
    libpq_query: list[tuple[str, str]] = []
    options: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        convert = _URL_OPTIONS.get(name)
        if convert is None:
            libpq_query.append((name, value))
            continue
        try:
            options[name] = convert(value)
        except ValueError:
            raise ValueError(
                f"URL option {name} must be {convert.__name__}, got {value!r}"
            ) from None
    dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(libpq_query)))
    return open_postgres(dsn, **options)
