"""Scratch worlds for tests: a fresh backend per test, buses over it, clean-up.

Owns :func:`open_scratch_backend`, :func:`open_scratch_bus`, :func:`drop_schema` and
their options; used by the pytest plugin and by users' own harnesses. Public through
:mod:`chatbus.testing`. Imports :mod:`chatbus._faults`, the bus and the memory backend;
psycopg (and a Redis backend) only when asked for.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, TypedDict, Unpack, final

import attrs
import trio

from ._bus import Bus
from ._exceptions import BusError
from ._faults import FaultyNotifier, LaggingStore
from ._open import open_bus
from ._options import redacted_url
from ._protocols import Notifier, Store
from ._retention import Retention
from .memory import MemoryNotifier, MemoryStore

BACKENDS: Final = ("memory", "postgres", "redis")
#: Where the Postgres scratch backend connects unless told otherwise (after
#: ``$CHATBUS_TEST_DSN``): the server chatbus's own suite uses.
DEFAULT_POSTGRES_DSN: Final = "postgresql://postgres@127.0.0.1:5432/test"
#: Where the Redis scratch backend connects unless told otherwise (after
#: ``$CHATBUS_TEST_REDIS_URL``).
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"

_FAULT_OPTIONS: Final = frozenset({"drop", "duplicate", "reorder", "max_delay", "seed", "lag"})


class BackendUnavailable(BusError):
    """A scratch backend cannot be opened: its server does not answer or its code is missing.

    The message says why; the pytest plugin turns it into a skip (or, when the backend
    is required, a failure).
    """

    __module__ = "chatbus.testing"


class BusOptions(TypedDict, total=False):
    """The tuning options of :func:`chatbus.open_bus`, for ``**options`` signatures."""

    cache_size: int
    max_batch: int
    max_pending: int
    read_batch: int
    max_concurrent_reads: int
    max_body_bytes: int
    poll_interval: float | None
    retention: Retention | None
    trimmed_keys_for: float | None


class ScratchBusOptions(BusOptions, total=False):
    """:class:`BusOptions` plus the faults a scratch bus can be opened with.

    ``drop``, ``duplicate``, ``reorder``, ``max_delay`` and ``seed`` put the bus's
    notifier behind a :class:`FaultyNotifier`; ``lag`` puts its store behind a
    :class:`LaggingStore`. Zero (the default) means no wrapper.
    """

    drop: float
    duplicate: float
    reorder: float
    max_delay: float
    seed: int
    lag: float


_PairOpener = Callable[[], AbstractAsyncContextManager[tuple[Store, Notifier]]]


@final
@attrs.define(eq=False)
class ScratchBackend:
    """One fresh world of a backend, made by :func:`open_scratch_backend`.

    Every :meth:`open_bus` opens a bus with its own notifier listener over the world's
    one store, as a separate process would: on memory, one shared
    :class:`~chatbus.memory.MemoryStore` and :class:`~chatbus.memory.MemoryNotifier`
    with a listener per bus; on Postgres, an :func:`~chatbus.postgres.open_postgres`
    pair per bus, all on the same scratch schema; on Redis, an ``open_redis`` pair per
    bus under the same key prefix.

    Attributes:
        name: ``"memory"``, ``"postgres"`` or ``"redis"``.
        dsn: The server's DSN or URL (None for memory).
        schema: The scratch Postgres schema (None for other backends).
        prefix: The scratch Redis key prefix (None for other backends).
        defaults: Options every :meth:`open_bus` starts from.
    """

    name: str
    dsn: str | None
    schema: str | None
    prefix: str | None
    _open_pair: _PairOpener = attrs.field(alias="open_pair")
    defaults: ScratchBusOptions = attrs.field(factory=lambda: ScratchBusOptions())

    @asynccontextmanager
    async def open_bus(self, **options: Unpack[ScratchBusOptions]) -> AsyncIterator[Bus]:
        """Open another bus ("process") on this world; close it on exit.

        Args:
            **options: :class:`ScratchBusOptions`, over :attr:`defaults`: the
                :func:`chatbus.open_bus` options and the faults to inject into this
                bus's notifier and store.
        """
        merged: dict[str, Any] = {**self.defaults, **options}
        faults = {name: merged.pop(name) for name in _FAULT_OPTIONS if name in merged}
        lag = faults.pop("lag", 0.0)
        async with self._open_pair() as (store, notifier):
            if lag:
                store = LaggingStore(store, lag=lag)
            if any(faults.get(name) for name in ("drop", "duplicate", "reorder", "max_delay")):
                notifier = FaultyNotifier(notifier, **faults)
            async with open_bus(store=store, notifier=notifier, **merged) as bus:
                yield bus


@final
@attrs.define(eq=False)
class BusFactory:
    """Opens buses on a :class:`ScratchBackend` that run until :meth:`close`.

    Each bus runs in a task of ``nursery``, so a test can open several without nesting
    ``async with`` blocks: ``a, b = await factory(), await factory(drop=0.5)``. This is
    what the ``chatbus_bus_factory`` fixture yields.

    Args:
        backend: The world the buses share.
        nursery: Where the buses' tasks run; it must outlive them.
    """

    backend: ScratchBackend
    _nursery: trio.Nursery = attrs.field(alias="nursery")
    #: Every bus opened so far, in order.
    buses: list[Bus] = attrs.field(factory=list, init=False)
    _closing: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def __call__(self, **options: Unpack[ScratchBusOptions]) -> Bus:
        """Open a bus (see :meth:`ScratchBackend.open_bus`) and return it, running."""
        if self._closing.is_set():
            raise RuntimeError("this BusFactory is closed")
        bus: Bus = await self._nursery.start(self._run, options)
        return bus

    def close(self) -> None:
        """Close every bus (each leaves its ``async with`` normally); idempotent."""
        self._closing.set()

    async def _run(self, options: ScratchBusOptions, *, task_status: trio.TaskStatus[Bus]) -> None:
        async with self.backend.open_bus(**options) as bus:
            self.buses.append(bus)
            task_status.started(bus)
            await self._closing.wait()


@asynccontextmanager
async def open_scratch_backend(
    backend: str = "memory", *, dsn: str | None = None, **defaults: Unpack[ScratchBusOptions]
) -> AsyncIterator[ScratchBackend]:
    """Open a fresh, isolated world of ``backend``; remove what it stored on exit.

    * ``"memory"``: a new :class:`~chatbus.memory.MemoryStore` and notifier.
    * ``"postgres"``: a new uniquely named schema (created by the first bus), dropped
      with :func:`drop_schema` on exit. Needs the ``postgres`` extra.
    * ``"redis"``: a new unique key prefix, through ``chatbus.redis.open_redis(url,
      prefix=…)``, its keys deleted with ``chatbus.redis.drop_prefix`` on exit. Needs
      the ``redis`` extra.

    Example::

        async with open_scratch_backend("postgres", dsn=dsn, poll_interval=0.05) as world:
            async with world.open_bus() as a, world.open_bus(drop=0.3, seed=7) as b:
                ...  # two "processes" on one scratch schema

    Under a trio ``MockClock`` only the memory backend works: a wait for a real
    server counts as idle, so an auto-jumping clock skips over it and every timeout
    (connection acquire, LISTEN ping) fires at once.

    Args:
        backend: One of :data:`BACKENDS`.
        dsn: The server (Postgres DSN or Redis URL). Default: ``$CHATBUS_TEST_DSN`` or
            :data:`DEFAULT_POSTGRES_DSN`; ``$CHATBUS_TEST_REDIS_URL`` or
            :data:`DEFAULT_REDIS_URL`. Ignored for memory.
        **defaults: :class:`ScratchBusOptions` every bus of this world starts from.

    Raises:
        BackendUnavailable: the server does not answer, or the backend's code or
            extra is not installed. Raised on entry only.
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
    """
    if backend == "memory":
        store, notifier = MemoryStore(), MemoryNotifier()

        @asynccontextmanager
        async def open_memory_pair() -> AsyncIterator[tuple[Store, Notifier]]:
            yield store, notifier

        yield ScratchBackend(
            "memory", None, None, None, open_pair=open_memory_pair, defaults=defaults
        )
    elif backend == "postgres":
        async with _open_postgres_world(dsn, defaults) as world:
            yield world
    elif backend == "redis":
        async with _open_redis_world(dsn, defaults) as world:
            yield world
    else:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


@asynccontextmanager
async def open_scratch_bus(
    backend: str = "memory", *, dsn: str | None = None, **options: Unpack[ScratchBusOptions]
) -> AsyncIterator[Bus]:
    """Open one bus on a fresh world of ``backend``; clean the world up on exit.

    Shorthand for :func:`open_scratch_backend` followed by
    :meth:`ScratchBackend.open_bus`; the same arguments and errors.

    Example::

        async with open_scratch_bus("postgres", poll_interval=0.05) as bus:
            await bus.publish("room", {"text": "hi"})
    """
    async with (
        open_scratch_backend(backend, dsn=dsn) as world,
        world.open_bus(**options) as bus,
    ):
        yield bus


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop the Postgres ``schema`` and everything in it, if it exists.

    Runs in a worker thread on a short-lived connection, waiting at most 10 s for
    locks (a connection still using the schema holds them). Needs psycopg.

    Args:
        dsn: The server's DSN.
        schema: The schema's name (quoted as an identifier, never formatted in).
    """
    await trio.to_thread.run_sync(_drop_schema_sync, dsn, schema)


