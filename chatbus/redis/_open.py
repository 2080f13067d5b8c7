"""Opening the Redis backend: :func:`open_redis`, its options, ``open_backend`` and
:func:`drop_prefix`.

Owns: option validation and defaults (one record, :class:`_Settings`), reading the
two URL forms (``redis://host:port/db``, ``redis+cluster://host:port,host:port``),
making the coredis client, and the order of opening and closing client, store and
notifier. Imports every other module of this package; nothing imports it but
:mod:`chatbus.redis`.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, final

import attrs
import coredis
import coredis.exceptions
import coredis.pool
import trio
from coredis.connection import TCPLocation
from coredis.retry import NoRetryPolicy

from .._exceptions import StoreError, store_error
from .._options import check_identifier, check_int_range, check_range, redacted_url
from .._tasks import unwrapped_groups
from ._listen import RedisNotifier
from ._session import Server
from ._store import (
    REDIS_ERRORS,
    Client,
    LayoutRefresh,
    RedisStore,
    default_max_in_flight,
)

logger = logging.getLogger("chatbus.redis")


# coredis 6.9's pools hold one token per allowed connection, and ``release`` gives a
# connection's token back only if the connection is still usable: each connection
# that dies while lent out (killed by the server, reset) loses its token for good,
# and once a node's few are gone every later command there waits for a connection
# forever (a durable-mode Cluster, whose commands all go through coredis, stopped
# for good after a few seconds of CLIENT KILL). These pools give the token back, as
# an empty place: the next command makes a new connection.


def _give_back_place(pool: Any, connection: Any, places: Any) -> None:
    """``release`` of a connection that is no longer usable: its place, empty."""
    pool.statistics.connection_released(connection)
    with contextlib.suppress(Exception):  # (QueueFull: nothing was lost)
        places.put_nowait(None)


class _Pool(coredis.pool.ConnectionPool):  # type: ignore[type-arg]
    def release(self, connection: Any) -> None:
        if connection.usable:
            super().release(connection)
        else:
            _give_back_place(self, connection, self._available_connections)


class _ClusterPool(coredis.pool.ClusterConnectionPool):
    def release(self, connection: Any) -> None:
        if connection.usable:
            super().release(connection)
        else:
            _give_back_place(self, connection, self._node_pool(connection.location))


#: ``CLIENT SETNAME`` of the store's connections.
CLIENT_NAME: Final = "chatbus"
#: The durability modes (see open_redis).
DURABILITY: Final = ("fast", "durable")


@final
@attrs.frozen(kw_only=True)
class _Settings:
    """Everything :func:`open_redis` was asked for, validated."""

    server: Server
    prefix: str = "chatbus"
    durability: str = "fast"
    wait_replicas: int = 1
    wait_timeout: float = 1.0
    max_connections: int = 16
    #: None: :func:`default_max_in_flight` (1 per server; 3 per durable Cluster primary).
    max_in_flight: int | None = None
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    max_backoff: float = 5.0

    def __attrs_post_init__(self) -> None:
        check_identifier("prefix", self.prefix, max_bytes=200)
        if "{" in self.prefix or "}" in self.prefix:
            # The stream's hash tag must be the key's first {…}.
            raise ValueError(f"prefix must not contain braces, got {self.prefix!r}")
        if self.durability not in DURABILITY:
            raise ValueError(f"durability must be 'fast' or 'durable', got {self.durability!r}")
        check_int_range("wait_replicas", self.wait_replicas, 1, 100)
        check_range("wait_timeout", self.wait_timeout, 0.001, 600)
        check_int_range("max_connections", self.max_connections, 1, 10_000)
        if self.max_in_flight is not None:
            check_int_range("max_in_flight", self.max_in_flight, 1, 1000)
        check_range("connect_timeout", self.connect_timeout, 0.1, 600)
        check_range("command_timeout", self.command_timeout, 0.1, 3600)
        check_range("ping_interval", self.ping_interval, 0.1, 3600)
        check_range("ping_timeout", self.ping_timeout, 0.1, 3600)
        check_range("max_backoff", self.max_backoff, 0.1, 600)

    def _common(self) -> dict[str, Any]:
        """What every client of the store is made with: credentials, time limits, and
        no retries (a lost reply is resolved by the store)."""
        return {
            "username": self.server.username,
            "password": self.server.password,
            "connect_timeout": self.connect_timeout,
            "stream_timeout": self.command_timeout,
            "pool_timeout": self.connect_timeout,
            "retry_policy": NoRetryPolicy(),
        }

    def client(self) -> Client:
        """The store's coredis client (see :meth:`_common`)."""
        server = self.server
        if server.cluster:
            return coredis.RedisCluster(
                startup_nodes=[TCPLocation(host, port) for host, port in server.addresses],
                max_connections=self.max_connections,
                # Not a connection to every node (CONFIG GET) at each start-up: a slot
                # nobody serves fails its own commands, clearly, when it is used.
                skip_full_coverage_check=True,
                connection_pool_cls=_ClusterPool,
                **self._common(),
            )
        host, port = server.addresses[0]
        return coredis.Redis(
            host,
            port,
            server.db,
            max_connections=self.max_connections,
            client_name=CLIENT_NAME,
            connection_pool_cls=_Pool,
            **self._common(),
        )

    def node_client(self, host: str, port: int) -> coredis.Redis[Any]:
        """A one-connection client of one server (a Cluster's node)."""
        return coredis.Redis(
            host, port, max_connections=1, client_name=CLIENT_NAME, **self._common()
        )


