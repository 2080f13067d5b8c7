"""The Redis store: :class:`RedisStore` and its statistics.

Owns: how appends, reads, heads, events and the stream lifecycle become script
calls on a coredis client (standalone or Cluster), the group commit across streams
(:mod:`chatbus._coalesce`), the re-run that resolves a lost reply, and the durable
mode's second phase. Imports this package's :mod:`._lua`; never the listener.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, final

import attrs
import coredis
import coredis.exceptions
import trio

from .._coalesce import Batch, GroupCommit, PendingAppend, settle
from .._codec import BadBody, decode_bodies, pack_bodies
from .._event import Event, decode_event_items, encode_events, from_micros, to_micros
from .._exceptions import BusError, OutcomeUnknown, StoreError, store_error
from .._message import Draft, Message, StreamInfo, check_after, check_stream
from .._options import EventRetention
from .._retention import RetentionPage
from .._tasks import Backoff
from ._lua import (
    APPEND,
    DELETE,
    EXAMINE,
    INFO,
    JOINER_EVENTS,
    LIFECYCLE_BATCH,
    PUBLISH,
    READ,
    REDACT,
    RETAIN_EVENTS,
    SCAN_STREAMS,
    TOKENS_KEPT,
    TRIM_BATCH,
    TRIM_FIRST,
    TRIM_KEYS,
    Script,
    StreamKeys,
)
from ._resp import hash_slot

#: Exceptions that mean "the server or the connection failed" rather than a bug.
REDIS_ERRORS: Final = (coredis.exceptions.RedisError, TimeoutError, OSError)
#: What a lost reply looks like: the command may or may not have run.
_LOST: Final = (coredis.exceptions.ConnectionError, TimeoutError, OSError)
#: Failures after which a Cluster's slot layout may be stale: a primary that died or
#: lost its slots (a connection refused or lost, a timeout, MOVED past coredis's own
#: redirects, CLUSTERDOWN, TRYAGAIN).
_LAYOUT_SUSPECT: Final = (
    coredis.exceptions.ConnectionError,
    coredis.exceptions.RedisClusterError,
    TimeoutError,
    OSError,
)
#: Default limit on append round trips running at once (see open_redis).
DEFAULT_MAX_IN_FLIGHT: Final = 3
#: Most seconds spent re-running a batch whose reply was lost to learn its outcome
#: (at most ``command_timeout`` too): what a publish may take past ``command_timeout``.
RESOLVE_LIMIT: Final = 2.0
#: The bounds of a stream's retained events when the flush names none.
_DEFAULT_RETENTION: Final = EventRetention()

Client = coredis.Redis[bytes] | coredis.RedisCluster[bytes]

logger = logging.getLogger("chatbus.redis")


@attrs.frozen(kw_only=True)
class RedisStoreStatistics:
    """A snapshot of a :class:`RedisStore`'s append coalescing.

    Attributes:
        appends: :meth:`~RedisStore.append` calls that reached the queue.
        round_trips: Append round trips sent (one script call, on a Cluster one per
            hash slot).
        merged_round_trips: Round trips that carried more than one append.
        largest_round_trip: The most appends one round trip carried.
        in_flight: Round trips running now.
        pending: Appends waiting for a round trip now.
        reruns: Batches run again after a lost reply (each answered by its token).
    """

    appends: int
    round_trips: int
    merged_round_trips: int
    largest_round_trip: int
    in_flight: int
    pending: int
    reruns: int


def _abandoned() -> OutcomeUnknown:
    return OutcomeUnknown(
        "the round trip carrying this append was abandoned or ran out of time;"
        " it may or may not have been committed. Retry with the same key to find out."
    )


def _no_limit(value: int | None) -> int:
    """A script argument for an optional limit: -1 for none."""
    return -1 if value is None else value


@functools.cache
def _slot_tag(slot: int) -> str:
    """A short hash tag whose key lands in ``slot`` (routes a script to its server)."""
    return next(str(n) for n in itertools.count() if hash_slot(str(n).encode()) == slot)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _stream_of(key: bytes, prefix: str) -> str | None:
    """The stream whose meta key is ``key`` (None for a key that is not one)."""
    text = key.decode("utf-8", "replace")
    head, tail = f"{prefix}:{{", "}:m"
    if not (text.startswith(head) and text.endswith(tail)):
        return None
    try:
        return bytes.fromhex(text[len(head) : -len(tail)]).decode("utf-8")
    except ValueError:
        return None


def _not_sent(exc: BaseException) -> bool:
    """Whether a client error happened before the command could reach the server."""
    text = str(exc)
    return isinstance(exc, coredis.exceptions.ConnectionError) and (
        "Unable to establish" in text or "not usable" in text
    )


@final
@attrs.define(eq=False)
class LayoutRefresh:
    """Re-reads a Cluster's slot layout when a failure says it may have changed.

    coredis re-reads it only after errors it reports itself, and a connection that
    cannot be opened to a dead primary is not one of them (nor is anything its retry
    hook would report: chatbus runs it without retries). Left alone, every command
    for the dead primary's slots keeps failing after its replica has taken over.
    Here a failure asks (:meth:`request`), and :meth:`run` re-reads the layout from
    the nodes (``ClusterLayout.initialize``), at once when all was calm, then at
    most once per pause while failures keep coming (doubling up to ``cap``): a
    promotion is seen within about ``cap`` of happening, and a cluster in trouble
    is not flooded with ``CLUSTER SLOTS``.
    """

    _client: coredis.RedisCluster[bytes]
    #: Most seconds one re-read may take (the nodes are asked one after another).
    timeout: float
    first: float = 0.05
    cap: float = 1.0
    _wanted: trio.Event = attrs.field(factory=trio.Event, init=False)

    def request(self) -> None:
        """Ask for a re-read (no I/O here; :meth:`run` does it)."""
        self._wanted.set()

    async def run(self) -> None:
        """Re-read the layout whenever asked, paced; until cancelled."""
        backoff = Backoff(self.first, self.cap)
        while True:
            if not self._wanted.is_set():
                backoff.reset()  # calm since the last pause: answer the next at once
                await self._wanted.wait()
            self._wanted = trio.Event()
            with trio.move_on_after(self.timeout):
                try:
                    await self._client.connection_pool.cluster_layout.initialize()
                except REDIS_ERRORS as exc:
                    # The next failure asks again; the caller has its own error.
                    logger.debug("re-reading the Redis Cluster layout failed: %r", exc)
            await backoff.sleep()


@final
@attrs.define(eq=False)
class RedisStore:
    """A :class:`~chatbus.Store` in Redis (standalone or Cluster). Made by :func:`open_redis`.

    Safe to use from many trio tasks and many processes at once. Every server or
    connection error is raised as :class:`~chatbus.StoreError` with the coredis
    error as ``__cause__``; a failed append stores nothing, except where it raises
    :class:`~chatbus.OutcomeUnknown`.
    """

    _client: Client
    _prefix: str
    #: "fast" or "durable" (see open_redis).
    _durability: str = "fast"
    _wait_replicas: int = 1
    _wait_timeout: float = 1.0
    _max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    _shield_timeout: float = 65.0
    #: A reply's limit (the client's ``stream_timeout``); bounds a lost reply's re-runs.
    _command_timeout: float = 10.0
    #: Told at once when an append started a new epoch (the notifier's listeners).
    _reset: Callable[[str], None] | None = None
    #: A Cluster: one script call per hash slot.
    _cluster: bool = False
    #: A Cluster: asked to re-read the slot layout after a failure that may mean it moved.
    _layout: LayoutRefresh | None = None
    _closed: bool = attrs.field(default=False, init=False)
    _group: GroupCommit = attrs.field(init=False)
    _reruns: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._group = GroupCommit(
            send=self._send_batch,
            failures=(*REDIS_ERRORS, BusError),
            abandoned=_abandoned,
            max_in_flight=self._max_in_flight,
            shield_timeout=self._shield_timeout,
        )

    @property
    def prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._prefix

    @property
    def durability(self) -> str:
        """``"fast"`` or ``"durable"``: what a successful append waited for."""
        return self._durability

    @property
    def client(self) -> Client:
        """The coredis client (for monitoring and tests; do not write under the prefix)."""
        return self._client

    def keys(self, stream: str) -> StreamKeys:
        """The keys and channel of ``stream``."""
        return StreamKeys.of(self._prefix, stream)

    def close(self) -> None:
        """Refuse further operations (those running finish); the opener closes the client."""
        self._closed = True

    def statistics(self) -> RedisStoreStatistics:
        """Return a snapshot of the append coalescing counters."""
        group = self._group
        return RedisStoreStatistics(
            appends=group.appends,
            round_trips=group.batches,
            merged_round_trips=group.merged_batches,
            largest_round_trip=group.largest_batch,
            in_flight=group.in_flight,
            pending=len(group.pending),
            reruns=self._reruns,
        )

    # ---- the Store protocol ----

    async def append(self, stream: str, drafts: Sequence[Draft]) -> list[Message]:
        """Append ``drafts`` to ``stream`` in one script call; see :meth:`chatbus.Store.append`.

        Appends that wait while ``max_in_flight`` round trips run are merged into the
        next one (one script call for all of them; on a Cluster one per hash slot,
        sent at once). A repeated key returns the
        original message with ``replay=True``.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the append failed; nothing of the batch was stored.
            OutcomeUnknown: the reply was lost and re-running the batch (which its
                token makes harmless) could not tell whether it was stored.
        """
        check_stream(stream)
        if not drafts:
            await trio.lowlevel.checkpoint()
            return []
        drafts = list(drafts)
        await self._check_open("append")
        try:
            packed, bodies = pack_bodies(drafts)
        except BadBody as exc:
            await trio.lowlevel.checkpoint()
            cause = coredis.exceptions.DataError(str(exc))
            raise store_error("append", cause, stream=stream) from cause
        keyed = any(draft.key is not None for draft in drafts)
        entry = PendingAppend(
            stream, len(drafts), len(packed), Batch(drafts, packed, bodies, keyed)
        )
        await self._group.submit(entry)
        if entry.cause is not None:
            if isinstance(entry.cause, BusError):
                raise entry.cause
            raise store_error("append", entry.cause, stream=stream) from entry.cause
        messages: list[Message] = entry.result
        return messages

    async def read(self, stream: str, after: int, limit: int) -> list[Message]:
        """Return up to ``limit`` messages after ``after``; see :meth:`chatbus.Store.read`.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the script failed.
        """
        check_stream(stream)
        check_after(after)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, got {limit!r}")
        if limit == 0:
            await trio.lowlevel.checkpoint()
            return []
        keys = self.keys(stream)
        flat = await self._call(
            "read", READ, [keys.meta, keys.entries, keys.redactions], [after, limit], stream
        )
        rows = [flat[i : i + 5] for i in range(0, len(flat), 5)]
        try:
            bodies = decode_bodies([row[3].decode("utf-8") for row in rows])
        except (ValueError, RecursionError) as exc:
            raise store_error("read", exc, stream=stream) from exc
        return [
            Message(
                stream=stream,
                id=int(id_),
                body=None if redacted else body,
                key=key.decode("utf-8") or None,
                created_at=from_micros(int(micros)),
                redacted=bool(redacted),
            )
            for (id_, key, micros, _, redacted), body in zip(rows, bodies, strict=True)
        ]

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        """Return each stream's highest visible id; see :meth:`chatbus.Store.heads`.

        One pipeline (on a Cluster, one per server holding some of the streams).

        Raises:
            InvalidStream: one of ``streams`` is not a valid stream name.
            StoreError: the commands failed.
        """
        wanted = list(dict.fromkeys(check_stream(stream) for stream in streams))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return {}
        await self._check_open("heads")
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                requests = [pipe.hget(self.keys(stream).meta, "vis") for stream in wanted]
            values = [await request for request in requests]
        except REDIS_ERRORS as exc:
            if isinstance(exc, _LAYOUT_SUSPECT):
                self._suspect_layout()
            raise store_error("heads", exc) from exc
        return {stream: int(value or 0) for stream, value in zip(wanted, values, strict=True)}

    # ---- events ----

    async def retain_events(
        self,
        events: Sequence[Event],
        encoded: Sequence[str],
        *,
        retention: EventRetention | None = None,
    ) -> None:
        """Keep ``events`` for joiners and publish them live, one script call per stream
        (concurrently); see :meth:`chatbus.EventStore.retain_events`.

        Raises:
            StoreError: a script call failed.
        """
        bounds = retention or _DEFAULT_RETENTION
        by_stream: dict[str, list[tuple[Event, str]]] = {}
        for event, text in zip(events, encoded, strict=True):
            by_stream.setdefault(event.stream, []).append((event, text))
        await self._each(by_stream.items(), functools.partial(self._retain_stream_events, bounds))

    async def _retain_stream_events(
        self, bounds: EventRetention, item: tuple[str, list[tuple[Event, str]]]
    ) -> None:
        stream, pairs = item
        keys = self.keys(stream)
        args: list[str | int] = [keys.channel, len(pairs), bounds.max_events, bounds.max_bytes]
        for event, text in pairs:
            created = to_micros(event.created_at)
            expires = 0
            if event.ttl is not None:  # keyed or not: a joiner never gets it after
                expires = created + round(event.ttl * 1_000_000)
            slot = (
                f"k:{event.key}"
                if event.key is not None
                else f"u:{event.emitter}:{event.seq:020d}"
            )
            args += [slot, event.after, created, expires, text]
        args += encode_events(text for _, text in pairs)
        await self._call("retain events", RETAIN_EVENTS, [keys.events, keys.event_order], args)

    async def retained_events(self, stream: str, head: int) -> list[Event]:
        """What a joiner at ``head`` gets; see :meth:`chatbus.EventStore.retained_events`.

        Raises:
            StoreError: the script failed.
        """
        check_stream(stream)
        keys = self.keys(stream)
        now = to_micros(datetime.datetime.now(datetime.UTC))
        found = await self._call(
            "retained events", JOINER_EVENTS, [keys.events, keys.event_order], [head, now], stream
        )
        if not found:
            return []
        try:
            items = json.loads("[" + b",".join(found).decode("utf-8") + "]")
        except (ValueError, RecursionError):
            return []
        return decode_event_items(items)

    # ---- the lifecycle ----

    async def stream_info(self, stream: str) -> StreamInfo:
        """Where ``stream`` stands; see :meth:`chatbus.Bus.stream_info`.

        Raises:
            StoreError: the script failed.
        """
        check_stream(stream)
        head, first_id, epoch, reset = await self._call(
            "stream info", INFO, [self.keys(stream).meta], [], stream
        )
        if not epoch:
            return StreamInfo(stream=stream, head=0, first_id=1, epoch=0, exists=False)
        return StreamInfo(
            stream=stream,
            head=int(head),
            first_id=int(first_id),
            epoch=int(epoch),
            exists=True,
            reset_by_store=bool(reset),
        )

    async def trim(
        self,
        stream: str,
        before: int,
        *,
        keys_for: float | None = None,
        epoch: int | None = None,
    ) -> int:
        """Drop the messages of ``stream`` below ``before``, in bounded batches; see
        :meth:`chatbus._protocols.LifecycleStore.trim`.

        The first retained id moves first (readers stop at it at once, listeners are
        told); then the entries go, :data:`LIFECYCLE_BATCH` per script call. An entry
        with an idempotency key leaves its body in the key's record (a retried
        publish returns the original message) until it is ``keys_for`` seconds old
        by the server's clock (None: as long as the stream exists). With ``epoch``,
        nothing changes unless the stream is at that epoch.

        Returns:
            The stream's first retained id now.

        Raises:
            StoreError: a script call failed (the first id may have moved already).
        """
        check_stream(stream)
        keys = self.keys(stream)
        wanted = "" if epoch is None else epoch
        first, go = (
            int(value)
            for value in await self._call(
                "trim", TRIM_FIRST, [keys.meta], [before, keys.channel, stream, wanted], stream
            )
        )
        if first == 0:
            return 1
        if not go:
            return first  # another history than the caller examined
        while True:
            removed = await self._call(
                "trim",
                TRIM_BATCH,
                [keys.entries, keys.keys, keys.trimmed],
                [first, LIFECYCLE_BATCH],
                stream,
            )
            if int(removed) < LIFECYCLE_BATCH:
                break
        if keys_for is not None:
            window = round(keys_for * 1_000_000)
            while True:
                examined = await self._call(
                    "trim",
                    TRIM_KEYS,
                    [keys.keys, keys.trimmed],
                    [window, LIFECYCLE_BATCH, first],
                    stream,
                )
                if int(examined) < LIFECYCLE_BATCH:
                    break
        return first

    async def over_retention(
        self,
        after: str,
        limit: int,
        *,
        max_messages: int | None,
        max_age: float | None,
        keys_for: float | None,
    ) -> RetentionPage:
        """Which streams hold messages beyond a retention policy, by the server's clock;
        see :meth:`chatbus._protocols.LifecycleStore.over_retention`.

        Redis keeps no list of streams, and on a Cluster no key could hold one (a
        stream's keys live in its own slot, and the append script can write no other):
        the streams are found with ``SCAN`` of ``<prefix>:{*}:m`` (one server at a time
        on a Cluster, in the order of its first slot), ``2 * limit`` keys walked per
        call (every stream has at least two keys, so at most about ``limit`` streams),
        each found stream examined by one script call (the age rule walks at most
        :data:`LIFECYCLE_BATCH` entries; a stream with more is examined again:
        ``next_after`` is then ``after``). ``after`` is the position of the scan,
        ``"<first slot of the server>:<cursor>"`` ("" to start). A stream that exists
        for the whole sweep is found at least once (``SCAN``'s guarantee); a slot
        moved during a sweep may be missed by it, and found by the next.

        Raises:
            StoreError: a script call failed.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        await self._check_open("retention")
        servers = await self._servers()
        slot, cursor = 0, 0
        if after:
            slot_text, _, cursor_text = after.partition(":")
            slot, cursor = int(slot_text), int(cursor_text)
        server = next((first for first in servers if first >= slot), -1)
        if server < 0:
            return RetentionPage(trims=[], next_after=None)
        if server != slot:  # the layout changed since: that cursor means nothing here
            slot, cursor = server, 0
        route = f"{self._prefix}:{{{_slot_tag(slot)}}}:scan"
        pattern = _glob_escape(self._prefix) + ":{*}:m"
        next_cursor, found = await self._call(
            "retention", SCAN_STREAMS, [route], [cursor, pattern, 2 * limit]
        )
        names = [_stream_of(key, self._prefix) for key in found]
        streams = list(dict.fromkeys(name for name in names if name is not None))
        policy = [
            _no_limit(max_messages),
            _no_limit(None if max_age is None else round(max_age * 1_000_000)),
            _no_limit(None if keys_for is None else round(keys_for * 1_000_000)),
            LIFECYCLE_BATCH,
        ]
        results: dict[str, list[Any]] = {}

        async def examine(stream: str) -> None:
            keys = self.keys(stream)
            script_keys = [keys.meta, keys.entries, keys.redactions, keys.trimmed]
            results[stream] = await self._call("retention", EXAMINE, script_keys, policy, stream)

        await self._each(streams, examine)
        trims: list[tuple[str, int, int]] = []
        again = False
        for stream in streams:
            epoch, before, more, stale, first = results[stream]
            if not epoch:
                continue  # deleted since the scan
            if int(before) > int(first) or int(stale):
                trims.append((stream, int(before), int(epoch)))
            again = again or bool(int(more))
        if again:
            return RetentionPage(trims=trims, next_after=after)
        if int(next_cursor) != 0:
            return RetentionPage(trims=trims, next_after=f"{slot}:{int(next_cursor)}")
        later = [first for first in servers if first > slot]
        return RetentionPage(trims=trims, next_after=f"{later[0]}:0" if later else None)

    async def _servers(self) -> list[int]:
        """The first slot of each server holding slots (one server: ``[0]``), sorted."""
        if not self._cluster:
            await trio.lowlevel.checkpoint()
            return [0]
        try:
            shards: list[Any] = await self._client.cluster_shards()
        except REDIS_ERRORS as exc:
            raise store_error("retention", exc) from exc
        # One shard per master: its slot ranges as [start, end, start, end, ...].
        ranges = [shard.get(b"slots") or shard.get("slots") or [] for shard in shards]
        return sorted(min(int(low) for low in slots[::2]) for slots in ranges if slots)

    async def delete_stream(self, stream: str) -> None:
        """Delete ``stream``: every key of it, in one script call (``UNLINK``: freed off
        the server's main thread); see :meth:`chatbus.Bus.delete_stream`.

        Raises:
            StoreError: the script failed.
        """
        check_stream(stream)
        keys = self.keys(stream)
        await self._call("delete", DELETE, keys.all, [keys.channel, stream], stream)

    async def redact(self, stream: str, id: int) -> Message | None:
        """Replace message ``id``'s body by a tombstone; see :meth:`chatbus.Bus.redact`.

        Returns:
            The tombstone, or None if ``id`` is not a retained message.

        Raises:
            StoreError: the script failed.
        """
        check_stream(stream)
        keys = self.keys(stream)
        found = await self._call(
            "redact",
            REDACT,
            [keys.meta, keys.entries, keys.keys, keys.redactions],
            [id, keys.channel, stream],
            stream,
        )
        if found is None:
            return None
        key, micros = found
        return Message(
            stream=stream,
            id=id,
            body=None,
            key=key.decode("utf-8") or None,
            created_at=from_micros(int(micros)),
            redacted=True,
        )

    # ---- appends ----

    async def _send_batch(self, batch: list[PendingAppend]) -> None:
        """One script call for ``batch`` (on a Cluster, one per hash slot, sent at
        once); each stream's callers get that stream's outcome."""
        groups: dict[str, list[PendingAppend]] = {}
        for member in batch:
            groups.setdefault(member.stream, []).append(member)
        calls: dict[int, list[tuple[str, list[PendingAppend]]]] = {}
        for stream, members in groups.items():
            slot = hash_slot(self.keys(stream).meta.encode()) if self._cluster else 0
            calls.setdefault(slot, []).append((stream, members))
        await self._each(calls.values(), self._append_call)

    async def _append_call(self, streams: list[tuple[str, list[PendingAppend]]]) -> None:
        """One APPEND script call for ``streams`` (all in one slot on a Cluster)."""
        try:
            await self._append_streams(streams)
        except Exception as exc:
            if not isinstance(exc, (*REDIS_ERRORS, BusError)):
                raise
            for _, members in streams:
                for member in members:
                    if member.result is None and member.cause is None:
                        member.cause = exc

    async def _append_streams(self, streams: list[tuple[str, list[PendingAppend]]]) -> None:
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
            args += [secrets.token_hex(12), keys.channel, stream, random.getrandbits(52) + 1]
            args.append(len(drafts))
            args += [draft.key or "" for draft in drafts]
            args += [draft.body_json for draft in drafts]
        reply = await self._run_append(script_keys, args, streams, durable=durable)
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
                " is gone: it may or may not have been stored. Retry with the same key."
            )
        found = self._found(stream, drafts, flat)
        created_at = from_micros(int(micros))
        keyed = any(member.payload.keyed for member in members)
        settle(stream, members, last_id, created_at, found if keyed else None)
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
        """
        names = ", ".join(repr(stream) for stream, _ in streams)
        sent_at = trio.current_time()
        try:
            reply: list[Any] = await self._script(APPEND, keys, args, durable=durable)
            return reply
        except coredis.exceptions.ReplicationError as exc:
            raise self._unreplicated(names, exc) from exc
        except _LOST as exc:
            if _not_sent(exc):
                raise
            lost: BaseException = exc
        # It may have run. One budget for all the re-runs: a server that did not answer
        # the first run seldom answers the next, and each would wait a command_timeout.
        budget = min(self._command_timeout, RESOLVE_LIMIT)
        last: BaseException | None = None
        pause = Backoff(0.05, 0.4)
        with trio.move_on_after(budget):
            while True:
                await pause.sleep()
                self._reruns += 1
                # The window: a record made since the first send must not have been dropped.
                args[1] = round((trio.current_time() - sent_at + 1.0) * 1_000_000)
                try:
                    again: list[Any] = await self._script(APPEND, keys, args, durable=durable)
                    return again
                except coredis.exceptions.ReplicationError as exc:
                    raise self._unreplicated(names, exc) from exc
                except (*_LOST, *_LAYOUT_SUSPECT) as exc:
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

    # ---- script calls ----

    async def _call(
        self,
        operation: str,
        script: Script,
        keys: list[str],
        args: Sequence[str | int],
        stream: str | None = None,
    ) -> Any:
        """:meth:`_script`, with failures raised as :class:`~chatbus.StoreError`."""
        await self._check_open(operation)
        try:
            return await self._script(script, keys, args)
        except REDIS_ERRORS as exc:
            raise store_error(operation, exc, stream=stream) from exc

    async def _script(
        self, script: Script, keys: list[str], args: Sequence[str | int], *, durable: bool = False
    ) -> Any:
        """EVALSHA ``script``; on NOSCRIPT load it (on a Cluster: on every primary) and run
        it again (NOSCRIPT means it did not run). ``durable``: WAIT for the replicas on
        the same connection first (it covers every write before it on that server)."""
        client = self._client
        for attempt in range(2):
            try:
                if durable:
                    # WAIT runs on the connection of the command before it.
                    with client.ensure_replication(
                        self._wait_replicas, round(self._wait_timeout * 1000)
                    ):
                        return await client.evalsha(script.sha, keys, list(args))
                return await client.evalsha(script.sha, keys, list(args))
            except coredis.exceptions.NoScriptError:
                if attempt:
                    raise
                await client.script_load(script.text)
            except _LAYOUT_SUSPECT:
                self._suspect_layout()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _suspect_layout(self) -> None:
        """A Cluster command failed in a way a moved slot explains: re-read the layout."""
        if self._layout is not None:
            self._layout.request()

    async def _each(self, items: Any, run: Callable[[Any], Awaitable[None]]) -> None:
        """Run ``run(item)`` for every item, concurrently when there are several."""
        items = list(items)
        if len(items) == 1:
            await run(items[0])
            return
        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(run, item)

    async def _check_open(self, operation: str) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise StoreError(f"{operation} failed: the Redis store is closed")
