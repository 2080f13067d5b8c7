"""Cross-stream group commit: appends that wait are merged into one store round trip.

Owns the queue of appends waiting for a round trip and the rule for who sends the next
one; the backend says only how to send a batch (:attr:`GroupCommit.send`). Leader and
followers, no background task:

* an append that finds a free slot (fewer than ``max_in_flight`` round trips running,
  nobody queued) sends its own batch at once, alone;
* otherwise it queues. When a round trip completes, the oldest queued append is
  promoted: it takes the slot and sends ONE batch with everything queued, up to the
  caps, for all streams; the others get their outcomes from it;
* a queued caller cancelled before its entry was sent is removed and stores nothing;
  once sent, an entry may commit, so its batch runs to the end, shielded and bounded.

The synchronous methods are the whole state machine; :meth:`GroupCommit.submit` is
the thin async driver. Also what every backend does with a stream's result: hand
each caller its messages (:func:`settle`). No I/O here; imports only
:mod:`chatbus._codec` and :mod:`chatbus._message`.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, final

import attrs
import trio

from ._codec import plan_keyed_batch
from ._message import Draft, Message, make_message

#: What a backend's ``send`` raises that means "the store failed" (not "a bug").
StoreFailure = tuple[type[BaseException], ...]

#: Most drafts, and payload characters, one merged round trip carries (an append
#: bigger than that on its own still goes out, alone).
MAX_DRAFTS: Final = 4096
MAX_CHARS: Final = 8 * 1024 * 1024


@final
@attrs.define(eq=False)
class PendingAppend:
    """One caller's append: sent alone, or merged into another caller's round trip."""

    stream: str
    #: How many drafts, and how many characters of payload (for the caps).
    drafts: int
    chars: int
    #: The backend's encoding of this append (what ``send`` needs).
    payload: Any
    #: Set when the outcome is in, or when this caller is promoted to send.
    wake: trio.Event = attrs.field(factory=trio.Event)
    #: Promoted: holds a reserved in-flight slot and must send the next batch.
    lead: bool = False
    #: Part of a batch that was handed to the server: it may commit.
    sent: bool = False
    #: The outcome: what ``send`` recorded, or why it failed.
    result: Any = None
    cause: BaseException | None = None
    #: The epoch of the stream the outcome was stored in, if the backend said (see
    #: chatbus._message.Appended).
    epoch: int | None = None

    def settle(self, result: Any) -> None:
        """Record a successful outcome (called by the backend's ``send``)."""
        self.result = result


@final
@attrs.define(eq=False)
class GroupCommit:
    """The group-commit queue of one store.

    ``send(batch)`` runs one round trip for every entry of ``batch`` and calls
    :meth:`PendingAppend.settle` on each; if it raises, every entry of the batch gets
    that exception as its ``cause``. ``abandoned`` builds the error (one of
    ``failures``) for entries whose round trip stopped half-way or ran out of time:
    they may have been committed.
    """

    send: Callable[[list[PendingAppend]], Awaitable[None]]
    #: The exceptions that mean "the store failed" (anything else is a bug: the
    #: leader sees it as it is, the others as their ``cause``).
    failures: StoreFailure
    abandoned: Callable[[], Exception]
    max_in_flight: int = 3
    #: How long a round trip carrying other callers' appends may run once sent; its
    #: leader is shielded from cancellation meanwhile (the others wait for it).
    shield_timeout: float = 65.0
    in_flight: int = attrs.field(default=0, init=False)
    pending: deque[PendingAppend] = attrs.field(factory=deque, init=False)
    _promoted: bool = attrs.field(default=False, init=False)
    appends: int = attrs.field(default=0, init=False)
    batches: int = attrs.field(default=0, init=False)
    merged_batches: int = attrs.field(default=0, init=False)
    largest_batch: int = attrs.field(default=0, init=False)

    # ---- the async driver ----

    async def submit(self, entry: PendingAppend) -> None:
        """Wait until ``entry`` has its outcome: ``result``, or ``cause`` (not raised)."""
        self.appends += 1
        if self.pending or self.in_flight >= self.max_in_flight:
            self.pending.append(entry)
            try:
                await entry.wake.wait()
            except BaseException:
                self._abandon(entry)
                raise
            if not entry.lead:
                return
        else:
            self.in_flight += 1
        batch = self._take(entry)
        try:
            await self._run(batch)
        finally:
            self._finish(entry, batch)

    async def _run(self, batch: list[PendingAppend]) -> None:
        try:
            if len(batch) == 1:
                await self.send(batch)  # only this caller's work: cancellable
                return
            # Other callers wait for this round trip: the leader's cancellation must
            # not abandon it half-way (it may commit). Bounded all the same.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.shield_timeout
                await self.send(batch)
            if scope.cancelled_caught:
                raise self.abandoned()
        except Exception as exc:
            for member in batch:
                if member.result is None:
                    member.cause = exc
            if not isinstance(exc, self.failures):
                raise

    # ---- the state machine (synchronous) ----

    def _take(self, entry: PendingAppend) -> list[PendingAppend]:
        """``entry`` holds a slot: make its batch (it and what is queued, to the caps)."""
        batch = [entry]
        pending = self.pending
        if pending and pending[0] is entry:
            pending.popleft()
            self._promoted = False
            drafts, chars = entry.drafts, entry.chars
            while pending:
                head = pending[0]
                drafts += head.drafts
                chars += head.chars
                if drafts > MAX_DRAFTS or chars > MAX_CHARS:
                    break
                batch.append(pending.popleft())
        for member in batch:
            member.sent = True
        self._promote()  # leftovers over the caps, if a slot is still free
        self.batches += 1
        if len(batch) > 1:
            self.merged_batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        return batch

    def _finish(self, entry: PendingAppend, batch: list[PendingAppend]) -> None:
        self.in_flight -= 1
        for member in batch:
            if member.result is None and member.cause is None:
                # The leader stopped half-way (KeyboardInterrupt, a cancelled solo
                # send): nobody may be left waiting without an outcome.
                member.cause = self.abandoned()
            if member is not entry:
                member.wake.set()
        self._promote()

    def _abandon(self, entry: PendingAppend) -> None:
        """A queued caller was cancelled: drop its entry unless it was already sent."""
        if entry.sent:
            return  # it is in a round trip that may commit; nothing to undo
        if entry.lead:
            entry.lead = False
            self._promoted = False
            self.in_flight -= 1
        if entry in self.pending:  # an unsent entry is always queued
            self.pending.remove(entry)
        self._promote()

    def _promote(self) -> None:
        """Hand a free slot to the oldest queued append, which then sends a batch."""
        if self._promoted or not self.pending or self.in_flight >= self.max_in_flight:
            return
        head = self.pending[0]
        head.lead = True
        self._promoted = True
        self.in_flight += 1
        head.wake.set()


@final
@attrs.frozen
class Batch:
    """One caller's append as the group commit carries it (a :class:`PendingAppend`'s
    payload): the drafts, their bodies packed into one text and decoded."""

    drafts: list[Draft]
    packed: str
    bodies: list[Any]
    keyed: bool


def settle(
    stream: str,
    members: list[PendingAppend],
    last_id: int | None,
    created_at: datetime.datetime,
    found: dict[str, Message] | None,
) -> None:
    """Give each member of one stream its messages, from the statement's result.

    The server stored, in order, every draft whose key is None or new and first in
    the statement; :func:`plan_keyed_batch` makes the same choice here, so the new
    ones are the last ``len(new)`` ids. A draft that resolves to a message stored
    before it (earlier, or earlier in this statement) gets that message as a replay.
    ``last_id`` is None when the statement stored nothing in ``stream``.
    """
    bodies = [body for member in members for body in member.payload.bodies]
    drafts = [draft for member in members for draft in member.payload.drafts]
    if not found and (found is None or keys_unique(drafts)):
        # Unkeyed, or no key found and none repeated (the usual keyed batch): every
        # draft is new, and the drafts are the last ids in order.
        if last_id is None:  # pragma: no cover - the server stored what it did not find
            raise RuntimeError(f"no new last id returned for stream {stream!r}")
        first = last_id - len(bodies) + 1
        result = [
            make_message(stream, id, body, draft.key, created_at)
            for id, draft, body in zip(range(first, last_id + 1), drafts, bodies, strict=True)
        ]
    else:
        slots, new = plan_keyed_batch(drafts, found)
        if new and last_id is None:  # pragma: no cover - the server stored what it did not find
            raise RuntimeError(f"no new last id returned for stream {stream!r}")
        first = (last_id or 0) - len(new) + 1
        stored: dict[int, Message] = {}
        result = []
        for draft, body, slot in zip(drafts, bodies, slots, strict=True):
            if isinstance(slot, Message):
                result.append(slot)  # found in the stream: a replay already
            elif (original := stored.get(slot)) is not None:
                result.append(attrs.evolve(original, replay=True))  # repeated in the batch
            else:
                message = make_message(stream, first + slot, body, draft.key, created_at)
                stored[slot] = message
                result.append(message)
    start = 0
    for member in members:
        member.settle(result[start : start + member.drafts])
        start += member.drafts


def keys_unique(drafts: Sequence[Draft]) -> bool:
    """No key appears twice among ``drafts`` (None is no key)."""
    keys = [draft.key for draft in drafts if draft.key is not None]
    return len(set(keys)) == len(keys)
