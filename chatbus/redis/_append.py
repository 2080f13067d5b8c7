"""The Redis append path: group commit per server, the script call, its re-run.

Owns: one :class:`~chatbus._coalesce.GroupCommit` per Cluster primary (one in all
on a standalone server), so round trips stuck on a stalled primary use only that
primary's ``max_in_flight`` budget and appends to the others go on; how a batch
becomes script calls (one APPEND call; on a Cluster in fast mode one APPEND_SLOTS
call per primary, which falls back to one APPEND call per hash slot with the same
tokens, and in durable mode one APPEND call per hash slot); the re-run that resolves
a lost reply; and the durable mode's second phase. Imports this package's :mod:`._lua` and
:mod:`._resp`; the store (:mod:`._store`) hands it its script runner.
"""

from __future__ import annotations

import itertools
import json
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, final

import attrs
import coredis
import coredis.exceptions
import trio

from .._coalesce import GroupCommit, PendingAppend, settle
from .._event import from_micros
from .._exceptions import BusError, OutcomeUnknown
from .._message import Draft, Message
from .._tasks import Backoff
from ._lane import Unsupported
from ._lua import APPEND, APPEND_SLOTS, PUBLISH, TOKENS_KEPT, StreamKeys
from ._resp import hash_slot

#: Exceptions that mean "the server or the connection failed" rather than a bug.
REDIS_ERRORS: Final = (coredis.exceptions.RedisError, TimeoutError, OSError)
#: What durable mode's WAIT after the append script raises when it did not confirm:
#: too few replicas in time, or unblocked (the primary turned replica in a failover,
#: CLIENT UNBLOCK). The script ran: the batch is stored, invisible; outcome unknown.
UNREPLICATED: Final = (
    coredis.exceptions.ReplicationError,
    coredis.exceptions.UnblockedError,
)

#: What a lost reply looks like: the command may or may not have run.
LOST: Final = (coredis.exceptions.ConnectionError, TimeoutError, OSError)
#: Failures after which a Cluster's slot layout may be stale: a primary that died or
#: lost its slots (a connection refused or lost, a timeout, MOVED past coredis's own
#: redirects, CLUSTERDOWN, TRYAGAIN).
LAYOUT_SUSPECT: Final = (
    coredis.exceptions.ConnectionError,
    coredis.exceptions.RedisClusterError,
    TimeoutError,
    OSError,
)
#: Default limit on append round trips running at once on one server (see
#: open_redis). One: the server runs scripts one at a time and the store has one
#: pipelined connection to it, so a second round trip in flight only makes the
#: batches smaller; the bus process's CPU goes by round trips (a script call, its
#: reply, the notices, the wake-ups), and at one in flight every append made
#: meanwhile joins the next batch.
DEFAULT_MAX_IN_FLIGHT: Final = 1
#: The default per Cluster primary in durable mode: there a batch goes out as one
#: call per hash slot (a stream's keys share one), so merging streams of other slots
#: saves no calls. (In fast mode one APPEND_SLOTS call carries a primary's batch, as
#: one call does on a single server: the default is DEFAULT_MAX_IN_FLIGHT.)
CLUSTER_DURABLE_MAX_IN_FLIGHT: Final = 3


def default_max_in_flight(cluster: bool, durability: str = "fast") -> int:
    """The ``max_in_flight`` open_redis uses when it is not given."""
    if cluster and durability == "durable":
        return CLUSTER_DURABLE_MAX_IN_FLIGHT
    return DEFAULT_MAX_IN_FLIGHT


#: Most seconds spent re-running a batch whose reply was lost to learn its outcome
#: (at most ``command_timeout`` too): what a publish may take past ``command_timeout``.
RESOLVE_LIMIT: Final = 2.0
#: The group of appends whose server the Cluster layout cannot name right now.
_UNMAPPED: Final = "?"
#: Most streams whose key names an appender remembers (then it starts afresh).
_KEYS_KEPT: Final = 4096
#: Whether a Cluster batch goes out as one APPEND_SLOTS call per primary (else one
#: APPEND call per hash slot); tests and benchmarks turn it off to compare.
CROSS_SLOT = True

