"""Topics: the bus's shared state per stream, and the router that feeds it notices.

Owns: :class:`Topic` (cache, high-water mark, wake-up, event sinks), :class:`Topics`
(the routing table) and :class:`Router` (the notifier's handler: O(1) per notice,
never awaiting). Imports the pure layers only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from operator import attrgetter
from typing import Protocol, final

import attrs
import trio

from ._cache import DurableCache
from ._codec import CommittedNotice
from ._event import Event
from ._exceptions import BusClosed
from ._message import Message, StreamInfo

_ID: Callable[[Message], int] = attrgetter("id")


@final
@attrs.define(eq=False)
class Topic:
    """One stream as seen by one bus.

    The listener and local producers only ever raise :attr:`high_water` and swap
    :attr:`changed` (coalescing, never blocking); subscriptions wait on the event and
    do the work themselves. So a notice costs O(1) however many subscribers there are,
    and a slow subscriber holds up nobody.
    """

    name: str
    cache: DurableCache
    #: Highest id known to be committed (from local commits, notices and polls).
    high_water: int = 0
    #: Bumped on every resync; a subscription that sees it change rescans.
    resyncs: int = 0
    #: Set (and replaced) whenever high_water or resyncs change.
    changed: trio.Event = attrs.field(factory=trio.Event)
    subscribers: int = 0
    users: int = 0
    #: Local appends in flight. Their notice may arrive (from the listener) before
    #: the append returns; subscriptions then wait for the commit to fill the cache
    #: rather than all reading back what this process has just written.
    appending: int = 0
    #: Store reads in flight, by cursor: subscriptions at the same cursor share one.
    reads: dict[int, trio.Event] = attrs.field(factory=dict)
    #: Subscriptions opened with ``events=True``.
    event_sinks: set[EventSink] = attrs.field(factory=set)
    #: high_water is the stream's head as the store knew it at some point (not just 0
    #: because nothing was heard yet): what an emitted event's ``after`` comes from.
    head_known: bool = False
    #: The epoch the cache's messages belong to, as last seen in the stream's info
    #: (None: not asked since the cache was last emptied).
    epoch: int | None = None
    #: ``resyncs`` when an emit last asked the store for the head: after a resync
    #: (notices may have been lost) the next emit asks again.
    head_asked_at_resync: int = -1
    #: The notifier receives this stream's notices (see Topics.watch).
    watched: bool = False
    #: Set when a watch in progress ends (its caller succeeded or gave up).
    watching: trio.Event | None = None

    def advance(self, last_id: int) -> None:
        """Record that ids up to ``last_id`` exist; wake subscriptions if that is news."""
        if last_id > self.high_water:
            self.high_water = last_id
            self._wake()

    def deliver_events(self, events: list[Event]) -> None:
        """Hand ``events`` to every event subscription (buffering, never blocking).

        An event implies its ``after`` message exists: that is news for the merge.
        """
        self.advance(max(event.after for event in events))
        for sink in list(self.event_sinks):
            sink.push_events(events)

    def deliver_emitted(self, event: Event) -> None:
        """:meth:`deliver_events` for one event this bus has just emitted (the emit
        path: once per event, so without the batch's lists)."""
        if event.after > self.high_water:
            self.high_water = event.after
            self._wake()
        for sink in self.event_sinks:  # push_emitted never changes the set
            sink.push_emitted(event)

    def committed(
        self, messages: Sequence[Message], generation: int, epoch: int | None = None
    ) -> int:
        """A local append committed ``messages``: cache them, wake subscriptions.

        ``generation`` is the cache's when the append began: if the stream's history
        changed meanwhile (a delete, trim or redaction; a resync), they are not
        trusted here and the subscriptions look in the store. ``epoch``, the history
        they were stored in if the store said (see chatbus._message.Appended), goes
        to :meth:`met_epoch`.

        Returns the highest id among them.
        """
        last_id = max(map(_ID, messages))
        if epoch is not None:
            self.met_epoch(epoch)  # on a reset the generation moves: nothing is cached
        if generation == self.cache.generation:
            self.cache.put(messages)
            self.high_water = max(self.high_water, last_id)
            self.head_known = True
        self._wake()  # even if a notice already raised high_water: the cache grew
        return last_id

    def notified(self, messages: list[Message]) -> None:
        """Another process committed ``messages`` (ids above :attr:`high_water`, of the
        cache's epoch: see :meth:`Router.committed`): cache them, wake subscriptions.

        Ids the cache holds already (read from the store meanwhile) are left as read.
        """
        cache, last_id = self.cache, messages[-1].id
        if messages[0].id <= cache.top:
            messages = [message for message in messages if message.id > cache.top]
        if messages:
            cache.put(messages)
        self.advance(last_id)

    def met_epoch(self, epoch: int) -> None:
        """A store page or a local commit of this stream came from ``epoch``.

        The cache holds one history, shared by the bus's subscriptions of the stream
        and fed by its commits: if it is another's (a delete and a new history whose
        notice has not come; a subscription opened before the stream existed that
        just adopted the new one), it is emptied and every subscription checks
        (:meth:`reset`), instead of taking what came for its own. Else the cache is
        of ``epoch`` from now on, if that was open: only with subscriptions, for a
        topic without any may hear no notices (a watching notifier), and the next
        subscription must not trust its cache then (see :meth:`validate` and
        :meth:`Topics.release`).
        """
        known = self.epoch
        if known and known != epoch:
            self.reset()
        elif self.subscribers and (known == 0 or (known is None and not len(self.cache))):
            self.epoch = epoch

    def append_failed(self) -> None:
        """A local append failed: subscriptions waiting for it must look again."""
        self._wake()

    def reset(self) -> None:
        """The stream's history may have been replaced (deleted): subscriptions check.

        Counted as a resync too; what the cache holds is of the old history.
        """
        self.cache.clear()
        self.high_water = 0
        self.head_known = False
        self.epoch = None
        self.resync()

    def validate(self, info: StreamInfo, *, current: bool = True) -> None:
        """A fresh look at the stream (a subscription asked its info): drop what the
        cache holds of another history, should a delete or trim notice have been lost
        and the resync that follows not have come yet (a connection silently dead).

        The first look cannot tell which history a non-empty cache holds: it empties it.
        After a look at a stream that did not exist (epoch 0), what was cached is of the
        history created since. ``current``: no reset came while it was asked; else its
        epoch may be of a history deleted meanwhile, and is not taken for the cache's.
        """
        if len(self.cache) > 0 if self.epoch is None else self.epoch not in (0, info.epoch):
            self.reset()
        if current:  # else the topic was reset while it was asked: info may be older
            self.epoch = info.epoch
            # Ids up to the head exist: a notice of them that comes late (after a
            # resync, from a notifier that delays) is not news, and its bodies may be
            # older than the store's (review: a redaction undone in the cache).
            self.advance(info.head)
        self.cache.forget_below(info.first_id)

    def resync(self) -> None:
        """Make every subscription of this topic rescan from its cursor."""
        self.resyncs += 1
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@final
@attrs.define(eq=False)
class Topics:
    """A bus's routing table: stream name → topic, kept only while something uses it."""

    cache_size: int
    #: Bounds the store reads of all subscriptions together, so that thousands of
    #: subscriptions starting at once queue here (cheaply, without timeouts) rather
    #: than in a connection pool.
    read_limiter: trio.CapacityLimiter
    by_name: dict[str, Topic] = attrs.field(factory=dict, init=False)
    #: The notifier's watch and unwatch (a WatchingNotifier's), or None.
    watcher: tuple[Callable[[str], Awaitable[None]], Callable[[str], None]] | None = None
    #: Open subscriptions, to end them when the bus closes.
    subscriptions: set[Stoppable] = attrs.field(factory=set, init=False)
    #: The notifier is not hearing (see Router.lost): new topics' caches start deaf.
    deaf: bool = attrs.field(default=False, init=False)
    closed: bool = attrs.field(default=False, init=False)

    def set_deaf(self, deaf: bool) -> None:
        """See :attr:`deaf` (the router's ``deafened``)."""
        self.deaf = deaf

    def check_open(self) -> None:
        """Raise :class:`BusClosed` if the bus is closed."""
        if self.closed:
            raise BusClosed("the bus is closed")

    def acquire(self, stream: str, subscription: Stoppable | None = None) -> Topic:
        """Return the topic of ``stream`` (made on first use) and count one more user."""
        self.check_open()
        topic = self.by_name.get(stream)
        if topic is None:
            topic = self.by_name[stream] = Topic(stream, DurableCache(self.cache_size))
            topic.cache.deaf = self.deaf
        topic.users += 1
        if subscription is not None:
            topic.subscribers += 1
            self.subscriptions.add(subscription)
        return topic

    async def watch(self, topic: Topic) -> None:
        """Make sure the notifier receives ``topic``'s notices (one watch per topic with
        subscriptions; concurrent subscriptions wait for the same one)."""
        if self.watcher is None:
            return
        watch, unwatch = self.watcher
        while not topic.watched:
            if topic.watching is not None:
                await topic.watching.wait()
                continue
            done = topic.watching = trio.Event()
            try:
                await watch(topic.name)
            except BaseException:
                unwatch(topic.name)  # a watch counts at once, even when it fails
                raise
            else:
                topic.watched = True
            finally:
                topic.watching = None
                done.set()

    def release(self, topic: Topic, subscription: Stoppable | None = None) -> None:
        """Count one user less; forget the topic when nothing uses it."""
        topic.users -= 1
        if subscription is not None:
            topic.subscribers -= 1
            self.subscriptions.discard(subscription)
            if topic.subscribers == 0:
                # Notices may stop (a watching notifier unwatches) while a publisher
                # keeps the cache: the next subscription's first look must not trust
                # it for any epoch, 0 included (found by a review: a delete and a new
                # history meanwhile, and the old messages were delivered as new).
                topic.epoch = None
            if topic.subscribers == 0 and topic.watched and self.watcher is not None:
                topic.watched = False
                self.watcher[1](topic.name)
        if topic.users == 0 and self.by_name.get(topic.name) is topic:
            del self.by_name[topic.name]


class Stoppable(Protocol):
    """A subscription, as far as closing the bus is concerned."""

    def _stop(self) -> None: ...


class EventSink(Protocol):
    """A subscription that takes events."""

    def push_events(self, events: list[Event]) -> None: ...

    def push_emitted(self, event: Event) -> None: ...


#: The key of the event :meth:`chatbus.Bus.redact` emits, before the redacted id.
REDACTED_KEY_PREFIX = "chatbus.redacted:"


@final
@attrs.define(eq=False)
class Router:
    """The notifier's handler: turns notices into topic wake-ups, never awaiting."""

    topics: dict[str, Topic]
    #: This bus's emitter id: its own events come back through the notifier (its
    #: subscriptions had them already).
    emitter: str
    notices: int = 0
    resyncs: int = 0
    events_received: int = 0
    #: Told True at :meth:`lost` and False at :meth:`resync` (Topics.deaf: topics made
    #: meanwhile start deaf too).
    deafened: Callable[[bool], None] = lambda deaf: None

    def notice(self, stream: str, last_id: int) -> None:
        self.notices += 1
        topic = self.topics.get(stream)
        if topic is not None:
            topic.advance(last_id)

    def committed(self, notice: CommittedNotice) -> None:
        """A notice that carries the messages it announces (another process's append).

        They go in the cache, sparing the subscriptions a store read, only where that
        is sure to be right: the topic has subscriptions, knows its epoch and it is the
        notice's (the same history), no local append is in flight (its commit fills the
        cache at no cost), and every one of them is news (above :attr:`Topic.high_water`:
        a notice overtaken by a redaction or a later notice, under a notifier that
        reorders, is not trusted). Else it is a plain notice, and the bodies are never
        decoded.
        """
        self.notices += 1
        topic = self.topics.get(notice.stream)
        if topic is None:
            return
        if (
            topic.subscribers
            and not topic.appending
            and topic.epoch == notice.epoch
            and notice.last_id - notice.count >= topic.high_water
            and (messages := notice.messages())
        ):
            topic.notified(messages)
        else:
            topic.advance(notice.last_id)

    def lost(self) -> None:
        """The notifier stopped hearing (its connection lost): until it is back and
        resyncs, a delete, trim or redaction made elsewhere goes unseen. So every
        cache is emptied and kept empty (deaf) meanwhile, and subscriptions read the
        store, rather than serve what such a change may have made stale (found by a
        review: a subscription opened right after a redaction elsewhere got the old
        body from the cache while the listener reconnected)."""
        self.deafened(True)
        for topic in self.topics.values():
            topic.cache.deaf = True
            topic.reset()

    def resync(self) -> None:
        # Anything may have happened while notices were lost: a delete, a trim, a
        # redaction. So nothing known of any stream is trusted any more: every topic
        # is reset, its cache emptied, its subscriptions check their epoch and rescan.
        self.resyncs += 1
        self.deafened(False)
        for topic in self.topics.values():
            topic.cache.deaf = False
            topic.reset()

    def reset(self, stream: str) -> None:
        topic = self.topics.get(stream)
        if topic is not None:
            topic.reset()

    def trimmed(self, stream: str, first_id: int) -> None:
        topic = self.topics.get(stream)
        if topic is not None:
            topic.cache.forget_below(first_id)

    def redacted(self, stream: str, id: int) -> None:
        topic = self.topics.get(stream)
        if topic is not None:
            topic.cache.forget(id)
            # Message id exists: a committed notice of it that comes after this (a
            # notifier that reorders) holds its old body and must not be cached.
            topic.advance(id)

    def events(self, events: Sequence[Event]) -> None:
        by_stream: dict[str, list[Event]] = {}
        for event in events:
            if event.emitter != self.emitter:
                by_stream.setdefault(event.stream, []).append(event)
        for stream, batch in by_stream.items():
            self.events_received += len(batch)
            topic = self.topics.get(stream)
            if topic is not None:
                for event in batch:
                    # Another bus redacted a message: what this one cached is stale.
                    if event.key is not None and event.key.startswith(REDACTED_KEY_PREFIX):
                        redacted = (
                            event.body.get("redacted") if isinstance(event.body, dict) else None
                        )
                        if type(redacted) is int:
                            topic.cache.forget(redacted)
                topic.deliver_events(batch)