def _drop_schema_sync(dsn: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _probe_postgres(dsn: str) -> str | None:
    """``None`` if the server answers, else why not."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, OSError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _scratch_name() -> str:
    return f"chatbus_test_{uuid.uuid4().hex[:16]}"


@asynccontextmanager
async def _open_postgres_world(
    dsn: str | None, defaults: ScratchBusOptions
) -> AsyncIterator[ScratchBackend]:
    dsn = dsn or os.environ.get("CHATBUS_TEST_DSN") or DEFAULT_POSTGRES_DSN
    try:
        from chatbus.postgres import open_postgres
    except ImportError as exc:
        raise BackendUnavailable(
            "the postgres backend needs the postgres extra "
            f"(pip install 'chatbus[postgres]'): {exc}"
        ) from exc
    reason = await trio.to_thread.run_sync(_probe_postgres, dsn)
    if reason is not None:
        raise BackendUnavailable(f"PostgreSQL not reachable at {_redacted(dsn)}: {reason}")
    schema = _scratch_name()

    def open_pair() -> AbstractAsyncContextManager[tuple[Store, Notifier]]:
        return open_postgres(dsn, schema=schema)

    try:
        yield ScratchBackend("postgres", dsn, schema, None, open_pair=open_pair, defaults=defaults)
    finally:
        with trio.CancelScope(shield=True):
            await drop_schema(dsn, schema)


@asynccontextmanager
async def _open_redis_world(
    url: str | None, defaults: ScratchBusOptions
) -> AsyncIterator[ScratchBackend]:
    url = url or os.environ.get("CHATBUS_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    try:
        redis = importlib.import_module("chatbus.redis")
    except ModuleNotFoundError as exc:
        if exc.name != "chatbus.redis":
            raise BackendUnavailable(f"chatbus.redis cannot be imported: {exc}") from exc
        raise BackendUnavailable("chatbus.redis is not available") from exc
    open_redis = redis.open_redis
    prefix = _scratch_name()

    def open_pair() -> AbstractAsyncContextManager[tuple[Store, Notifier]]:
        pair: AbstractAsyncContextManager[tuple[Store, Notifier]] = open_redis(url, prefix=prefix)
        return pair

    try:
        async with open_pair():  # reachability: whatever the client raises, say why
            pass
    except (OSError, BusError) as exc:
        raise BackendUnavailable(f"Redis not reachable at {redacted_url(url)}: {exc}") from exc
    try:
        yield ScratchBackend("redis", url, None, prefix, open_pair=open_pair, defaults=defaults)
    finally:
        drop_prefix = getattr(redis, "drop_prefix", None)  # a stand-in may have none
        if drop_prefix is not None:
            with trio.CancelScope(shield=True):
                await drop_prefix(url, prefix)


def _redacted(dsn: str) -> str:
    """``dsn`` without its password, for messages."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable DSN>"
    if "password" not in params:
        return dsn
    return make_conninfo("", **{**params, "password": "***"})
