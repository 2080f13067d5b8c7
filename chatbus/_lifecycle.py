"""The stream lifecycle: what :meth:`chatbus.Bus.read`, :meth:`~chatbus.Bus.stream_info`,
:meth:`~chatbus.Bus.trim`, :meth:`~chatbus.Bus.redact` and
:meth:`~chatbus.Bus.delete_stream` do once their arguments are checked.

Owns: the store's optional lifecycle methods (a store without them answers
:class:`~chatbus.BusError` naming it), reads checked against where the stream stands
(its first retained id, head and epoch), and telling this bus's subscriptions and
other buses (through the notifier) of a trim, a redaction or a delete. Imports
:mod:`chatbus._exceptions`, :mod:`chatbus._message`, :mod:`chatbus._outbox`,
:mod:`chatbus._protocols` and :mod:`chatbus._topic`; the bus calls these functions
with its store, notifier, topics and router.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._exceptions import BusError
from ._message import Message, StreamInfo, check_before, check_cursor, check_epoch
from ._outbox import Outbox
from ._protocols import Notifier, Store
from ._topic import REDACTED_KEY_PREFIX, Router, Topics


def lifecycle(store: Store, name: str) -> Any:
    """The store's lifecycle method ``name``; BusError naming the store if it has none."""
    method = getattr(store, name, None)
    if method is None:
        raise BusError(f"this bus's store ({type(store).__name__}) has no {name}")
    return method


async def lifecycle_info(store: Store, stream: str, *, required: bool = False) -> Any:
    """The store's ``stream_info(stream)``, or None if it has none (and not ``required``)."""
    ask = getattr(store, "stream_info", None)
    if ask is None:
        if required:
            lifecycle(store, "stream_info")  # raises BusError naming the store
        return None
    return await ask(stream)


async def read_after(
    topics: Topics, store: Store, stream: str, after: int, limit: int, epoch: int | None
) -> list[Message]:
    """A page after ``after``, checked against the stream's first id, head and epoch."""
    topics.check_open()
    page = await store.read(stream, after, limit)
    if after > 0 and (not page or page[0].id != after + 1):
        info = await lifecycle_info(store, stream)
        if info is not None:
            check_epoch(info, epoch, after)
            check_cursor(info, after)
            return page
    if epoch is not None:
        # After the read: the epoch was the caller's before it, so the same epoch
        # now means the page came from that history (epochs never come back).
        info = await lifecycle_info(store, stream, required=True)
        check_epoch(info, epoch, after)
    return page


async def read_before(
    topics: Topics, store: Store, stream: str, before: int, limit: int, epoch: int | None
) -> list[Message]:
    """A page of the ``limit`` ids below ``before``, checked like :func:`read_after`."""
    after = max(0, before - 1 - limit)
    topics.check_open()
    if before == 1:
        page: list[Message] = []
        await trio.lowlevel.checkpoint()
    else:
        page = await store.read(stream, after, before - 1 - after)
    if len(page) != before - 1 - after or (page and page[0].id != after + 1):
        # Short, or starting later (trimmed): where does the stream stand?
        info = await lifecycle_info(store, stream)
        if info is not None:
            check_epoch(info, epoch, before)  # it has seen `before`: no (0, 0)
            check_before(info, before)
            epoch = None  # checked, after the read
        page = [message for message in page if message.id < before]
    if epoch is not None:
        check_epoch(await lifecycle_info(store, stream, required=True), epoch, before)
    return page


async def stream_info(topics: Topics, store: Store, stream: str) -> StreamInfo:
    topics.check_open()
    info: StreamInfo = await lifecycle(store, "stream_info")(stream)
    return info


async def delete_stream(
    topics: Topics, store: Store, notifier: Notifier, outbox: Outbox, stream: str
) -> None:
    topics.check_open()
    # This bus's events emitted before the delete belong to the old conversation:
    # stored now, they go with it (flushed after, they would greet the next one).
    await outbox.flushed()
    await lifecycle(store, "delete_stream")(stream)
    reset = getattr(notifier, "notify_reset", None)
    if reset is not None:
        await reset(stream)
    topic = topics.by_name.get(stream)
    if topic is not None:
        topic.reset()


async def trim(
    topics: Topics,
    store: Store,
    stream: str,
    before: int,
    keys_for: float | None,
    trimmed: Callable[[str, int], Awaitable[None]],
) -> int:
    topics.check_open()
    first: int = await lifecycle(store, "trim")(stream, before, keys_for=keys_for)
    await trimmed(stream, first)
    return first


async def trimmed(router: Router, notifier: Notifier, stream: str, first_id: int) -> None:
    """Tell this bus's subscriptions, and (through the notifier) other buses'."""
    router.trimmed(stream, first_id)
    reset = getattr(notifier, "notify_reset", None)
    if reset is not None:
        await reset(stream, first_id)


async def redact(
    topics: Topics,
    store: Store,
    notifier: Notifier,
    router: Router,
    emit: Callable[..., Awaitable[object]],
    stream: str,
    id: int,
) -> Message:
    topics.check_open()
    tombstone: Message | None = await lifecycle(store, "redact")(stream, id)
    if tombstone is None:
        raise ValueError(f"stream {stream!r} has no retained message {id}")
    # Every bus's cache (also serving subscriptions opened later) drops the body.
    router.redacted(stream, id)
    tell = getattr(notifier, "notify_redacted", None)
    if tell is not None:
        await tell(stream, id)
    await emit(stream, {"redacted": id}, key=f"{REDACTED_KEY_PREFIX}{id}", ttl=3600)
    return tombstone
