"""The reconnecting listener every networked notifier runs, and its liveness machine.

Owns: the loop "open a session, serve it until it is lost, back off, open another,
resync" (:class:`Reconnecting`), how a payload is handed to the handler
(:func:`hand_over`), and the pure ping schedule that decides when a
silent session is dead (:class:`Liveness`). A backend supplies only how to open,
serve and close one session. Imports :mod:`chatbus._exceptions`, :mod:`chatbus._tasks`
and :mod:`chatbus._protocols`; no I/O of its own.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, final

import attrs
import trio

from ._codec import (
    COMMITTED_NOTICE_PREFIX,
    parse_committed_notice,
    parse_notice,
    parse_redacted,
    parse_reset,
)
from ._exceptions import StoreError
from ._protocols import NoticeHandler
from ._tasks import Backoff

logger = logging.getLogger("chatbus")

_S = TypeVar("_S")


class ListenLost(Exception):
    """The listening session failed or went silent; a new one must be opened."""


def hand_over(
    handler: NoticeHandler,
    payload: bytes,
    read_notice: Callable[[bytes], tuple[str, int] | None] | None = None,
) -> bool:
    """Give ``handler`` what a payload other than events says: a notice (carrying its
    messages, or plain: ``read_notice`` reads those, else :func:`parse_notice`) or a
    history change (a delete, a
    trim, a redaction; to the handler's optional methods). Returns whether it was a
    notice; anything else is ignored."""
    if payload.startswith(COMMITTED_NOTICE_PREFIX) and (
        committed := parse_committed_notice(payload)
    ):
        if (take := getattr(handler, "committed", None)) is not None:
            take(committed)
        else:
            handler.notice(committed.stream, committed.last_id)
        return True
    if (parsed := (read_notice or parse_notice)(payload)) is not None:
        handler.notice(*parsed)
        return True
    if (reset := parse_reset(payload)) is not None:
        stream, first_id = reset
        if first_id is None:
            if (on_reset := getattr(handler, "reset", None)) is not None:
                on_reset(stream)
        elif (on_trim := getattr(handler, "trimmed", None)) is not None:
            on_trim(stream, first_id)
    elif (redaction := parse_redacted(payload)) is not None and (
        on_redacted := getattr(handler, "redacted", None)
    ) is not None:
        on_redacted(*redaction)  # every bus's cache drops the body
    return False


@final
@attrs.define(eq=False)
class Reconnecting(Generic[_S]):
    """How to run sessions of type ``_S``: open one, serve it until lost, close it.

    ``open`` and ``serve`` raise :class:`ListenLost` for anything that a new session
    may cure; ``serve`` never returns otherwise.
    """

    open: Callable[[], Awaitable[_S]]
    serve: Callable[[_S], Awaitable[None]]
    close: Callable[[_S], None]
    backoff: Backoff
    #: Called after each replacement session is up, just before the resync.
    reconnected: Callable[[], None] = lambda: None
    name: str = "listen"

    async def run(
        self,
        handler: NoticeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve sessions until cancelled; ``started()`` once the first one is up.

        After that, failures are never raised: the session is replaced (with
        backoff) and ``handler.resync()`` is called once the new one is up.

        Raises:
            StoreError: the first session could not be opened.
        """
        try:
            session = await self.open()
        except ListenLost as exc:
            raise StoreError(f"{self.name} connection failed: {exc}") from exc
        task_status.started()
        while True:
            try:
                await self.serve(session)
            except ListenLost as exc:
                logger.warning("chatbus %s connection lost (%s); reconnecting", self.name, exc)
            finally:
                self.close(session)
            # Notices are being lost from now on: the handler trusts nothing it would
            # learn of from one until the resync (see chatbus._topic.Router.lost).
            if (lost := getattr(handler, "lost", None)) is not None:
                lost()
            session = await self._reopen()
            self.reconnected()
            handler.resync()

    async def _reopen(self) -> _S:
        self.backoff.reset()
        while True:
            await self.backoff.sleep()
            try:
                return await self.open()
            except ListenLost as exc:
                logger.info("chatbus %s reconnect failed (%s)", self.name, exc)


class Beat(enum.Enum):
    """What :meth:`Liveness.step` asks the session to do now."""

    WAIT = enum.auto()
    PING = enum.auto()
    DEAD = enum.auto()


@final
@attrs.define(eq=False)
class Liveness:
    """When to ping a listening session, and when its silence means it is dead.

    A ping is a message the session sends itself through the server (a self-NOTIFY, a
    self-publish); it must come back within ``timeout`` seconds, and the next one goes
    ``interval`` seconds after that. Pure: the caller passes the clock.
    """

    interval: float
    timeout: float
    _next_ping: float
    _deadline: float | None = attrs.field(default=None, init=False)
    serial: int = attrs.field(default=0, init=False)

    @classmethod
    def starting(cls, interval: float, timeout: float, now: float) -> Liveness:
        """A schedule whose first ping is due ``interval`` after ``now``."""
        return cls(interval, timeout, now + interval)

    @property
    def token(self) -> bytes:
        """The payload of the ping in flight (or of the last one)."""
        return str(self.serial).encode("ascii")

    def wake_at(self) -> float:
        """When the session must call :meth:`step` again at the latest."""
        return self._next_ping if self._deadline is None else self._deadline

    @property
    def awaiting_answer(self) -> bool:
        """A ping is in flight: its answer is news for :meth:`step` (the next ping is
        due ``interval`` after it)."""
        return self._deadline is not None

    def step(self, now: float, answered: bool) -> Beat:
        """Advance the schedule; ``answered``: the ping in flight came back."""
        if self._deadline is not None:
            if answered:
                self._deadline = None
                self._next_ping = now + self.interval
                return Beat.WAIT
            return Beat.DEAD if now >= self._deadline else Beat.WAIT
        if now >= self._next_ping:
            self.serial += 1
            self._deadline = now + self.timeout
            return Beat.PING
        return Beat.WAIT
