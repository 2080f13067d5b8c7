"""The two pluggable parts of a bus: a :class:`Store` and a :class:`Notifier`.

A store is the source of truth; a notifier only carries hints. Any pair that
satisfies these protocols plugs into :func:`chatbus.open_bus`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from ._event import Event
from ._message import Draft, Message, StreamInfo
from ._options import EventRetention
from ._retention import RetentionPage


class Store(Protocol):
    """Durable, append-only streams with dense per-stream ids.

    Implementations must guarantee, for every stream:

    * ids are 1, 2, 3, … with no holes, assigned at append time;
    * commit order equals id order: when id ``n`` is visible to :meth:`read`, every
      id below ``n`` is visible too;
    * a batch becomes visible all at once.
    """

    async def append(self, stream: str, drafts: Sequence[Draft]) -> list[Message]:
        """Append ``drafts`` to ``stream`` atomically and return one message per draft.

        A draft whose idempotency key was already used in ``stream`` (earlier, or
        earlier in the same batch) stores nothing new: its slot in the result holds
        the original message. The result is in draft order.

        Raises:
            StoreError: the append failed; nothing of the batch was stored.
        """
        ...

    async def read(self, stream: str, after: int, limit: int) -> list[Message]:
        """Return up to ``limit`` messages of ``stream`` with id > ``after``, in id order."""
        ...

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        """Return the highest committed id of each stream (0 for an empty one)."""
        ...


class EventStore(Protocol):
    """What a :class:`Store` adds to keep events for joiners (optional).

    A store without these methods still works: events then reach only the
    subscriptions that are open when they are emitted.
    """

    async def retain_events(
        self,
        events: Sequence[Event],
        encoded: Sequence[str],
        *,
        retention: EventRetention | None = None,
    ) -> None:
        """Keep ``events`` (with their wire encodings) for joiners, by the rule of
        :class:`chatbus._event.RetainedEvents`; best effort, bounded per stream by
        ``retention`` (the flushing bus's :class:`~chatbus.EventRetention`; None: the
        defaults), oldest out first. A store whose backend also carries them between
        processes (Postgres NOTIFY) does so here, in the same round trip."""
        ...

    async def retained_events(self, stream: str, head: int) -> list[Event]:
        """What a joiner caught up to message ``head`` of ``stream`` gets, oldest first."""
        ...


class LifecycleStore(Protocol):
    """What a :class:`Store` adds for the stream lifecycle (optional).

    :meth:`chatbus.Bus.stream_info`, ``trim``, ``redact``, ``delete_stream`` and a
    bus's retention need it; a store without it still appends, reads and delivers.
    Every method is safe to run from many processes at once, and idempotent.
    """

    async def stream_info(self, stream: str) -> StreamInfo:
        """Where ``stream`` stands: head, first retained id, epoch (0 if it does not exist)."""
        ...

    async def delete_stream(self, stream: str) -> None:
        """Forget ``stream``: messages, keys, retained events; the next append starts a
        new epoch at id 1. Tell every bus (a reset notice)."""
        ...

    async def trim(
        self,
        stream: str,
        before: int,
        *,
        keys_for: float | None = None,
        epoch: int | None = None,
    ) -> int:
        """Move ``stream``'s first retained id up to ``before`` (never back, never past
        head + 1), tell every bus, then drop the messages below it in bounded steps.
        With ``epoch``, only if the stream is still at that epoch (else nothing).

        The idempotency keys of dropped messages keep answering a retried publish
        (with the original message, ``replay=True``) until the message is
        ``keys_for`` seconds old; then they go too (at this or a later trim). None
        keeps them for as long as the stream exists.

        Returns:
            The first retained id now.
        """
        ...

    async def redact(self, stream: str, id: int) -> Message | None:
        """Replace retained message ``id``'s body by JSON null (``redacted=True``);
        return the tombstone, or None if ``id`` is not retained."""
        ...

    async def over_retention(
        self,
        after: str,
        limit: int,
        *,
        max_messages: int | None,
        max_age: float | None,
        keys_for: float | None,
    ) -> RetentionPage:
        """Examine up to ``limit`` streams named after ``after`` (in the store's order)
        and say which hold messages beyond the policy (not among the last
        ``max_messages``, or older than ``max_age`` seconds by the store's clock), or
        trimmed keys older than ``keys_for`` seconds. Bounded work per call."""
        ...


class EpochReader(Protocol):
    """What a :class:`Store` whose epochs can move under a reader adds (optional).

    A read on one connection can meet a new epoch (a Redis restart or failover; a
    stream deleted and created again) before the notice saying so arrives on another.
    A subscription reads through this method when the store has it, so that it never
    takes a page of one history for the rest of another.
    """

    async def read_with_epoch(
        self, stream: str, after: int, limit: int
    ) -> tuple[int, list[Message]]:
        """:meth:`Store.read`, with the epoch ``stream`` was in when it was read (0: it
        did not exist; any value when the page is empty)."""
        ...


class NoticeHandler(Protocol):
    """What a notifier's listener reports to. Every method is synchronous and cheap.

    A bus's handler also has optional methods a listener calls where present (looked
    up with ``getattr``): ``committed(notice)`` for a notice that carries its messages
    (:class:`chatbus._codec.CommittedNotice`; else ``notice(stream, last_id)``),
    ``reset(stream)``, ``trimmed(stream, first_id)``, ``redacted(stream, id)`` for
    history changes, and ``lost()`` as soon as the listener knows it stopped hearing
    (its ``resync()`` follows once it hears again).
    """

    def notice(self, stream: str, last_id: int) -> None:
        """Stream ``stream`` has committed messages up to ``last_id`` (a hint)."""
        ...

    def resync(self) -> None:
        """Notices may have been lost (reconnect, overflow): rescan everything."""
        ...

    def events(self, events: Sequence[Event]) -> None:
        """Events emitted (by any bus) arrived, in emit order per emitter."""
        ...


class Notifier(Protocol):
    """Carries hints that streams have new messages, between processes or within one."""

    async def notify(self, stream: str, last_id: int) -> None:
        """Announce that ``stream`` has committed messages up to ``last_id``.

        The bus calls this after every committed batch, unless the notifier has a
        class attribute ``notifies_at_commit = True``: its paired store then announces
        inside the append itself (Postgres NOTIFY in the transaction), and the bus
        saves the call.
        """
        ...

    async def listen(
        self,
        handler: NoticeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report notices to ``handler`` until cancelled.

        Call ``task_status.started()`` only once notices are really being received
        (for Postgres: after LISTEN is acknowledged), so nothing committed after
        start-up can be missed. Never await the handler; never stop reading.
        """
        ...


class WatchingNotifier(Protocol):
    """What a :class:`Notifier` adds when it must be told which streams to listen to
    (optional; Redis sharded pub/sub has a channel per stream).

    The bus calls :meth:`watch` when a stream gets its first subscription on that bus,
    and awaits it before the subscription reads its snapshot (register before read);
    :meth:`unwatch` when the last one leaves. A notifier without these methods
    reports every stream's notices (memory, Postgres).
    """

    async def watch(self, stream: str) -> None:
        """Receive ``stream``'s notices from now on.

        Return once they are received (the server confirmed the subscription), or
        once the listener has given its session up (a ``resync()`` then follows,
        after its replacement is subscribed). Counted: each call is balanced by one
        :meth:`unwatch`, and it is counted at once, even if then cancelled.
        """
        ...

    def unwatch(self, stream: str) -> None:
        """One watcher of ``stream`` less (balances one :meth:`watch`); never blocks."""
        ...


class EventNotifier(Protocol):
    """What a :class:`Notifier` adds to carry events between buses (optional)."""

    async def notify_events(self, events: Sequence[Event], encoded: Sequence[str]) -> None:
        """Carry ``events`` to every listening bus (at most once; optional).

        A notifier whose paired store already sends them in :meth:`EventStore.retain_events`
        (Postgres) may do nothing here. A notifier without this method carries no
        events: they then reach only the emitting bus's own subscriptions.
        """
        ...
