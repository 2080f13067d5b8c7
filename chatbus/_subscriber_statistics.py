"""What a subscription counts: :class:`SubscriberStatistics`, the snapshot
:meth:`chatbus.Subscriber.statistics` returns (no behaviour; the subscriber, its
merge state and its event queue keep the counters)."""

from __future__ import annotations

import attrs

__all__ = ["SubscriberStatistics"]


@attrs.frozen(kw_only=True)
class SubscriberStatistics:
    """A snapshot of one subscription.

    Attributes:
        stream: The stream subscribed to.
        cursor: Id of the last message the consumer received.
        fetched: Id of the last message fetched for the consumer (>= cursor).
        high_water: Highest id the bus knows to be committed in the stream (0 after
            a reset or resync until it learns the head again: then below ``cursor``).
        delivered: Messages the consumer has received.
        buffered: Messages fetched but not yet received by the consumer (bounded).
        duplicates_skipped: Messages dropped because their id was at or below the cursor.
        gaps: Store reads forced by an id known to exist but missing from the cache.
        rescans: Full rescans from the cursor requested by a notifier resync.
        store_reads: Reads from the store (start-up, gaps, rescans, retries).
        cache_hits: Messages served from the bus's durable cache.
        store_errors: Failed store reads (each retried with backoff).
        events_delivered: Events the consumer has received (``events=True``).
        events_stale: Events dropped for arriving too late: unkeyed ones whose next
            message had already been received (too late for their position), and
            any whose emitter's later event had already been received (too late
            for their emitter's order; copies are not counted).
        events_dropped: Events dropped because the consumer fell behind (the buffer
            of events is bounded; messages are never dropped).
        events_refused: Events refused while the stream's history was in doubt
            (after a notifier resync or a reset of the stream, until this
            subscription had checked its epoch; or once it had ended): they might
            have been of another history.
        events_buffered: Events waiting for the consumer now.
    """

    stream: str
    cursor: int
    fetched: int
    high_water: int
    delivered: int
    buffered: int
    duplicates_skipped: int
    gaps: int
    rescans: int
    store_reads: int
    cache_hits: int
    store_errors: int
    events_delivered: int
    events_stale: int
    events_dropped: int
    events_refused: int
    events_buffered: int
