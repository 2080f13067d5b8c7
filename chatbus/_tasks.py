"""Task plumbing shared by the bus, publishers and subscribers."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from ._exceptions import BusError


@asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for background tasks that are cancelled when the body ends.

    Unlike a bare ``trio.open_nursery()``, an exception raised by the body passes
    through as itself, not wrapped in an ExceptionGroup: the tasks in here are our
    internals and never fail on purpose. Should one fail anyway, its error surfaces as
    a single :class:`BusError` chained from the group.
    """
    manager = trio.open_nursery()
    nursery = await manager.__aenter__()
    body_failed = False
    try:
        yield nursery
    except BaseException:
        body_failed = True
        raise
    finally:
        nursery.cancel_scope.cancel()
        try:
            await manager.__aexit__(None, None, None)
        except BaseExceptionGroup as group:
            _, failures = group.split(trio.Cancelled)
            if failures is not None:
                raise BusError(
                    f"a chatbus background task failed: {failures.exceptions[0]!r}"
                ) from failures
            if not body_failed:
                raise  # only cancellations: trio routes them to their scope


@final
@attrs.define(eq=False)
class Backoff:
    """Exponential backoff with full jitter: first, 2*first, … capped at ``cap``."""

    first: float = 0.001
    cap: float = 1.0
    _next: float = attrs.field(default=0.0, init=False)

    def reset(self) -> None:
        """Progress was made: start again from ``first``."""
        self._next = 0.0

    async def sleep(self) -> None:
        """Sleep for the next delay."""
        self._next = min(self.cap, max(self.first, self._next * 2))
        await trio.sleep(self._next * (0.5 + random.random() / 2))