def parse_url(url: str) -> tuple[Server, dict[str, Any]]:
    """The server of a ``redis://`` or ``redis+cluster://`` URL, and its query options.

    Raises:
        ValueError: the URL is not one of the two forms, or an option is unknown or
            not of its type.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "redis+cluster"):
        raise ValueError(
            f"a Redis url starts with redis:// or redis+cluster://, got {redacted_url(url)!r}"
        )
    cluster = scheme == "redis+cluster"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    addresses = []
    for item in (hosts or "127.0.0.1").split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item, "", "")
        try:
            addresses.append((host.strip("[]") or "127.0.0.1", int(port or 6379)))
        except ValueError:
            raise ValueError(f"bad host:port {item!r} in Redis url") from None
    if not cluster and len(addresses) != 1:
        raise ValueError("a redis:// url names one server; use redis+cluster:// for several")
    db = 0
    path = parts.path.strip("/")
    if path:
        if cluster:
            raise ValueError("a Redis Cluster has no database number: drop the /path")
        try:
            db = int(path)
        except ValueError:
            raise ValueError(f"the database in a Redis url is a number, got {path!r}") from None
    server = Server(
        addresses=tuple(addresses),
        cluster=cluster,
        username=urllib.parse.unquote(username) or None,
        password=urllib.parse.unquote(password) if userinfo else None,
        db=db,
    )
    options: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        convert = _URL_OPTIONS.get(name)
        if convert is None:
            known = ", ".join(_URL_OPTIONS)
            raise ValueError(f"unknown Redis url option {name!r}; chatbus knows {known}")
        try:
            options[name] = convert(value)
        except ValueError:
            raise ValueError(
                f"URL option {name} must be {convert.__name__}, got {value!r}"
            ) from None
    return server, options


#: ``open_bus`` URL query options, with how to read each one.
_URL_OPTIONS: Final = {
    "prefix": str,
    "durability": str,
    "wait_replicas": int,
    "wait_timeout": float,
    "max_connections": int,
    "max_in_flight": int,
    "connect_timeout": float,
    "command_timeout": float,
    "ping_interval": float,
    "ping_timeout": float,
    "max_backoff": float,
}


@asynccontextmanager
async def open_redis(
    url: str,
    *,
    prefix: str = "chatbus",
    durability: str = "fast",
    wait_replicas: int = 1,
    wait_timeout: float = 1.0,
    max_connections: int = 16,
    max_in_flight: int | None = None,
    connect_timeout: float = 5.0,
    command_timeout: float = 10.0,
    ping_interval: float = 5.0,
    ping_timeout: float = 5.0,
    max_backoff: float = 5.0,
) -> AsyncIterator[tuple[RedisStore, RedisNotifier]]:
    """Open a Redis store and notifier pair for ``url``; close both on exit.

    Example::

        async with chatbus.redis.open_redis("redis://127.0.0.1:6379/0") as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                ...

    (``chatbus.open_bus("redis://…?prefix=chat")`` does the same in one step.)

    Args:
        url: ``redis://[user:password@]host:port/db`` for one server, or
            ``redis+cluster://[user:password@]host:port,host:port`` for a Cluster
            (any reachable node seeds the topology). Options may ride in the query.
        prefix: Every key and channel starts with it (1 to 200 bytes, no braces);
            each prefix is an independent namespace.
        durability: ``"fast"`` (the default): a publish returns once its script ran
            on the primary, as durable as the server's own persistence (AOF); a
            restart or failover that may have lost acknowledged messages starts a
            new epoch, so subscribers get :class:`~chatbus.HistoryReset` rather than
            a silent gap. ``"durable"``: a publish returns, and its message becomes
            visible and is announced, only once ``wait_replicas`` replicas have it
            (``WAIT``): an acknowledged message survives a failover. Needs replicas:
            opening refuses (:class:`~chatbus.StoreError`) unless every primary has
            ``wait_replicas`` replicas connected then.
        wait_replicas: Replicas that must confirm a durable append (1 to 100).
        wait_timeout: Seconds a durable append waits for them (0.001 to 600); past
            it the publish raises :class:`~chatbus.OutcomeUnknown`.
        max_connections: Most connections of the store's client (per server).
        max_in_flight: Most append round trips running at once per server (1 to 1000;
            a stalled Cluster primary holds up only its own streams); appends
            made meanwhile are merged into the next (group commit). By default 1
            on one server, which makes the largest batches (the server runs scripts
            one at a time anyway; durable mode, whose round trips wait for replicas,
            may want more); 1 per Cluster primary too (in fast mode a batch goes out
            there as one call for the streams of all its slots), 3 per Cluster
            primary in durable mode (one call per hash slot there, so merging the
            streams of other slots saves none).
        connect_timeout: Seconds a new connection may take (0.1 to 600): what makes
            a publish fail promptly with :class:`~chatbus.StoreError` while Redis is
            down.
        command_timeout: Seconds a command's reply may take (0.1 to 3600). A
            publish to a server that stops answering gives up after about this
            long plus at most ``min(command_timeout, 2)`` seconds re-running the
            batch with its token to learn whether it ran (then
            :class:`~chatbus.OutcomeUnknown`); durable mode adds ``wait_timeout``.
        ping_interval: Seconds between the listener's liveness pings (0.1 to 3600).
        ping_timeout: Seconds a ping (or a subscription) may take before the
            listening connections are replaced (0.1 to 3600).
        max_backoff: Longest pause between reconnect attempts (0.1 to 600).

    Raises:
        ValueError: an option is not valid.
        StoreError: Redis could not be reached, or (durable mode) a primary has
            fewer than ``wait_replicas`` replicas connected.
    """
    server, query = parse_url(url)
    if query:
        raise ValueError(
            "open_redis takes its options as arguments, not in the url's query"
            f" ({', '.join(query)}); open_bus(url) reads them from the query"
        )
    settings = _Settings(
        server=server,
        prefix=prefix,
        durability=durability,
        wait_replicas=wait_replicas,
        wait_timeout=wait_timeout,
        max_connections=max_connections,
        max_in_flight=max_in_flight,
        connect_timeout=connect_timeout,
        command_timeout=command_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        max_backoff=max_backoff,
    )
    async with unwrapped_groups(_open_pair(settings)) as pair:
        yield pair


@asynccontextmanager
async def _open_pair(settings: _Settings) -> AsyncIterator[tuple[RedisStore, RedisNotifier]]:
    server = settings.server
    client = settings.client()
    entered = False
    try:
        async with client:
            entered = True
            if not server.cluster:  # a Cluster client asked a node for the slots already
                try:
                    with trio.fail_after(settings.connect_timeout):
                        await client.ping()
                except (*REDIS_ERRORS, trio.TooSlowError) as exc:
                    raise store_error("opening the Redis store", exc) from exc
            if settings.durability == "durable":
                await _check_replicas(settings, client)
            notifier = RedisNotifier(
                server,
                settings.prefix,
                ping_interval=settings.ping_interval,
                ping_timeout=settings.ping_timeout,
                max_backoff=settings.max_backoff,
                first_slots=_slots_of(client) if server.cluster else None,
            )
            layout = None
            if isinstance(client, coredis.RedisCluster):
                layout = LayoutRefresh(
                    client, timeout=settings.connect_timeout + settings.command_timeout
                )
            store = RedisStore(
                client,
                settings.prefix,
                durability=settings.durability,
                wait_replicas=settings.wait_replicas,
                wait_timeout=settings.wait_timeout,
                max_in_flight=(
                    settings.max_in_flight
                    if settings.max_in_flight is not None
                    else default_max_in_flight(server.cluster, settings.durability)
                ),
                shield_timeout=settings.command_timeout * 2 + settings.wait_timeout + 5,
                command_timeout=settings.command_timeout,
                reset=notifier.reset_locally,
                cluster=server.cluster,
                layout=layout,
            )
            try:
                async with trio.open_nursery() as nursery:
                    if layout is not None:
                        nursery.start_soon(layout.run)
                    yield store, notifier
                    nursery.cancel_scope.cancel()
            finally:
                store.close()
    except REDIS_ERRORS as exc:
        if entered:
            raise
        # The client's start-up (a Cluster's topology) failed.
        raise store_error("opening the Redis store", exc) from exc


async def _check_replicas(settings: _Settings, client: Client) -> None:
    """Durable mode: refuse to open unless every primary has ``wait_replicas`` replicas
    connected now (else every publish would wait ``wait_timeout`` and fail).

    Raises:
        StoreError: a primary has too few replicas connected, or is a replica itself.
    """
    if isinstance(client, coredis.RedisCluster):
        layout = client.connection_pool.cluster_layout
        nodes = [(node.host, node.port) for node in layout.primaries]
    else:
        nodes = [settings.server.addresses[0]]
    for host, port in nodes:
        try:
            with trio.fail_after(settings.connect_timeout + settings.command_timeout):
                if isinstance(client, coredis.RedisCluster):
                    async with settings.node_client(host, port) as node:
                        info = await node.info("replication")
                else:
                    info = await client.info("replication")
        except (*REDIS_ERRORS, trio.TooSlowError) as exc:
            raise store_error("checking the replicas for durable mode", exc) from exc
        if info.get("role") != "master":
            raise StoreError(
                f"durable mode: {host}:{port} has role {info.get('role')!r}, not a primary;"
                " give the url of the primary (or of the Cluster)"
            )
        attached = _replicas(info)
        if attached < settings.wait_replicas:
            raise StoreError(
                f"durable mode needs wait_replicas={settings.wait_replicas} replica(s)"
                f" connected to every primary, but {host}:{port} has {attached}: every publish"
                " would fail after wait_timeout. Add replicas, lower wait_replicas, or use"
                " durability='fast'"
            )


def _replicas(info: Mapping[str, Any]) -> int:
    """Replicas attached to a primary (``INFO replication``'s ``connected_slaves``: one
    still in its first sync counts, for it will confirm once synced)."""
    try:
        return int(info.get("connected_slaves") or 0)
    except (TypeError, ValueError):
        return 0


def _slots_of(client: Client) -> Callable[[int], tuple[str, int] | None]:
    """Slot → primary address as the coredis Cluster client knows it (no I/O)."""
    layout = client.connection_pool.cluster_layout  # type: ignore[union-attr]

    def lookup(slot: int) -> tuple[str, int] | None:
        try:
            node = layout.node_for_slot(slot)
        except coredis.exceptions.RedisError:
            return None
        return (node.host, node.port)

    return lookup


def open_backend(
    url: str,
) -> AbstractAsyncContextManager[tuple[RedisStore, RedisNotifier]]:
    """The store and notifier for a ``redis://`` or ``redis+cluster://`` URL
    (``open_bus``'s scheme table); options ride in the query (``?prefix=chat``).

    Raises:
        ValueError: the URL or an option in its query is not valid.
    """
    _, options = parse_url(url)
    return open_redis(urllib.parse.urlsplit(url)._replace(query="").geturl(), **options)


async def drop_prefix(url: str, prefix: str) -> None:
    """Delete every key of ``prefix`` (on a Cluster, on every primary); the keys of
    another prefix are left alone, also one that starts with this one (``chat:eu``).

    For tests and tooling: SCAN, then UNLINK, in batches. Not atomic; writers still
    running under the prefix may leave keys behind.
    """
    server, _ = parse_url(url.split("?", 1)[0])
    settings = _Settings(server=server, prefix=prefix)
    # Every key of the prefix is `prefix:{tag}:…`: matching `prefix:*` would also
    # take a prefix that starts with this one and a colon ("chat" and "chat:eu").
    pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + ":{*"
    try:
        async with settings.client() as client:
            keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
            for start in range(0, len(keys), 500):
                async with client.pipeline(transaction=False) as pipe:
                    for key in keys[start : start + 500]:
                        pipe.unlink([key])
    except REDIS_ERRORS as exc:
        raise StoreError(f"dropping prefix {prefix!r} failed: {exc!r}") from exc
