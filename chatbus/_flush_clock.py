"""The flush clock of ``chatbus.sse``: streams that gather messages wake together.

Owns: one timer per flush interval per trio run, shared by every SSE stream waiting
for it (1,000 streams of a busy room wake once per interval, not each on a timer of
its own).
"""

from __future__ import annotations

from typing import Final, final

import attrs
import trio

__all__ = ["FlushClock", "flush_clock"]


@final
@attrs.define(eq=False)
class FlushClock:
    """One flush interval's clock, shared by the streams of a trio run: the first
    stream to wait starts a timer, the others wait for the same one, and all flush
    when it fires (one timer per interval, not one per stream)."""

    interval: float
    _due: trio.Event | None = None

    async def wait(self) -> None:
        """Return when the current interval ends (starting one if none runs)."""
        due = self._due
        if due is not None:
            await due.wait()
            return
        due = self._due = trio.Event()
        try:
            await trio.sleep(self.interval)
        finally:
            # Also when this stream is cancelled (its client left): the others then
            # flush early, never late.
            self._due = None
            due.set()


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
