"""Tools for testing code built on chatbus, and chatbus itself, under adversity.

* :class:`FaultyNotifier` wraps any notifier and drops, duplicates, delays and reorders
  its notices, reproducibly from a seed.
* :class:`LaggingStore` wraps any store so its reads lag its appends, like a read
  replica behind the primary.
* :func:`open_scratch_backend` opens a fresh, isolated world of a backend (memory, a
  new Postgres schema that is dropped afterwards, a new Redis key prefix) on which
  :meth:`ScratchBackend.open_bus` opens any number of buses, each its own "process",
  optionally behind the two wrappers above; :func:`open_scratch_bus` is the one-bus
  form and :func:`drop_schema` the Postgres clean-up. None of these need pytest.
* A pytest plugin (installed with chatbus, loaded automatically) provides the
  ``chatbus_backend``, ``chatbus_bus`` and ``chatbus_bus_factory`` fixtures for
  pytest-trio suites; see ``chatbus._pytest_plugin``.

The contract chatbus keeps under all of these: a subscription still yields every
message exactly once and in id order; faults only change latency.
"""

from __future__ import annotations

import functools
import heapq
import importlib
import os
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, TypedDict, Unpack, final

import attrs
import trio

from ._bus import Bus, open_bus
from ._event import Event
from ._exceptions import BusError
from ._message import Draft, Message
from ._options import check_int_range, check_range
from ._protocols import NoticeHandler, Notifier, Store
from .memory import MemoryNotifier, MemoryStore

__all__ = [
    "BACKENDS",
    "DEFAULT_POSTGRES_DSN",
    "DEFAULT_REDIS_URL",
    "BackendUnavailable",
    "BusFactory",
    "BusOptions",
    "FaultStatistics",
    "FaultyNotifier",
    "LaggingStore",
    "ScratchBackend",
    "ScratchBusOptions",
    "drop_schema",
    "open_scratch_backend",
    "open_scratch_bus",
]


@attrs.frozen(kw_only=True)
class FaultStatistics:
    """What a :class:`FaultyNotifier` did to the notices passing through it."""

    received: int
    dropped: int
    duplicated: int
    delayed: int
    reordered: int
    delivered: int


