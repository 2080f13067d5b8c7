"""The store's health as SSE streams report it (private; see :mod:`chatbus.sse`).

Owns: the per-bus probe of the store (a trio system task calling ``heads`` with a
deadline) and the pure per-stream state that turns it into ``reconnecting`` / ``ok``.
"""

from __future__ import annotations

import math
import weakref
from typing import Final, final

import attrs
import trio
import trio.lowlevel

import chatbus

#: Seconds between two health probes of a bus's store (while any stream follows it).
PROBE_INTERVAL: Final = 1.0
#: A probe that has not answered within this many seconds counts as failed: a frozen
#: store (a TCP black hole) is reported like a refused one.
PROBE_DEADLINE: Final = 3.0


@final
@attrs.define(eq=False)
class _HealthProbe:
    """Whether a bus's store answers: one ``heads`` call every ``interval`` seconds,
    for the streams followed here, while any SSE stream of the bus is open.

    Store calls that answer are the only proof the store is back: counters of attempts
    are not (an attempt in flight is no answer), and a failure of a call that began
    before a later answer is stale. A probe that has not answered within ``deadline``
    counts as failed at once, while it still hangs: a frozen store (a TCP black hole,
    where a query never returns) is reported like a refused one.

    It runs as a trio system task (one per bus, started by the first stream, ending
    after the last), so no SSE generator holds a nursery across a ``yield``.
    """

    bus: chatbus.Bus
    interval: float = PROBE_INTERVAL
    deadline: float = PROBE_DEADLINE
    #: When the last probe that the store answered began (-inf: none yet).
    answered: float = -math.inf
    _streams: dict[str, int] = attrs.field(factory=dict)
    _running: bool = False
    _began: float | None = None
    _failed: bool = False

    def down(self, now: float) -> bool:
        """The last probe failed, or the one in flight is past its deadline."""
        return self._failed or (self._began is not None and now - self._began >= self.deadline)

    def join(self, stream: str) -> None:
        self._streams[stream] = self._streams.get(stream, 0) + 1
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name=f"chatbus.sse probe {id(self.bus)}")

    def leave(self, stream: str) -> None:
        left = self._streams.get(stream, 0) - 1
        if left > 0:
            self._streams[stream] = left
        else:
            self._streams.pop(stream, None)

    async def _run(self) -> None:
        try:
            while self._streams:
                began = self._began = trio.current_time()
                answered = False
                with trio.move_on_after(self.deadline):
                    try:
                        await self.bus.store.heads(list(self._streams))
                        answered = True
                    except Exception:  # any failure: never crash the run from here
                        answered = False
                self._began = None
                self._failed = not answered
                if answered:
                    self.answered = began
                await trio.sleep(self.interval)
        finally:
            self._running = False
            self._began = None
            # What it knew goes stale once nobody asks: a stream opened after the
            # store came back must not start with "reconnecting" (the next probe says).
            self._failed = False


_PROBES: Final[weakref.WeakKeyDictionary[chatbus.Bus, _HealthProbe]] = weakref.WeakKeyDictionary()


def _probe_for(bus: chatbus.Bus) -> _HealthProbe:
    probe = _PROBES.get(bus)
    if probe is None:
        probe = _PROBES[bus] = _HealthProbe(bus)
    return probe


@final
@attrs.define(eq=False)
class _StoreHealth:
    """Pure: one stream's view of the store (the bus's probe, plus failures the stream
    met itself, opening its subscription) turned into reconnecting / ok transitions."""

    reconnecting: bool = False
    #: When the store call that failed for this stream began (None: none pending).
    _failed_began: float | None = None

    def failed(self, began: float) -> str | None:
        """A store call of this stream, begun at ``began``, failed."""
        self._failed_began = began
        if not self.reconnecting:
            self.reconnecting = True
            return "reconnecting"
        return None

    def observe(self, down: bool, answered: float) -> str | None:
        """Feed the probe's state (``down``, and when the last call that the store
        answered began); return ``"reconnecting"`` or ``"ok"`` on a change. A failure
        is over only once a call that began after it was answered."""
        if self._failed_began is not None and answered > self._failed_began:
            self._failed_began = None
        bad = down or self._failed_began is not None
        if bad == self.reconnecting:
            return None
        self.reconnecting = bad
        return "reconnecting" if bad else "ok"
