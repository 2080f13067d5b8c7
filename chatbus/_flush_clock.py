"""The flush clock of ``chatbus.sse``: streams that gather messages wake together.

Owns: one timer per flush interval per trio run, shared by every SSE stream waiting
for it (1,000 streams of a busy room wake once per interval, not each on a timer of
its own), and the order they wake in (a batch per scheduler pass).
"""

from __future__ import annotations

from typing import Final, final

import attrs
import trio

__all__ = ["WAKE_BATCH", "FlushClock", "flush_clock"]


#: Streams woken per scheduler pass when an interval ends (see :class:`FlushClock`).
WAKE_BATCH: Final = 16


@final
@attrs.define(eq=False)
class FlushClock:
    """One flush interval's clock, shared by the streams of a trio run: the first
    stream to wait starts a timer, the others wait for the same one, and all flush
    when it fires (one timer per interval, not one per stream).

    When it fires, the waiters are woken :data:`WAKE_BATCH` at a time, one batch
    per pass of trio's scheduler: 1,000 streams writing in one pass would hold every
    other task (a POST being answered, a publish committing) for the whole round at
    each of its checkpoints; in batches, those run between them.
    """

    interval: float
    #: The waiters of the running interval (None: no timer runs).
    _due: trio.lowlevel.ParkingLot | None = None

    async def wait(self) -> None:
        """Return when the current interval ends (starting one if none runs)."""
        due = self._due
        if due is not None:
            await due.park()
            return
        due = self._due = trio.lowlevel.ParkingLot()
        try:
            await trio.sleep(self.interval)
        except BaseException:
            # This stream was cancelled (its client left): the others flush early,
            # never late.
            self._due = None
            due.unpark_all()
            raise
        self._due = None  # who waits from now on waits for the next interval
        try:
            while due:
                due.unpark(count=WAKE_BATCH)
                await trio.lowlevel.checkpoint()
        finally:
            due.unpark_all()


_CLOCKS: Final = trio.lowlevel.RunVar[dict[float, FlushClock]]("chatbus_sse_flush_clocks")


def flush_clock(interval: float) -> FlushClock:
    """The trio run's clock for ``interval`` (made on first use)."""
    try:
        clocks = _CLOCKS.get()
    except LookupError:
        clocks = {}
        _CLOCKS.set(clocks)
    clock = clocks.get(interval)
    if clock is None:
        clock = clocks[interval] = FlushClock(interval)
    return clock