@final
@attrs.define(eq=False)
class FaultyNotifier:
    """A notifier wrapper that mistreats notices, reproducibly.

    Each notice from ``inner`` is dropped with probability ``drop``; otherwise it is
    delivered twice with probability ``duplicate``; each copy is held back for a
    random delay up to ``max_delay`` seconds, and with probability ``reorder`` it is
    held until the next notice has been delivered (so they arrive swapped). At most
    ``capacity`` notices are held at once; beyond that, new ones are dropped (as a
    real transport's overflow would). Resync signals pass straight through.

    Args:
        inner: The notifier to wrap; ``notify`` goes straight to it.
        drop: Probability of dropping a notice (0..1).
        duplicate: Probability of delivering a notice twice (0..1).
        reorder: Probability of swapping a notice with the next one (0..1).
        max_delay: Upper bound of the random delay, in seconds (0 for none).
        seed: Seeds the random choices, so a failing run can be replayed.
        capacity: Most notices held back at once.
    """

    inner: Notifier
    drop: float = attrs.field(default=0.0, kw_only=True)
    duplicate: float = attrs.field(default=0.0, kw_only=True)
    reorder: float = attrs.field(default=0.0, kw_only=True)
    max_delay: float = attrs.field(default=0.0, kw_only=True)
    seed: int = attrs.field(default=0, kw_only=True)
    capacity: int = attrs.field(default=1024, kw_only=True)
    _handlers: list[_FaultyHandler] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_range("max_delay", self.max_delay, 0.0, 3600.0)
        check_int_range("capacity", self.capacity, 1, 10_000_000)

    async def notify(self, stream: str, last_id: int) -> None:
        """Pass the notice to the wrapped notifier (faults apply on the listening side)."""
        await self.inner.notify(stream, last_id)

    async def notify_reset(self, stream: str, first_id: int | None = None) -> None:
        """Pass a history change (delete, trim) to the wrapped notifier, if it carries any."""
        reset = getattr(self.inner, "notify_reset", None)
        if reset is not None:
            await reset(stream, first_id)
        else:
            await trio.lowlevel.checkpoint()

    async def notify_events(self, events: Sequence[Event], encoded: Sequence[str]) -> None:
        """Pass events to the wrapped notifier, if it carries any (faults apply on the
        listening side, as for notices: each batch is dropped, duplicated, delayed or
        reordered as a notice would be)."""
        carry = getattr(self.inner, "notify_events", None)
        if carry is not None:
            await carry(events, encoded)
        else:
            await trio.lowlevel.checkpoint()

    async def listen(
        self,
        handler: NoticeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen through the wrapped notifier, mistreating what it reports."""
        faulty = _FaultyHandler(self, handler, random.Random(self.seed + len(self._handlers)))
        self._handlers.append(faulty)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(faulty.release_due)
            await nursery.start(self.inner.listen, faulty)
            task_status.started()

    def statistics(self) -> FaultStatistics:
        """Totals over every listener of this notifier."""
        handlers = self._handlers
        return FaultStatistics(
            received=sum(h.received for h in handlers),
            dropped=sum(h.dropped for h in handlers),
            duplicated=sum(h.duplicated for h in handlers),
            delayed=sum(h.delayed for h in handlers),
            reordered=sum(h.reordered for h in handlers),
            delivered=sum(h.delivered for h in handlers),
        )


@final
@attrs.define(eq=False)
class _FaultyHandler:
    """Mistreats what one listener is told: notices, and batches of events alike."""

    config: FaultyNotifier
    target: NoticeHandler
    rng: random.Random
    #: (due time, order, delivery) of what is delayed; deliveries held for a reorder.
    _due: list[tuple[float, int, Callable[[], None]]] = attrs.field(factory=list, init=False)
    _held: deque[Callable[[], None]] = attrs.field(factory=deque, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    received: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0
    delivered: int = 0

    def notice(self, stream: str, last_id: int) -> None:
        self._mistreat(functools.partial(self.target.notice, stream, last_id))

    def events(self, events: Sequence[Event]) -> None:
        target = getattr(self.target, "events", None)
        if target is not None:
            self._mistreat(functools.partial(target, list(events)))

    def resync(self) -> None:
        self.target.resync()

    def reset(self, stream: str) -> None:
        # History changes pass straight through, like resyncs (they are rare, and a
        # lost one is found by the poll or the next resync anyway).
        reset = getattr(self.target, "reset", None)
        if reset is not None:
            reset(stream)

    def trimmed(self, stream: str, first_id: int) -> None:
        trimmed = getattr(self.target, "trimmed", None)
        if trimmed is not None:
            trimmed(stream, first_id)

    def _mistreat(self, delivery: Callable[[], None]) -> None:
        self.received += 1
        config, rng = self.config, self.rng
        if rng.random() < config.drop:
            self.dropped += 1
            return
        copies = 1
        if rng.random() < config.duplicate:
            copies = 2
            self.duplicated += 1
        for _ in range(copies):
            if len(self._due) + len(self._held) >= config.capacity:
                self.dropped += 1
            elif rng.random() < config.reorder:
                self.reordered += 1
                self._held.append(delivery)
            elif config.max_delay > 0:
                self.delayed += 1
                due = trio.current_time() + rng.uniform(0, config.max_delay)
                self._seq += 1
                heapq.heappush(self._due, (due, self._seq, delivery))
                self._wakeup.set()
            else:
                self._deliver(delivery)

    def _deliver(self, delivery: Callable[[], None]) -> None:
        self.delivered += 1
        delivery()
        while self._held:
            self.delivered += 1
            self._held.popleft()()

    async def release_due(self) -> None:
        while True:
            if not self._due:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            due, _, delivery = self._due[0]
            if trio.current_time() < due:
                self._wakeup = trio.Event()
                with trio.move_on_at(due):
                    await self._wakeup.wait()
                continue
            heapq.heappop(self._due)
            self._deliver(delivery)


@final
@attrs.define(eq=False)
class LaggingStore:
    """A store wrapper whose reads lag its appends by ``lag`` seconds.

    Like a read replica: an append commits (and returns) at once, but :meth:`read` and
    :meth:`heads` show each batch only ``lag`` seconds later. Ids appended to the
    wrapped store by other means are visible at once.

    Args:
        inner: The store to wrap.
        lag: Seconds between an append and its visibility to reads.
    """

    inner: Store
    lag: float = attrs.field(kw_only=True)
    #: Per stream: (visible_at, first new id) of each batch still hidden from reads.
    _hidden: dict[str, deque[tuple[float, int]]] = attrs.field(factory=dict, init=False)
    _top: dict[str, int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        check_range("lag", self.lag, 0.0, 3600.0)

    async def append(self, stream: str, drafts: Sequence[Draft]) -> list[Message]:
        """Append through the wrapped store; the batch becomes readable ``lag`` s later."""
        messages = await self.inner.append(stream, drafts)
        top = self._top.get(stream, 0)
        new_ids = [m.id for m in messages if m.id > top]
        if new_ids:
            self._top[stream] = max(new_ids)
            self._hidden.setdefault(stream, deque()).append(
                (trio.current_time() + self.lag, min(new_ids))
            )
        return messages

    async def read(self, stream: str, after: int, limit: int) -> list[Message]:
        """Read what is visible so far."""
        messages = await self.inner.read(stream, after, limit)
        visible = self._visible_head(stream)
        if visible is None:
            return messages
        return [m for m in messages if m.id <= visible]

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        """Heads as visible so far."""
        heads = await self.inner.heads(streams)
        for stream in streams:
            visible = self._visible_head(stream)
            if visible is not None and stream in heads:
                heads[stream] = min(heads[stream], visible)
        return heads

    async def retain_events(self, events: Sequence[Event], encoded: Sequence[str]) -> None:
        """Retain events in the wrapped store, if it keeps any (events do not lag)."""
        retain = getattr(self.inner, "retain_events", None)
        if retain is not None:
            await retain(events, encoded)
        else:
            await trio.lowlevel.checkpoint()

    def __getattr__(self, name: str) -> Any:
        # The stream lifecycle (stream_info, trim, delete_stream, redact) goes
        # straight to the wrapped store, if it has one.
        if name in ("stream_info", "trim", "delete_stream", "redact"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    async def retained_events(self, stream: str, head: int) -> list[Event]:
        """The wrapped store's retained events, if it keeps any."""
        retained = getattr(self.inner, "retained_events", None)
        if retained is None:
            await trio.lowlevel.checkpoint()
            return []
        found: list[Event] = await retained(stream, head)
        return found

    def _visible_head(self, stream: str) -> int | None:
        """The highest readable id while a batch of ``stream`` is hidden, else None."""
        hidden = self._hidden.get(stream)
        now = trio.current_time()
        while hidden and hidden[0][0] <= now:
            hidden.popleft()
        if not hidden:
            self._hidden.pop(stream, None)
            return None
        return min(first for _, first in hidden) - 1


# --- Scratch backends: a fresh, isolated world per test -------------------------------

#: The backends :func:`open_scratch_backend` knows, by name.
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
      prefix=…)`` once that module exists.

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
        raise BackendUnavailable(f"Redis not reachable at {url}: {exc}") from exc
    try:
        yield ScratchBackend("redis", url, None, prefix, open_pair=open_pair, defaults=defaults)
    finally:
        drop_prefix = getattr(redis, "drop_prefix", None)  # clean-up, once it exists
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
