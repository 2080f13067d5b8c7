"""Opening a bus: :func:`open_bus`, and the URL scheme table that picks a backend.

Owns: validating the options once (:class:`~chatbus._options.BusOptions`), choosing
the store and notifier (a URL's backend module, a given pair, or the in-memory pair),
and the order of starting and stopping the bus's own tasks. Imports :mod:`chatbus._bus`
and loads a backend module only by name, from :data:`_BACKENDS`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final

from ._bus import Bus
from ._exceptions import BusError
from ._options import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_EVENT_BYTES, BusOptions, EventRetention
from ._protocols import Notifier, Store
from ._retention import Retention
from ._tasks import ServiceNursery, shielded_cleanup

_DEFAULTS: Final = BusOptions()

#: ``open_bus`` URL schemes → the module whose ``open_backend(url)`` opens that backend.
_BACKENDS: Final = {
    "memory": "chatbus.memory",
    "postgresql": "chatbus.postgres",
    "postgres": "chatbus.postgres",
    "redis": "chatbus.redis",
    "redis+cluster": "chatbus.redis",
}


def _open_backend(url: str) -> AbstractAsyncContextManager[tuple[Store, Notifier]]:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    scheme = url.partition("://")[0] if "://" in url else url
    module_name = _BACKENDS.get(scheme.lower())
    if module_name is None:
        known = ", ".join(f"{name}://" for name in _BACKENDS)
        raise ValueError(f"unsupported bus url scheme {scheme!r}: use one of {known}")
    backend = importlib.import_module(module_name)
    opened: AbstractAsyncContextManager[tuple[Store, Notifier]] = backend.open_backend(url)
    return opened


@asynccontextmanager
async def open_bus(
    url: str | None = None,
    *,
    store: Store | None = None,
    notifier: Notifier | None = None,
    cache_size: int = _DEFAULTS.cache_size,
    max_batch: int = _DEFAULTS.max_batch,
    max_pending: int = _DEFAULTS.max_pending,
    read_batch: int = _DEFAULTS.read_batch,
    max_concurrent_reads: int = _DEFAULTS.max_concurrent_reads,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    poll_interval: float | None = _DEFAULTS.poll_interval,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    event_buffer: int = _DEFAULTS.event_buffer,
    event_retention: EventRetention = _DEFAULTS.event_retention,
    retention: Retention | None = None,
    trimmed_keys_for: float | None = _DEFAULTS.trimmed_keys_for,
) -> AsyncIterator[Bus]:
    """Open a bus; leaving the block closes it and everything opened on it.

    With no arguments the bus is embedded: an in-memory store and notifier, private to
    this bus. A ``postgresql://`` URL gives a Postgres store and LISTEN/NOTIFY
    notifier (needs the ``postgres`` extra; options such as ``?schema=chat`` ride in
    the query, see :func:`chatbus.postgres.open_postgres`). Or pass any ``store`` /
    ``notifier`` pair; a missing one defaults to the in-memory kind.

    Args:
        url: ``postgresql://…`` (or ``postgres://…``), or ``memory://``.
        store: A :class:`~chatbus.Store`; not with ``url``.
        notifier: A :class:`~chatbus.Notifier`; not with ``url``.
        cache_size: Recent messages kept per stream for local subscribers (1..1000000).
        max_batch: Most messages per group commit (1..100000).
        max_pending: Most publish requests waiting per producer (1..1000000).
        read_batch: Most messages per store read and per hand-over to a consumer
            (1..10000); also bounds what a subscription buffers.
        max_concurrent_reads: Most store reads in flight at once, over all of this
            bus's subscriptions (1..1000); keep it below the store's connection count.
        max_body_bytes: Largest accepted body, as UTF-8 JSON (1..64 MiB).
        poll_interval: Seconds between safety-net polls of stream heads, which bound
            the delay a lost notice can cause; None turns polling off.
        max_event_bytes: Largest accepted event body, as UTF-8 JSON (1..6000: events
            ride in Postgres NOTIFY payloads).
        event_buffer: Most events a subscription buffers for its consumer; past it
            the oldest are dropped (and counted), never a message (1..1000000).
        event_retention: What each stream keeps of its events for joiners, an
            :class:`~chatbus.EventRetention` (default: 1000 events and 1 MiB per
            stream, oldest dropped first); applied to the events this bus emits.
        retention: A :class:`~chatbus.Retention` policy this bus applies to every
            stream of its store in the background (None: keep everything; trim by
            hand). Several buses over one store may all run it.
        trimmed_keys_for: Seconds, from a message's creation, that the idempotency
            key of a trimmed message keeps answering a retried publish with the
            original message (0 up to ten years; default a day); then the key is
            forgotten, at this or a later trim or retention sweep. None keeps them
            until the stream is deleted.

    Raises:
        ValueError: an option is out of range or the URL scheme is unknown.
        TypeError: an option has the wrong type (``event_retention`` not an
            :class:`~chatbus.EventRetention`, ``retention`` not a
            :class:`~chatbus.Retention`, a count not an int).
    """
    options = BusOptions(
        cache_size=cache_size,
        max_batch=max_batch,
        max_pending=max_pending,
        read_batch=read_batch,
        max_concurrent_reads=max_concurrent_reads,
        max_body_bytes=max_body_bytes,
        poll_interval=poll_interval,
        max_event_bytes=max_event_bytes,
        event_buffer=event_buffer,
        event_retention=event_retention,
        trimmed_keys_for=trimmed_keys_for,
    )
    if retention is not None and not isinstance(retention, Retention):
        raise TypeError(f"retention must be a chatbus.Retention, not {type(retention).__name__}")
    if url is not None:
        if store is not None or notifier is not None:
            raise TypeError("pass either a url or a store/notifier pair, not both")
        async with (
            _open_backend(url) as (url_store, url_notifier),
            _open_bus(url_store, url_notifier, options, retention) as bus,
        ):
            yield bus
        return
    from .memory import MemoryNotifier, MemoryStore

    async with _open_bus(
        store if store is not None else MemoryStore(),
        notifier if notifier is not None else MemoryNotifier(),
        options,
        retention,
    ) as bus:
        yield bus


@asynccontextmanager
async def _open_bus(
    store: Store, notifier: Notifier, options: BusOptions, retention: Retention | None
) -> AsyncIterator[Bus]:
    if retention is not None:
        for name in ("trim", "over_retention"):
            if getattr(store, name, None) is None:
                raise BusError(
                    f"retention needs a store with a stream lifecycle;"
                    f" {type(store).__name__} has no {name}"
                )
    async with ServiceNursery() as nursery:
        bus = Bus._create(store, notifier, options, nursery)
        try:
            await nursery.start(bus._serve)
            nursery.start_soon(bus._flush_events)
            if options.poll_interval is not None and not math.isinf(options.poll_interval):
                nursery.start_soon(bus._poll, options.poll_interval)
            if retention is not None:
                nursery.start_soon(bus._retain, retention)
            yield bus
        finally:
            # Events emitted just before the end still go out (bounded).
            with shielded_cleanup():
                await bus._outbox.flushed()
            bus._close()
