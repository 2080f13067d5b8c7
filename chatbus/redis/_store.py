"""The Redis store: :class:`RedisStore` and its statistics.

Owns: how reads, heads and events become script calls on a coredis client
(standalone or Cluster), the script runner (NOSCRIPT, durable WAIT, layout hints),
and the Cluster layout refresh. Appends are :mod:`._append`'s (group commit per
server, re-run, durable second phase); the stream lifecycle (info, trim, retention,
delete, redact) is :mod:`._lifecycle`'s, which the store hands its script call.
Imports this package's :mod:`._lua`, :mod:`._append` and :mod:`._lifecycle`; never
the listener.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final, final

import attrs
import coredis
import coredis.exceptions
import trio

from .._coalesce import Batch, PendingAppend
from .._codec import BadBody, decode_bodies, pack_bodies
from .._event import Event, decode_event_items, encode_events, from_micros, to_micros
from .._exceptions import BusError, StoreError, store_error
from .._message import Appended, Draft, Message, StreamInfo, check_read, check_stream
from .._options import EventRetention
from .._retention import RetentionPage
from .._tasks import Backoff
from . import _lifecycle
from ._append import DEFAULT_MAX_IN_FLIGHT as DEFAULT_MAX_IN_FLIGHT
from ._append import LAYOUT_SUSPECT, Appender, each
from ._append import REDIS_ERRORS as REDIS_ERRORS
from ._append import Client as Client
from ._append import default_max_in_flight as default_max_in_flight
from ._lane import Lane, Lanes, Unsupported
from ._lua import APPEND, APPEND_SLOTS, JOINER_EVENTS, READ, RETAIN_EVENTS, Script, StreamKeys
from ._resp import hash_slot

#: The bounds of a stream's retained events when the flush names none.
_DEFAULT_RETENTION: Final = EventRetention()

logger = logging.getLogger("chatbus.redis")

#: The scripts run over the pipelined connections (the hot paths).
_PIPELINED: Final = (APPEND, APPEND_SLOTS, READ)


def _lanes_of(client: Client, command_timeout: float) -> Lanes | None:
    """Pipelined connections with ``client``'s credentials (None over TLS: coredis only)."""
    kwargs: dict[str, Any] = dict(client.connection_pool.connection_kwargs)
    if kwargs.get("ssl_context") is not None or kwargs.get("credential_provider") is not None:
        return None
    return Lanes(
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        db=int(kwargs.get("db") or 0),
        client_name=str(kwargs.get("client_name") or "chatbus"),
        connect_timeout=float(kwargs.get("connect_timeout") or command_timeout),
        command_timeout=command_timeout,
    )