Client = coredis.Redis[bytes] | coredis.RedisCluster[bytes]
#: Runs a script: ``(script, keys, args, *, durable)`` (the store's ``_script``).
RunScript = Callable[..., Awaitable[Any]]


def abandoned() -> OutcomeUnknown:
    """The error of an append whose round trip stopped half-way."""
    return OutcomeUnknown(
        "the round trip carrying this append was abandoned or ran out of time;"
        " it may or may not have been committed. Retry with the same key to find out."
    )


def not_sent(exc: BaseException) -> bool:
    """Whether a client error happened before the command could reach the server."""
    text = str(exc)
    return isinstance(exc, coredis.exceptions.ConnectionError) and (
        "Unable to establish" in text or "not usable" in text
    )


async def each(items: Any, run: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``run(item)`` for every item, concurrently when there are several."""
    items = list(items)
    if len(items) == 1:
        await run(items[0])
        return
    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(run, item)


def _names(streams: list[tuple[str, list[PendingAppend]]]) -> str:
    """The streams of a call, for its error messages."""
    return ", ".join(repr(stream) for stream, _ in streams)


@final
@attrs.define(eq=False)
class Appender:
    """The append path of one :class:`~chatbus.redis.RedisStore`."""

    _client: Client
    _prefix: str
    #: The store's script runner (NOSCRIPT handling, durable WAIT, layout hints).
    _script: RunScript
    _durability: str = "fast"
    _wait_replicas: int = 1
    _max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    _shield_timeout: float = 65.0
    _command_timeout: float = 10.0
    #: Told at once when an append started a new epoch (the notifier's listeners).
    _reset: Callable[[str], None] | None = None
    _cluster: bool = False
    #: One group commit per server (by ``host:port``), made on first use.
    groups: dict[str, GroupCommit] = attrs.field(factory=dict, init=False)
    reruns: int = attrs.field(default=0, init=False)
    #: Calls for streams of several slots (APPEND_SLOTS), and those that failed and
    #: went out again as one call per slot.
    cross_slot_calls: int = attrs.field(default=0, init=False)
    cross_slot_fallbacks: int = attrs.field(default=0, init=False)
    #: A batch's token: this appender's random prefix and a counter (unique without
    #: a call to the OS's random source per batch).
    _token_prefix: str = attrs.field(factory=lambda: secrets.token_hex(8), init=False)
    _token_count: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    #: Each stream's keys and hash slot, as its appends use them (see :meth:`keys`).
    _known: dict[str, tuple[StreamKeys, int]] = attrs.field(factory=dict, init=False)

    def keys(self, stream: str) -> StreamKeys:
        """The keys and channel of ``stream`` (remembered for the most recent streams)."""
        return self._of(stream)[0]

    def slot(self, stream: str) -> int:
        """The hash slot of ``stream``'s keys (remembered as :meth:`keys` are)."""
        return self._of(stream)[1]

    def _of(self, stream: str) -> tuple[StreamKeys, int]:
        known = self._known.get(stream)
        if known is None:
            if len(self._known) >= _KEYS_KEPT:
                self._known.clear()
            keys = StreamKeys.of(self._prefix, stream)
            known = self._known[stream] = (keys, hash_slot(keys.meta.encode()))
        return known

    def token(self) -> str:
        """A new batch token: its counter sets it apart from this appender's other
        batches, its random prefix from every other appender's."""
        return f"{self._token_prefix}{next(self._token_count):x}"

    async def submit(self, entry: PendingAppend) -> None:
        """Wait until ``entry`` has its outcome, in the group of its stream's server."""
        await self._group_of(entry.stream).submit(entry)

    def _group_of(self, stream: str) -> GroupCommit:
        """The group commit of the server holding ``stream`` (as the layout says now).

        A stream whose primary changes (a failover, a migration) moves to the new
        primary's group; a batch already queued in the old one still runs each slot's
        call where the layout says then, so this is only about whose budget it uses.
        """
        server = self._server_of(self.slot(stream)) if self._cluster else ""
        group = self.groups.get(server)
        if group is None:
            group = self.groups[server] = GroupCommit(
                send=self._send_batch,
                failures=(*REDIS_ERRORS, BusError),
                abandoned=abandoned,
                max_in_flight=self._max_in_flight,
                shield_timeout=self._shield_timeout,
            )
        return group

    def _server_of(self, slot: int) -> str:
        """The Cluster primary (``host:port``) the layout names for ``slot`` now."""
        client: Any = self._client
        try:
            name: str = client.connection_pool.cluster_layout.node_for_slot(slot).name
        except (*REDIS_ERRORS, LookupError, AttributeError):
            return _UNMAPPED  # no layout for it now: the call will say why
        return name

    async def _send_batch(self, batch: list[PendingAppend]) -> None:
        """One script call for ``batch`` (on a Cluster, one per primary the layout
        names for its streams, or one per hash slot; sent at once); each stream's
        callers get that stream's outcome."""
        groups: dict[str, list[PendingAppend]] = {}
        for member in batch:
            groups.setdefault(member.stream, []).append(member)
        calls: dict[int, list[tuple[str, list[PendingAppend]]]] = {}
        for stream, members in groups.items():
            slot = self.slot(stream) if self._cluster else 0
            calls.setdefault(slot, []).append((stream, members))
        if len(calls) == 1 or not CROSS_SLOT or self._durability == "durable":
            await each(calls.values(), self._append_call)
            return
        servers: dict[str, list[list[tuple[str, list[PendingAppend]]]]] = {}
        for slot, streams in calls.items():
            server = self._server_of(slot)
            if server == _UNMAPPED:
                server = f"{_UNMAPPED}{slot}"  # unknown: a call of its own
            servers.setdefault(server, []).append(streams)
        await each(servers.values(), self._server_call)

    async def _server_call(self, slots: list[list[tuple[str, list[PendingAppend]]]]) -> None:
        """One APPEND_SLOTS call for the streams of ``slots`` (one primary's, as the
        layout says); if it fails, one APPEND call per slot, with the same tokens.

        A reply that says the call was refused (a redirect, a key the server may not
        serve: APPEND_SLOTS aborts before writing) sends them as first runs; a lost
        reply (it may have run) as re-runs, as :meth:`_run_append` does after its own.
        """
        if len(slots) == 1:
            await self._append_call(slots[0])
            return
        streams = [item for call in slots for item in call]
        tokens = {stream: self.token() for stream, _ in streams}
        self.cross_slot_calls += 1
        sent_at = trio.current_time()
        try:
            await self._append_streams(streams, tokens, cross_slot=True)
            return
        except Unsupported:
            lost = None  # redirected, or no pipelined connection: it did not run
        except REDIS_ERRORS as exc:
            lost = exc if isinstance(exc, LOST) and not not_sent(exc) else None
        self.cross_slot_fallbacks += 1

        async def one_slot(call: list[tuple[str, list[PendingAppend]]]) -> None:
            await self._append_call(call, tokens, lost, sent_at)

        await each(slots, one_slot)

    async def _append_call(
        self,
        streams: list[tuple[str, list[PendingAppend]]],
        tokens: dict[str, str] | None = None,
        lost: BaseException | None = None,
        sent_at: float = 0.0,
    ) -> None:
        """One APPEND script call for ``streams`` (all in one slot on a Cluster).

        ``tokens``: the streams' batch tokens (else new ones); ``lost``: the reply of
        an earlier call of them with those tokens, sent at ``sent_at``, was lost, so
        this call re-runs it."""
        try:
            await self._append_streams(streams, tokens, lost=lost, sent_at=sent_at)
        except Exception as exc:
            if not isinstance(exc, (*REDIS_ERRORS, BusError)):
                raise
            for _, members in streams:
                for member in members:
                    if member.result is None and member.cause is None:
                        member.cause = exc

    async def _append_streams(
        self,
        streams: list[tuple[str, list[PendingAppend]]],
        tokens: dict[str, str] | None = None,
        *,
        cross_slot: bool = False,
        lost: BaseException | None = None,
        sent_at: float = 0.0,
    ) -> None:
        """The script call for ``streams`` and their outcomes (see :meth:`_append_call`).

        ``cross_slot``: one APPEND_SLOTS call, no re-run; a failure of the call
        propagates (the caller sends the streams again, per slot)."""
        durable = self._durability == "durable"
        script_keys: list[str] = []
        args: list[str | int] = [1 if durable else 0, 0, TOKENS_KEPT, len(streams)]
        all_drafts: list[list[Draft]] = []
        for stream, members in streams:
            keys = self.keys(stream)
            script_keys += [keys.meta, keys.entries, keys.keys, keys.tokens]
            script_keys += [keys.token_order, keys.redactions]
            drafts = [draft for member in members for draft in member.payload.drafts]
            all_drafts.append(drafts)
            token = self.token() if tokens is None else tokens[stream]
            args += [token, keys.channel, stream, random.getrandbits(52) + 1]
            args.append(len(drafts))
            args += [draft.key or "" for draft in drafts]
            args += [draft.body_json for draft in drafts]
        if cross_slot:  # fast mode only (see _send_batch): no WAIT, nothing to re-run
            reply: list[Any] = await self._script(
                APPEND_SLOTS, script_keys[:1], [*args, *script_keys]
            )
        else:
            reply = await self._run_append(
                script_keys, args, streams, durable=durable, lost=lost, sent_at=sent_at
            )
        at = 0
        for (stream, members), drafts in zip(streams, all_drafts, strict=True):
            status, epoch, vis, last_id, micros, nfound = reply[at : at + 6]
            flat = reply[at + 6 : at + 6 + 5 * int(nfound)]
            at += 6 + 5 * int(nfound)
            try:
                await self._settle_stream(
                    stream, members, drafts, status, epoch, int(vis), int(last_id), micros, flat
                )
            except (*REDIS_ERRORS, BusError) as exc:
                for member in members:
                    if member.result is None:
                        member.cause = exc

    async def _settle_stream(
        self,
        stream: str,
        members: list[PendingAppend],
        drafts: list[Draft],
        status: bytes,
        epoch: Any,
        vis: int,
        last_id: int,
        micros: Any,
        flat: Sequence[Any],
    ) -> None:
        if status == b"reset" and self._reset is not None:
            # A new epoch: this process's subscriptions must learn it before the
            # batch reaches them through the bus's cache (others get the notice).
            self._reset(stream)
        if status == b"unknown":
            raise OutcomeUnknown(
                f"append on stream {stream!r}: the reply was lost, and the batch's record"
                " is gone or no longer tells its outcome (a message it replayed was trimmed"
                " since): it may or may not have been stored. Retry with the same key."
            )
        found = self._found(stream, drafts, flat)
        created_at = from_micros(int(micros))
        keyed = any(member.payload.keyed for member in members)
        settle(stream, members, last_id, created_at, found if keyed else None)
        if status != b"again":  # (a re-run reads the epoch as it is now, not as it was)
            for member in members:
                member.epoch = int(epoch)
        if self._durability == "durable":
            newest = max([last_id, *(message.id for message in found.values())])
            if newest > vis:
                await self._publish_durable(stream, self.keys(stream), newest, epoch)

    def _found(self, stream: str, drafts: list[Draft], flat: Sequence[Any]) -> dict[str, Message]:
        """The messages the script found under the batch's keys (stored before it)."""
        found: dict[str, Message] = {}
        for i in range(0, len(flat), 5):
            index, id_, micros, body, redacted = flat[i : i + 5]
            key = drafts[int(index) - 1].key
            assert key is not None
            found[key] = Message(
                stream=stream,
                id=int(id_),
                body=None if body is None or redacted else json.loads(body),
                key=key,
                created_at=from_micros(int(micros)),
                replay=True,
                redacted=bool(redacted),
            )
        return found

    async def _run_append(
        self,
        keys: list[str],
        args: list[str | int],
        streams: list[tuple[str, list[PendingAppend]]],
        *,
        durable: bool,
        lost: BaseException | None = None,
        sent_at: float = 0.0,
    ) -> list[Any]:
        """Run the append script; after a lost reply, run it again with the same token.

        The re-run finds the first run's record (and returns its outcome) or, when no
        record of the token can have been dropped since it was sent, appends: either
        way the batch is stored once. Re-runs go on, paced, for at most
        ``min(command_timeout, RESOLVE_LIMIT)``: if none answers by then (the server
        stays out of reach, or frozen), or the record may have been dropped, the
        outcome is unknown. A command that was never sent is a plain failure.

        ``durable``: WAIT for the replicas right after the script, on its connection;
        if they do not confirm in time the batch is stored but invisible: unknown.
        ``lost``: the first run (with these tokens, sent at ``sent_at``) was made
        elsewhere and its reply was lost: only re-runs are made here.
        """
        if lost is None:
            sent_at = trio.current_time()
            try:
                reply: list[Any] = await self._script(APPEND, keys, args, durable=durable)
                return reply
            except UNREPLICATED as exc:
                raise self._unreplicated(_names(streams), exc) from exc
            except LOST as exc:
                if not_sent(exc):
                    raise
                lost = exc
        # It may have run. One budget for all the re-runs: a server that did not answer
        # the first run seldom answers the next, and each would wait a command_timeout.
        names = _names(streams)
        budget = min(self._command_timeout, RESOLVE_LIMIT)
        last: BaseException | None = None
        pause = Backoff(0.05, 0.4)
        with trio.move_on_after(budget):
            while True:
                await pause.sleep()
                self.reruns += 1
                # The window: a record made since the first send must not have been dropped.
                args[1] = round((trio.current_time() - sent_at + 1.0) * 1_000_000)
                try:
                    again: list[Any] = await self._script(APPEND, keys, args, durable=durable)
                    return again
                except UNREPLICATED as exc:
                    raise self._unreplicated(names, exc) from exc
                except (*LOST, *LAYOUT_SUSPECT) as exc:
                    last = exc  # out of reach (or its slot moving) for now: again
                except REDIS_ERRORS as exc:
                    last = exc  # refused outright: the first run's outcome stays unknown
                    break
        if isinstance(lost, TimeoutError):
            what = f"no reply came within command_timeout ({self._command_timeout:g} s)"
        else:
            what = f"the connection was lost while the append was in flight ({lost!r})"
        if last is None:
            tried = f"re-running it with its token got no answer within {budget:g} s"
        else:
            tried = f"re-running it with its token did not tell ({last!r})"
        error = OutcomeUnknown(
            f"append on stream {names}: {what}, so it may have run; {tried}. It may or"
            " may not have been stored: retry with the same key to find out."
        )
        raise error from lost

    def _unreplicated(self, names: str, exc: BaseException) -> OutcomeUnknown:
        return OutcomeUnknown(
            f"append on stream {names}: stored, but not confirmed by"
            f" {self._wait_replicas} replica(s) in time ({exc!r}); it becomes visible with"
            " the next durable append of the stream, or is lost with a failover. Retry"
            " with the same key to find out."
        )

    async def _publish_durable(
        self, stream: str, keys: StreamKeys, newest: int, epoch: Any
    ) -> None:
        """Durable mode, after WAIT: make the stream visible up to ``newest``, notify."""
        try:
            await self._script(PUBLISH, [keys.meta], [newest, epoch, keys.channel, stream])
        except REDIS_ERRORS as exc:
            raise self._unreplicated(repr(stream), exc) from exc
