"""Task plumbing shared by the bus, publishers and subscribers."""

from __future__ import annotations

import random
from types import TracebackType
from typing import final

import attrs
import trio

from ._exceptions import BusError


@final
class ServiceNursery:
    """A nursery for background tasks that are cancelled when the body ends.

    Unlike a bare ``trio.open_nursery()``, an exception raised by the body passes
    through as itself, not wrapped in an ExceptionGroup: the tasks in here are our
    internals and never fail on purpose. Should one fail anyway, its error surfaces as
    a single :class:`BusError` chained from the group. (A class rather than an
    ``@asynccontextmanager``: one is kept per open subscription, so its size counts.)
    """

    __slots__ = ("_manager", "nursery")

    def __init__(self) -> None:
        self._manager = trio.open_nursery()

    async def __aenter__(self) -> trio.Nursery:
        self.nursery = await self._manager.__aenter__()
        return self.nursery

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.nursery.cancel_scope.cancel()
        try:
            return bool(await self._manager.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group:
            # trio re-wraps (copies) a group raised by the body, so match its leaves.
            from_body = {id(leaf) for leaf in _leaves(exc)} if exc is not None else set()
            body, rest = group.split(lambda error: id(error) in from_body)
            failures = None if rest is None else rest.split(trio.Cancelled)[1]
            if failures is not None:
                raise BusError(
                    f"a chatbus background task failed: {failures.exceptions[0]!r}"
                ) from failures
            if body is not None:
                return False  # the body's own exception goes on, unwrapped
            raise  # only cancellations: trio routes them to their scope


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for member in error.exceptions for leaf in _leaves(member)]
    return [error]


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