@attrs.frozen(kw_only=True)
class RedisStoreStatistics:
    """A snapshot of a :class:`RedisStore`'s append coalescing.

    Attributes:
        appends: :meth:`~RedisStore.append` calls that reached the queue.
        round_trips: Append round trips sent (one script call, on a Cluster one per
            hash slot), over all servers (each has its own group commit).
        merged_round_trips: Round trips that carried more than one append.
        largest_round_trip: The most appends one round trip carried.
        in_flight: Round trips running now (at most ``max_in_flight`` per server).
        pending: Appends waiting for a round trip now.
        reruns: Batches run again after a lost reply (each answered by its token).
        pipelined_calls: Script calls (appends and reads) made on the store's own
            pipelined connections rather than through coredis.
        pipelined_writes: Socket writes those took (fewer when calls were made at
            the same time: they share one write).
    """

    appends: int
    round_trips: int
    merged_round_trips: int
    largest_round_trip: int
    in_flight: int
    pending: int
    reruns: int
    pipelined_calls: int = 0
    pipelined_writes: int = 0


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
    #: A Cluster: one script call per primary or per hash slot (see :mod:`._append`).
    _cluster: bool = False
    #: A Cluster: asked to re-read the slot layout after a failure that may mean it moved.
    _layout: LayoutRefresh | None = None
    #: Run APPEND and READ over a pipelined connection per server (see :mod:`._lane`).
    _pipelined: bool = True
    _closed: bool = attrs.field(default=False, init=False)
    _appender: Appender = attrs.field(init=False)
    _lanes: Lanes | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._lanes = _lanes_of(self._client, self._command_timeout) if self._pipelined else None
        self._appender = Appender(
            self._client,
            self._prefix,
            self._script,
            durability=self._durability,
            wait_replicas=self._wait_replicas,
            max_in_flight=self._max_in_flight,
            shield_timeout=self._shield_timeout,
            command_timeout=self._command_timeout,
            reset=self._reset,
            cluster=self._cluster,
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
        if self._lanes is not None:
            self._lanes.close()

    def statistics(self) -> RedisStoreStatistics:
        """Return a snapshot of the append coalescing counters."""
        groups = list(self._appender.groups.values())
        lanes = list(self._lanes or ())
        return RedisStoreStatistics(
            appends=sum(group.appends for group in groups),
            round_trips=sum(group.batches for group in groups),
            merged_round_trips=sum(group.merged_batches for group in groups),
            largest_round_trip=max((group.largest_batch for group in groups), default=0),
            in_flight=sum(group.in_flight for group in groups),
            pending=sum(len(group.pending) for group in groups),
            reruns=self._appender.reruns,
            pipelined_calls=sum(lane.calls for lane in lanes),
            pipelined_writes=sum(lane.writes for lane in lanes),
        )

    # ---- the Store protocol ----

    async def append(self, stream: str, drafts: Sequence[Draft]) -> list[Message]:
        """Append ``drafts`` to ``stream`` in one script call; see :meth:`chatbus.Store.append`.

        Appends that wait while ``max_in_flight`` round trips run (per server) are merged into the
        next one (one script call for all of them; on a Cluster one per primary in
        fast mode, else one per hash slot, sent at once). A repeated key returns the
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
        await self._appender.submit(entry)
        if entry.cause is not None:
            if isinstance(entry.cause, BusError):
                raise entry.cause
            raise store_error("append", entry.cause, stream=stream) from entry.cause
        return Appended(entry.result, entry.epoch)

    async def read(self, stream: str, after: int, limit: int) -> list[Message]:
        """Return up to ``limit`` messages after ``after``; see :meth:`chatbus.Store.read`.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the script failed.
        """
        return (await self.read_with_epoch(stream, after, limit))[1]

    async def read_with_epoch(
        self, stream: str, after: int, limit: int
    ) -> tuple[int, list[Message]]:
        """:meth:`read`, with the epoch the stream was in when read (0: it did not exist).

        A subscription reads this way: a page read after a restart or failover of the
        server (a new epoch, its notice not arrived yet), or of a stream deleted and
        created again, is never taken as the rest of the history it follows. See
        :class:`chatbus._protocols.EpochReader`.

        Raises:
            InvalidStream: ``stream`` is not a valid stream name.
            StoreError: the script failed.
        """
        check_read(stream, after, limit)
        keys = self.keys(stream)
        flat = await self._call(
            "read", READ, [keys.meta, keys.entries, keys.redactions], [after, limit], stream
        )
        epoch = int(flat[0])
        rows = [flat[i : i + 5] for i in range(1, len(flat), 5)]
        try:
            bodies = decode_bodies([row[3].decode("utf-8") for row in rows])
        except (ValueError, RecursionError) as exc:
            raise store_error("read", exc, stream=stream) from exc
        return epoch, [
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
            if isinstance(exc, LAYOUT_SUSPECT):
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
        await each(by_stream.items(), functools.partial(self._retain_stream_events, bounds))

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
        return await _lifecycle.stream_info(self._call, self._prefix, stream)

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
        return await _lifecycle.trim(
            self._call, self._prefix, stream, before, keys_for=keys_for, epoch=epoch
        )

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
        servers = await _lifecycle.servers(self._client, self._cluster)
        return await _lifecycle.over_retention(
            self._call,
            self._prefix,
            servers,
            after,
            limit,
            max_messages=max_messages,
            max_age=max_age,
            keys_for=keys_for,
        )

    async def delete_stream(self, stream: str) -> None:
        """Delete ``stream``: every key of it, in one script call (``UNLINK``: freed off
        the server's main thread); see :meth:`chatbus.Bus.delete_stream`.

        Raises:
            StoreError: the script failed.
        """
        await _lifecycle.delete_stream(self._call, self._prefix, stream)

    async def redact(self, stream: str, id: int) -> Message | None:
        """Replace message ``id``'s body by a tombstone; see :meth:`chatbus.Bus.redact`.

        Returns:
            The tombstone, or None if ``id`` is not a retained message.

        Raises:
            StoreError: the script failed.
        """
        return await _lifecycle.redact(self._call, self._prefix, stream, id)

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
        the same connection first (it covers every write before it on that server).

        APPEND and READ go over the server's pipelined connection (:mod:`._lane`):
        calls made meanwhile share one write. A redirect there (the script did not
        run) sends the call through coredis, which follows it; except APPEND_SLOTS,
        which goes over a lane only (never with ASKING: see :mod:`._lua`), and whose
        redirect, or a missing lane, raises :class:`~._lane.Unsupported`."""
        client = self._client
        lane = self._lane_for(script, keys, durable)
        if lane is None and script is APPEND_SLOTS:
            raise Unsupported("APPEND_SLOTS runs over a pipelined connection only")
        for attempt in range(2):
            try:
                if lane is not None:
                    try:
                        return await lane.call(["EVALSHA", script.sha, len(keys), *keys, *args])
                    except Unsupported:
                        # A redirect (or a server in transition): coredis follows it.
                        self._suspect_layout()
                        if script is APPEND_SLOTS:
                            raise
                        lane = None
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
            except LAYOUT_SUSPECT:
                self._suspect_layout()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _lane_for(self, script: Script, keys: list[str], durable: bool) -> Lane | None:
        """The pipelined connection for this call, or None to use coredis: the hot
        scripts only (APPEND, READ), not in durable mode (WAIT runs on coredis's
        connection), on a Cluster to the primary the layout names for the slot."""
        if self._lanes is None or durable or script not in _PIPELINED or not keys:
            return None
        if not self._cluster:
            location: Any = getattr(self._client.connection_pool, "location", None)
            if not isinstance(getattr(location, "port", None), int):
                return None  # not TCP (a Unix socket): coredis
            return self._lanes.to((location.host, location.port))
        client: Any = self._client
        try:
            node = client.connection_pool.cluster_layout.node_for_slot(hash_slot(keys[0].encode()))
        except (*REDIS_ERRORS, LookupError, AttributeError):
            return None  # no layout for it now: coredis says why
        return self._lanes.to((node.host, node.port))

    def _suspect_layout(self) -> None:
        """A Cluster command failed in a way a moved slot explains: re-read the layout."""
        if self._layout is not None:
            self._layout.request()

    async def _check_open(self, operation: str) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise StoreError(f"{operation} failed: the Redis store is closed")
