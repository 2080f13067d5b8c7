"""Task plumbing shared by the bus, publishers, subscribers and every backend.

Owns: :class:`ServiceNursery`, the one :class:`Backoff`, the one way of telling a
body's own exception from our tasks' failures inside an ExceptionGroup
(:func:`unwrap_group`, :func:`sole_error`), and the bound on shielded cleanup
(:func:`shielded_cleanup`). Imports only :mod:`chatbus._exceptions`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Final, TypeVar, final

import attrs
import trio

from ._exceptions import BusError

T = TypeVar("T")

#: How long cleanup may run shielded from cancellation (closing connections, giving
#: them back to a pool): long enough for a live server, short enough for a dead one.
CLEANUP_SECONDS: Final = 5.0


def shielded_cleanup(seconds: float = CLEANUP_SECONDS) -> trio.CancelScope:
    """A scope for cleanup in ``finally``: shielded from cancellation, bounded in time."""
    return trio.move_on_after(seconds, shield=True)


@attrs.frozen
class Unwrapped:
    """What a nursery's ExceptionGroup held, sorted by origin (see :func:`unwrap_group`).

    Attributes:
        from_body: The body's exception is in the group (maybe copied into new groups).
        failures: What our own tasks raised, cancellations left out; None if nothing.
    """

    from_body: bool
    failures: BaseExceptionGroup[BaseException] | None


def unwrap_group(
    group: BaseExceptionGroup[BaseException], body: BaseException | None
) -> Unwrapped:
    """Sort the leaves of a nursery's ``group`` into the body's and our tasks' own.

    trio (and trio-asyncio) wrap a body's exception, and copy a group the body raised,
    into the groups of every nursery it passes; the leaves stay the very objects that
    were raised, so they are matched by identity.
    """
    from_body = {id(leaf) for leaf in _leaves(body)} if body is not None else set()
    mine, rest = group.split(lambda error: id(error) in from_body)
    failures = None if rest is None else rest.split(trio.Cancelled)[1]
    return Unwrapped(from_body=mine is not None, failures=failures)


def sole_error(
    group: BaseExceptionGroup[BaseException], body: BaseException | None
) -> BaseException | None:
    """The one exception a foreign library's task group should have raised, or None.

    For ``async with`` blocks around a library that runs our body inside its own
    task group (trio-asyncio, coredis/anyio) and so wraps whatever passes: the
    body's exception if only it (and cancellations) are in ``group``, else the one
    leaf if there is exactly one; None when several failed (raise the group).
    """
    found = unwrap_group(group, body)
    if found.failures is None and found.from_body and body is not None:
        return body
    node: BaseException = group
    while isinstance(node, BaseExceptionGroup):
        if len(node.exceptions) != 1:
            return None
        node = node.exceptions[0]
    return node


@asynccontextmanager
async def unwrapped_groups(opened: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """``opened``, entered, with what a foreign library's task group wraps unwrapped
    (see :func:`sole_error`): the body's exception comes out as the very object the
    body raised (a group included), a single failure of ours as itself."""
    body_error: BaseException | None = None
    unwrapped: BaseException
    try:
        async with opened as value:
            try:
                yield value
            except BaseException as exc:
                body_error = exc
                raise
        return
    except BaseExceptionGroup as group:
        sole = sole_error(group, body_error)
        if sole is None:
            raise
        unwrapped = sole
    raise unwrapped  # outside the except block: no group chained as its context


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for member in error.exceptions for leaf in _leaves(member)]
    return [error]


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
            found = unwrap_group(group, exc)
            if found.failures is not None:
                raise BusError(
                    f"a chatbus background task failed: {found.failures.exceptions[0]!r}"
                ) from found.failures
            if found.from_body:
                return False  # the body's own exception goes on, unwrapped
            raise  # only cancellations: trio routes them to their scope


@final
@attrs.define(eq=False)
class Backoff:
    """Exponential backoff with jitter: about first, 2*first, … capped at ``cap``.

    Each pause is drawn from [d/2, d] for the current step d, so processes that lost
    a server together do not all come back in the same instant.
    """

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
