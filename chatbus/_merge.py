"""The merge bookkeeping of one subscription: cursor, dedupe, gaps, rescans.

Pure state, no I/O: the subscriber's task asks it what to do next and reports what it
got. Delivery is exactly once and in id order because every message passes through
:meth:`MergeState.take`, which only ever advances the cursor by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import attrs

from ._cache import DurableCache
from ._exceptions import HistoryTruncated
from ._message import Message


@final
@attrs.define(eq=False)
class MergeState:
    """Where a subscription stands, and what it has seen."""

    cursor: int
    #: A store scan from the cursor is owed (at start-up, and after every resync).
    rescan: bool = True
    delivered: int = 0
    duplicates_skipped: int = 0
    gaps: int = 0
    rescans: int = 0
    store_reads: int = 0
    cache_hits: int = 0

    def from_cache(self, cache: DurableCache, limit: int) -> list[Message]:
        """Take the provably complete run after the cursor from ``cache`` (maybe empty)."""
        run = cache.run_after(self.cursor, limit)
        if run:
            self.cursor = run[-1].id
            self.delivered += len(run)
            self.cache_hits += len(run)
        return run

    def wants_store(self, high_water: int) -> bool:
        """Whether the store must be read: a rescan is owed or ids beyond us exist."""
        return self.rescan or high_water > self.cursor

    def begin_read(self, high_water: int) -> None:
        """Count a store read; one forced by a known id the cache lacked is a gap."""
        self.store_reads += 1
        if not self.rescan and high_water > self.cursor:
            self.gaps += 1

    def take(self, page: Sequence[Message], limit: int) -> list[Message]:
        """Accept a store page read after the cursor; return what is new, in order.

        A subscription from the start (cursor 0) begins at the first retained id.

        Raises:
            HistoryTruncated: the messages right after the cursor were trimmed away
                (the page starts later): never a silent jump.
        """
        fresh: list[Message] = []
        for message in page:
            if message.id <= self.cursor:
                self.duplicates_skipped += 1
                continue
            if message.id != self.cursor + 1:
                if self.cursor == 0 and not fresh:
                    self.cursor = message.id - 1  # from the start: what is retained
                else:
                    raise HistoryTruncated(
                        f"stream {message.stream!r} continues at id {message.id} after id"
                        f" {self.cursor}: ids are not dense here, the messages between"
                        " were trimmed",
                        message.stream,
                        message.id,
                    )
            fresh.append(message)
            self.cursor = message.id
        self.delivered += len(fresh)
        if len(page) < limit:
            # The store had nothing more at the time of the read: the scan is done.
            self.rescan = False
        return fresh

    def retained_from(self, first_id: int) -> None:
        """The stream retains ids from ``first_id``: a subscription from the start that
        has taken nothing yet begins there (so a cache that has not heard of a trim
        yet cannot hand it what the store no longer has)."""
        if self.cursor == 0 and self.delivered == 0 and first_id > 1:
            self.cursor = first_id - 1

    def request_rescan(self) -> None:
        """Notices may have been lost: scan the store from the cursor again."""
        self.rescan = True
        self.rescans += 1
