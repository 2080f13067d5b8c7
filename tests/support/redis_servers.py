"""Local Redis servers and Clusters of our own, for tests, CI and benchmarks.

Every server runs on free ports of its own (never 6379, never the machine's Redis
settings), with its own ``--dir`` under a fresh temporary folder, ``--save ""``,
``--daemonize yes`` and AOF as asked (``"no"``, ``"everysec"``, ``"always"``)::

    with standalone(aof="everysec") as server:          # RedisServer
        server.url                                      # redis://127.0.0.1:PORT/0
        server.command("CONFIG", "GET", "appendfsync")  # a tiny sync RESP client

    with cluster(masters=3, replicas=1) as nodes:       # RedisCluster
        nodes.url                                       # redis+cluster://h:p,h:p,h:p
        nodes.master_for_slot(slot)

    async with open_standalone() as server: ...         # the same, for trio code
    async with open_cluster(masters=3) as nodes: ...

A Cluster is built with ``redis-cli --cluster create … --cluster-yes`` and handed
over only when ``CLUSTER INFO`` says ``cluster_state:ok`` on every node (and every
replica's link to its master is up). Everything started is torn down on the way
out, also when start-up fails half way. A watchdog process per launch kills the
servers if the launching process dies without tearing down (SIGKILL, a crashed
CI run), so no server outlives its owner.

From a shell (``.ci/run``)::

    eval "$(python -m tests.support.redis_servers start --state DIR --owner $$ \\
            --standalone everysec --cluster 3)"    # prints export lines
    python -m tests.support.redis_servers stop --state DIR

``start`` prints ``export CHATBUS_TEST_REDIS_URL=…`` (with ``--standalone``) and
``export CHATBUS_TEST_REDIS_CLUSTER_URL=…`` (with ``--cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, final

import attrs

Aof = Literal["no", "everysec", "always"]
AOF_CHOICES: tuple[Aof, ...] = ("no", "everysec", "always")

HOST = "127.0.0.1"
#: Never used, whatever the kernel hands out: the machine's own Redis lives there.
RESERVED_PORTS = frozenset({6379, 16379})
#: How long a cluster node waits before it calls an unreachable master failed (ms).
#: Short, so failover tests finish quickly; long enough for a loaded 2-core machine.
NODE_TIMEOUT_MS = 2000


class RedisLaunchError(RuntimeError):
    """A server or cluster could not be started (the message has the log's tail)."""


def binaries_problem() -> str | None:
    """Why local servers cannot be started here (binaries missing), or None."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    return f"{' and '.join(missing)} not found on PATH" if missing else None


# ---- a minimal synchronous RESP client (admin commands, probes, fault injection) ----


class RespError(Exception):
    """An error reply (``-ERR …``) from the server."""


def _encode(args: Sequence[object]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        # surrogateescape: key names read back (any bytes) can be sent back as they were.
        data = arg if isinstance(arg, bytes) else str(arg).encode(errors="surrogateescape")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(stream: Any) -> Any:
    line = stream.readline()
    if not line:
        raise ConnectionError("connection closed by the server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)[:-2]
        return data.decode(errors="surrogateescape")
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(stream) for _ in range(size)]
    raise ConnectionError(f"unexpected reply line {line!r}")


def command(port: int, *args: object, host: str = HOST, timeout: float = 5.0) -> Any:
    """Send one command to ``host:port`` on a fresh connection and return its reply.

    Blocking and short-lived on purpose: admin commands and fault injection must not
    depend on the client under test. Raises :class:`RespError` on an error reply and
    ``OSError`` if the server does not answer.
    """
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(_encode(args))
        with conn.makefile("rb") as stream:
            return _read_reply(stream)


def info(port: int, section: str) -> dict[str, str]:
    """``INFO section`` as a dict of its ``name:value`` lines."""
    text = command(port, "INFO", section)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {name: value for name, value in pairs}


@final
class AdminConnection:
    """One open connection to a server, for commands that must be read in one go.

    A command sent on an already open connection is read by the server in the same
    event-loop turn as other clients' pending requests (a new connection is only
    accepted in that turn): the way to kill a client right after its request ran and
    before its reply is written (see ``support.redis_bus.lose_reply``).
    """

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection((HOST, port), timeout=10)
        self._stream = self._socket.makefile("rb")

    def command(self, *args: object) -> Any:
        """Send one command and return its reply."""
        self._socket.sendall(_encode(args))
        return _read_reply(self._stream)

    def close(self) -> None:
        """Close the connection."""
        self._stream.close()
        self._socket.close()


# ---- one server ----


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS and port < 55535:  # cluster bus ports stay valid
            return port


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie does not: our daemons are reaped by init, late."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@final
@attrs.define(eq=False)
class RedisServer:
    """One ``redis-server`` of ours: its ports, folder and process."""

    port: int
    directory: Path
    aof: Aof = "no"
    #: The cluster bus port (``--cluster-port``), or None for a standalone server.
    cluster_port: int | None = None
    pid: int | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    def arguments(self) -> list[str]:
        """The ``redis-server`` command line."""
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.directory),
            "--daemonize", "yes",
            "--pidfile", str(self.directory / "redis.pid"),
            "--logfile", str(self.log),
            "--save", "",
            "--appendonly", "no" if self.aof == "no" else "yes",
            "--appendfsync", "everysec" if self.aof == "no" else self.aof,
            # DEBUG SLEEP and friends, from this machine only: fault tests use them.
            "--enable-debug-command", "local",
        ]  # fmt: skip
        if self.cluster_port is not None:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-port", str(self.cluster_port),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # A replica may always take over, however long its master was gone.
                "--cluster-replica-validity-factor", "0",
            ]  # fmt: skip
        return args

    def start(self, *, wait: float = 10.0) -> None:
        """Start the server (again, on the same port and folder) and wait for PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "redis.pid").unlink(missing_ok=True)
        log_start = self.log.stat().st_size if self.log.exists() else 0
        done = subprocess.run(self.arguments(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RedisLaunchError(f"redis-server on {self.port} failed: {done.stderr.strip()}")
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(OSError, RespError, ValueError):
                if command(self.port, "PING", timeout=1) == "PONG":
                    pid = int((self.directory / "redis.pid").read_text())
                    # Our server, not another process that took the port meanwhile.
                    if int(info(self.port, "server")["process_id"]) == pid:
                        self.pid = pid
                        return
            if time.monotonic() > deadline or "Address already in use" in self._log_since(
                log_start
            ):
                raise RedisLaunchError(
                    f"redis-server on {self.port} did not come up:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def command(self, *args: object, timeout: float = 5.0) -> Any:
        """One command to this server (see :func:`command`)."""
        return command(self.port, *args, timeout=timeout)

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` of this server."""
        return info(self.port, section)

    @property
    def running(self) -> bool:
        """Whether the server's process is alive."""
        return self.pid is not None and _pid_alive(self.pid)

    def kill(self) -> None:
        """SIGKILL the server: a crash, nothing flushed. :meth:`start` brings it back."""
        if self.pid is not None and _pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(5.0)
        self.pid = None

    def pause(self) -> None:
        """SIGSTOP the server: it holds its connections but answers nothing."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Shut the server down (SHUTDOWN NOSAVE, then SIGKILL after 5 s); idempotent."""
        if self.pid is None or not _pid_alive(self.pid):
            self.pid = None
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGCONT)  # a paused server cannot shut down
        with contextlib.suppress(OSError, RespError, ConnectionError):
            command(self.port, "SHUTDOWN", "NOSAVE", timeout=2)
        if not self._wait_gone(5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(5.0)
        self.pid = None

    def _wait_gone(self, seconds: float) -> bool:
        assert self.pid is not None
        deadline = time.monotonic() + seconds
        while _pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


# ---- a cluster ----


def _slot_ranges(master_id: str, nodes_text: str) -> list[tuple[int, int]]:
    for line in nodes_text.splitlines():
        fields = line.split()
        if fields and fields[0] == master_id:
            ranges = []
            for part in fields[8:]:
                if part.startswith("["):  # a slot being migrated or imported
                    continue
                low, _, high = part.partition("-")
                ranges.append((int(low), int(high or low)))
            return ranges
    return []


@final
@attrs.define(eq=False)
class RedisCluster:
    """A local Redis Cluster of ours: masters first, then replicas."""

    nodes: list[RedisServer]
    masters_count: int

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…`` (the first masters' seeds)."""
        seeds = ",".join(node.address for node in self.nodes[: self.masters_count])
        return f"redis+cluster://{seeds}"

    @property
    def seed(self) -> RedisServer:
        """A node that is running (to ask about the topology)."""
        for node in self.nodes:
            if node.running:
                return node
        raise RedisLaunchError("no node of the cluster is running")

    def node_id(self, node: RedisServer) -> str:
        """The cluster node id of ``node``."""
        return str(node.command("CLUSTER", "MYID"))

    def masters(self) -> list[RedisServer]:
        """The running nodes that are masters now (after a failover, not the first ones)."""
        return [
            node
            for node in self.nodes
            if node.running and node.info("replication").get("role") == "master"
        ]

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The running replicas of ``master``."""
        wanted = self.node_id(master)
        found = []
        for node in self.nodes:
            if node is master or not node.running:
                continue
            for line in str(node.command("CLUSTER", "NODES")).splitlines():
                fields = line.split()
                if "myself" in fields[2] and fields[3] == wanted:
                    found.append(node)
        return found

    def slots_of(self, master: RedisServer) -> list[tuple[int, int]]:
        """The slot ranges ``master`` owns (from its own view)."""
        return _slot_ranges(self.node_id(master), str(master.command("CLUSTER", "NODES")))

    def master_for_slot(self, slot: int) -> RedisServer:
        """The master that owns ``slot`` now."""
        for master in self.masters():
            if any(low <= slot <= high for low, high in self.slots_of(master)):
                return master
        raise RedisLaunchError(f"no master owns slot {slot}")

    def keyslot(self, key: str | bytes) -> int:
        """``CLUSTER KEYSLOT key``."""
        return int(self.seed.command("CLUSTER", "KEYSLOT", key))

    def keys(self, pattern: str) -> list[str]:
        """Every key matching ``pattern`` on every running master (SCAN)."""
        found: list[str] = []
        for master in self.masters():
            cursor = "0"
            while True:
                cursor, batch = master.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                found += batch
                if cursor == "0":
                    break
        return found

    def migrate_slot(self, slot: int, target: RedisServer) -> int:
        """Move ``slot`` and its keys to master ``target`` (the resharding procedure).

        IMPORTING on the target, MIGRATING on the source, MIGRATE of the keys in
        batches, then SETSLOT NODE on the target, the source and the other masters
        (in that order, as the Cluster specification says). Returns the keys moved.
        """
        source = self.master_for_slot(slot)
        if source is target:
            raise ValueError(f"slot {slot} is already on {target.address}")
        source_id, target_id = self.node_id(source), self.node_id(target)
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        others = [m for m in self.masters() if m is not source and m is not target]
        for master in [target, source, *others]:
            master.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok()
        return moved

    def failover(self, replica: RedisServer, *, seconds: float = 30.0) -> None:
        """``CLUSTER FAILOVER`` on ``replica`` (a coordinated one: nothing is lost).

        Returns once the replica is a master and the cluster is ok again.
        """
        replica.command("CLUSTER", "FAILOVER")
        self.wait_promoted(replica, seconds=seconds)

    def wait_promoted(self, replica: RedisServer, *, seconds: float = 30.0) -> None:
        """Wait until ``replica`` is a master and the cluster says ok everywhere."""
        deadline = time.monotonic() + seconds
        while replica.info("replication").get("role") != "master":
            if time.monotonic() > deadline:
                raise RedisLaunchError(f"{replica.address} not promoted after {seconds:g} s")
            time.sleep(0.05)
        self.wait_ok(seconds=max(1.0, deadline - time.monotonic()))

    def wait_ok(self, *, seconds: float = 30.0) -> None:
        """Wait until every running node says ``cluster_state:ok`` and replicas are synced.

        Also until every node agrees on who owns every slot, so a client that asks
        any node gets the same answer.
        """
        deadline = time.monotonic() + seconds
        problem: str | None = "not checked"
        while time.monotonic() < deadline:
            problem = self._problem()
            if problem is None:
                return
            time.sleep(0.05)
        raise RedisLaunchError(f"cluster not ready after {seconds:g} s: {problem}")

    def _problem(self) -> str | None:
        views = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                state = str(node.command("CLUSTER", "INFO"))
                if "cluster_state:ok" not in state:
                    return f"{node.address}: cluster_state not ok"
                replication = node.info("replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                    or replication.get("master_sync_in_progress") != "0"
                ):
                    return f"{node.address}: replica not synced"
                nodes_text = str(node.command("CLUSTER", "NODES"))
            except (OSError, RespError, ConnectionError) as exc:
                return f"{node.address}: {exc}"
            owners = []
            for line in nodes_text.splitlines():
                fields = line.split()
                if "master" in fields[2] and "fail" not in fields[2] and fields[8:]:
                    owners.append((fields[1].split("@")[0], tuple(fields[8:])))
            views.add(tuple(sorted(owners)))
        return None if len(views) == 1 else "nodes disagree on slot owners"

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


# ---- launching, tearing down, the watchdog ----


def _start_with_retries(make: Any, attempts: int = 5) -> RedisServer:
    """``make()`` a server on fresh ports and start it; new ports if they were taken."""
    for attempt in range(attempts):
        server: RedisServer = make()
        try:
            server.start()
            return server
        except RedisLaunchError:
            server.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _launch_root(prefix: str) -> Iterator[Path]:
    """A temporary folder owned by this process, watched by a watchdog, removed after."""
    root = Path(tempfile.mkdtemp(prefix=f"chatbus-redis-{prefix}-"))
    watchdog = _start_watchdog(root, os.getpid())
    try:
        yield root
    finally:
        _stop_servers_under(root)
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            watchdog.kill()
            watchdog.wait(timeout=5)


def _start_watchdog(root: Path, owner: int) -> subprocess.Popen[bytes]:
    """A process that stops the servers under ``root`` once ``owner`` is gone."""
    return subprocess.Popen(
        [sys.executable, "-I", __file__, "watch", "--state", str(root), "--owner", str(owner)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the test run must not kill it first
    )


def _stop_servers_under(root: Path) -> None:
    """Stop every server whose pidfile is under ``root`` (SIGKILL; they keep nothing)."""
    for pidfile in root.glob("*/redis.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            # Only a redis-server: never a process that reused the pid.
            if "redis-server" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)


def new_server(root: Path, name: str, *, aof: Aof = "no", clustered: bool = False) -> RedisServer:
    """A (not yet started) server in ``root/name`` on fresh free ports."""
    if aof not in AOF_CHOICES:
        raise ValueError(f"aof must be one of {AOF_CHOICES}, got {aof!r}")
    return RedisServer(
        port=_free_port(),
        directory=root / name,
        aof=aof,
        cluster_port=_free_port() if clustered else None,
    )


def start_standalone(root: Path, *, aof: Aof = "no", name: str = "standalone") -> RedisServer:
    """Start a standalone server in ``root/name`` (caller tears down)."""
    return _start_with_retries(lambda: new_server(root, name, aof=aof))


def start_cluster(
    root: Path, *, masters: int = 3, replicas: int = 0, aof: Aof = "no"
) -> RedisCluster:
    """Start and create a cluster in ``root`` (caller tears down: :meth:`RedisCluster.stop`)."""
    if masters < 3:
        raise ValueError("redis-cli --cluster create needs at least 3 masters")
    nodes: list[RedisServer] = []
    result = RedisCluster(nodes=nodes, masters_count=masters)
    try:
        for index in range(masters * (1 + replicas)):
            nodes.append(
                _start_with_retries(
                    lambda i=index: new_server(root, f"node{i}", aof=aof, clustered=True)
                )
            )
        create = [
            "redis-cli",
            "--cluster", "create",
            *(node.address for node in nodes),
            "--cluster-replicas", str(replicas),
            "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RedisLaunchError(f"redis-cli --cluster create failed:\n{done.stdout[-2000:]}")
        result.wait_ok()
    except BaseException:
        result.stop()
        raise
    return result


@contextlib.contextmanager
def standalone(*, aof: Aof = "no") -> Iterator[RedisServer]:
    """A standalone server for the block; stopped and its folder removed afterwards."""
    with _launch_root("standalone") as root:
        server = start_standalone(root, aof=aof)
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def cluster(*, masters: int = 3, replicas: int = 0, aof: Aof = "no") -> Iterator[RedisCluster]:
    """A ready cluster for the block; every node stopped and removed afterwards."""
    with _launch_root("cluster") as root:
        nodes = start_cluster(root, masters=masters, replicas=replicas, aof=aof)
        try:
            yield nodes
        finally:
            nodes.stop()


@contextlib.asynccontextmanager
async def open_standalone(*, aof: Aof = "no") -> AsyncIterator[RedisServer]:
    """:func:`standalone` for trio code: start-up and teardown in a worker thread."""
    async with _in_thread(standalone(aof=aof)) as server:
        yield server


@contextlib.asynccontextmanager
async def open_cluster(
    *, masters: int = 3, replicas: int = 0, aof: Aof = "no"
) -> AsyncIterator[RedisCluster]:
    """:func:`cluster` for trio code: start-up and teardown in a worker thread."""
    async with _in_thread(cluster(masters=masters, replicas=replicas, aof=aof)) as nodes:
        yield nodes


@contextlib.asynccontextmanager
async def _in_thread(manager: contextlib.AbstractContextManager[Any]) -> AsyncIterator[Any]:
    import trio

    value = await trio.to_thread.run_sync(manager.__enter__)
    try:
        yield value
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(manager.__exit__, type(exc), exc, exc.__traceback__)
        raise
    else:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(manager.__exit__, None, None, None)


# ---- command line (for .ci/run) ----


def _cli_start(args: argparse.Namespace) -> int:
    root = Path(args.state).absolute()
    root.mkdir(parents=True, exist_ok=True)
    watchdog = _start_watchdog(root, args.owner)
    exports: dict[str, str] = {}
    try:
        if args.standalone:
            exports["CHATBUS_TEST_REDIS_URL"] = start_standalone(root, aof=args.standalone).url
        if args.cluster:
            nodes = start_cluster(
                root / "cluster", masters=args.cluster, replicas=args.replicas, aof=args.aof
            )
            exports["CHATBUS_TEST_REDIS_CLUSTER_URL"] = nodes.url
    except BaseException:
        _stop_servers_under(root)
        _stop_servers_under(root / "cluster")
        raise
    (root / "watchdog.pid").write_text(str(watchdog.pid))
    (root / "urls.json").write_text(json.dumps(exports))
    for name, value in exports.items():
        print(f"export {name}={value}")
    return 0


def _cli_stop(args: argparse.Namespace) -> int:
    root = Path(args.state).absolute()
    for pidfile in [*root.glob("*/redis.pid"), *root.glob("cluster/*/redis.pid")]:
        with contextlib.suppress(OSError, ValueError):
            server = RedisServer(port=0, directory=pidfile.parent, pid=int(pidfile.read_text()))
            if "redis-server" in Path(f"/proc/{server.pid}/cmdline").read_text():
                # SIGKILL: these servers keep nothing worth a clean shutdown.
                server.kill()
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((root / "watchdog.pid").read_text()), signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    return 0


def _cli_watch(args: argparse.Namespace) -> int:
    root = Path(args.state).absolute()
    while root.exists() and _pid_alive(args.owner):
        time.sleep(0.5)
    _stop_servers_under(root)
    _stop_servers_under(root / "cluster")
    shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``start``, ``stop`` or ``watch`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.redis_servers")
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start servers, print export lines")
    start.add_argument("--state", required=True, help="a folder for the servers (new)")
    start.add_argument(
        "--owner", type=int, default=os.getppid(), help="stop everything once this pid is gone"
    )
    start.add_argument("--standalone", choices=AOF_CHOICES, help="a standalone server, this AOF")
    start.add_argument("--cluster", type=int, default=0, metavar="MASTERS")
    start.add_argument("--replicas", type=int, default=0, help="per master")
    start.add_argument("--aof", choices=AOF_CHOICES, default="no", help="the cluster's AOF")
    stop = sub.add_parser("stop", help="stop what start started")
    stop.add_argument("--state", required=True)
    watch = sub.add_parser("watch", help="(internal) stop the servers once --owner is gone")
    watch.add_argument("--state", required=True)
    watch.add_argument("--owner", type=int, required=True)
    args = parser.parse_args(argv)
    actions = {"start": _cli_start, "stop": _cli_stop, "watch": _cli_watch}
    return actions[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
