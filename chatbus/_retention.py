"""Retention: the policy a bus applies by itself, and the sweep that applies it.

Owns: :class:`Retention` (the public policy record, validated), :class:`RetentionPage`
(what a store answers when asked which streams are over the policy) and
:func:`sweep` (one pass over every stream, page by page, bounded per page). Imports
:mod:`chatbus._options` and :mod:`chatbus._exceptions` only; the store it drives is
typed by protocol.

Why the store finds the streams, not the bus: a bus only knows the streams it touched,
so a stream whose writers all went away would be kept for ever. Asking the store
covers every stream, and since a trim is idempotent (the first retained id only moves
forward), every bus of a cluster may run the sweep at once: they find the same targets
and their trims coincide, at worst doing the listing twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import attrs

from ._exceptions import StoreError
from ._options import check_int_range, check_range

if TYPE_CHECKING:
    from ._protocols import LifecycleStore

#: The longest max_age, interval or keys_for accepted: ten years, in seconds.
_MAX_SECONDS: Final = 10 * 366 * 86_400.0


@attrs.frozen(kw_only=True)
class Retention:
    """How much history a bus keeps per stream: pass it as ``open_bus(retention=...)``.

    A message is trimmed away once it is not among the stream's last ``max_messages``
    or once it is older than ``max_age`` seconds (either rule, when both are set). The
    bus applies the policy in the background: every ``interval`` seconds it asks the
    store, ``streams_per_round`` streams at a time, which streams hold messages beyond
    it, and trims those (see :meth:`chatbus.Bus.trim`). Publishes never wait for it.

    Attributes:
        max_messages: Keep at most this many messages per stream (1..10**12); None:
            no limit on the count.
        max_age: Keep no message older than this many seconds (by its
            ``created_at``); None: no limit on age.
        interval: Seconds between sweeps over all streams (0.01 up to ten years).
        streams_per_round: Streams examined per store query of a sweep (1..100000):
            bounds the work of one round.
    """

    max_messages: int | None = None
    max_age: float | None = None
    interval: float = 60.0
    streams_per_round: int = 100

    def __attrs_post_init__(self) -> None:
        if self.max_messages is None and self.max_age is None:
            raise ValueError("a Retention needs max_messages, max_age or both")
        if self.max_messages is not None:
            check_int_range("max_messages", self.max_messages, 1, 10**12)
        if self.max_age is not None:
            check_range("max_age", self.max_age, 0.001, _MAX_SECONDS)
        check_range("interval", self.interval, 0.01, _MAX_SECONDS)
        check_int_range("streams_per_round", self.streams_per_round, 1, 100_000)


@attrs.frozen(kw_only=True)
class RetentionPage:
    """A store's answer to :meth:`~chatbus._protocols.LifecycleStore.over_retention`.

    Attributes:
        trims: ``(stream, before, epoch)`` for each examined stream that holds
            messages beyond the policy, or trimmed messages whose idempotency keys
            are past their window: trim it with ``before`` (maybe its first retained
            id already, to forget those keys), if it is still at ``epoch``.
        next_after: Where the next page starts (pass it as ``after``); None once the
            last stream was examined. The same ``after`` again when a stream had
            more to trim than one page may do.
    """

    trims: list[tuple[str, int, int]]
    next_after: str | None


@attrs.frozen(kw_only=True)
class SweepResult:
    """What one sweep did (for the bus's statistics)."""

    pages: int
    trims: int
    errors: int


async def sweep(
    store: LifecycleStore,
    policy: Retention,
    keys_for: float | None,
    trimmed: Callable[[str, int], Awaitable[None]],
) -> SweepResult:
    """One pass of ``policy`` over every stream of ``store``, a page at a time.

    ``trimmed(stream, first_id)`` is awaited after each trim (to tell subscriptions).
    A failing page ends the pass (the next one starts over); a failing trim is
    counted and skipped. Neither is raised: retention is housekeeping.
    """
    after: str | None = ""
    pages = trims = errors = 0
    while after is not None:
        try:
            page = await store.over_retention(
                after,
                policy.streams_per_round,
                max_messages=policy.max_messages,
                max_age=policy.max_age,
                keys_for=keys_for,
            )
        except StoreError:
            return SweepResult(pages=pages, trims=trims, errors=errors + 1)
        pages += 1
        for stream, before, epoch in page.trims:
            try:
                # Only in the history examined: a stream deleted and created again
                # since then must not lose its new messages to the old one's target.
                first_id = await store.trim(stream, before, keys_for=keys_for, epoch=epoch)
            except StoreError:
                errors += 1
                continue
            trims += 1
            await trimmed(stream, first_id)
        if page.next_after == after and not page.trims:
            break  # pragma: no cover - a store that asks again must have trimmed
        after = page.next_after
    return SweepResult(pages=pages, trims=trims, errors=errors)
