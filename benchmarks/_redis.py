"""Redis servers the suite starts itself, and per-shard load read from ``INFO``.

Never the machine's Redis on 6379: every server here comes from the test suite's
launcher (``tests/support/redis_servers.py``: free ports of its own, its own folder,
``--save ""``, AOF as asked, a 3-master Cluster built with ``redis-cli --cluster
create``), so the suite knows each server's persistence settings. Servers are stopped
when their ``with`` block ends; the launcher's watchdog stops them if this process
dies first.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

try:
    from tests.support import redis_servers as _launcher
except ImportError as exc:  # run from outside the repository: no launcher
    _launcher = None  # type: ignore[assignment]
    _LAUNCHER_MISSING = (
        f"tests/support/redis_servers.py not importable ({exc}); run from the repository root"
    )
else:
    _LAUNCHER_MISSING = ""

#: The persistence the throughput and latency rows are measured with.
AOF = "everysec"


def binaries_problem() -> str | None:
    """Why the suite cannot start Redis servers here, or None."""
    if _launcher is None:
        return _LAUNCHER_MISSING
    return _launcher.binaries_problem()


@contextlib.contextmanager
def standalone(aof: str = AOF) -> Iterator[Any]:
    """A standalone server of our own for the block (a launcher ``RedisServer``)."""
    assert _launcher is not None
    with _launcher.standalone(aof=aof) as server:  # type: ignore[arg-type]
        yield server


@contextlib.contextmanager
def cluster(masters: int = 3, aof: str = AOF) -> Iterator[Any]:
    """A ready Redis Cluster of our own for the block (a launcher ``RedisCluster``)."""
    assert _launcher is not None
    with _launcher.cluster(masters=masters, aof=aof) as nodes:  # type: ignore[arg-type]
        yield nodes


@contextlib.contextmanager
def url_for(backend: str, dsn: str) -> Iterator[str]:
    """Where a scenario's runs on ``backend`` go: for Redis, a standalone server of the
    suite's own (AOF ``everysec``) for the block; for the others, ``dsn``."""
    if backend != "redis":
        yield dsn
        return
    with standalone() as server:
        yield server.url


def persistence(server: Any) -> dict[str, str]:
    """The server's ``appendonly``/``appendfsync``/``save`` settings (for the JSON)."""
    settings: dict[str, str] = {}
    for name in ("appendonly", "appendfsync", "save"):
        reply = server.command("CONFIG", "GET", name)
        settings[name] = str(reply[1]) if len(reply) > 1 else ""
    return settings


@dataclasses.dataclass(frozen=True)
class Load:
    """What one server did between two snapshots."""

    address: str
    #: Script calls (``EVALSHA``/``EVAL``): the client's round trips that ran a script.
    scripts: int
    #: Every command, those run inside scripts included.
    commands: int
    #: Server CPU seconds (user + system, all its threads).
    cpu: float


def _snapshot(server: Any) -> tuple[int, int, float]:
    stats = server.info("commandstats")
    calls = {
        name.removeprefix("cmdstat_"): int(value.split(",", 1)[0].removeprefix("calls="))
        for name, value in stats.items()
        if name.startswith("cmdstat_")
    }
    cpu = server.info("cpu")
    return (
        calls.get("evalsha", 0) + calls.get("eval", 0),
        sum(calls.values()),
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    )


@contextlib.contextmanager
def measure_load(servers: Sequence[Any]) -> Iterator[list[Load]]:
    """Yield a list that holds, after the block, each server's :class:`Load` in it."""
    before = {server.address: _snapshot(server) for server in servers}
    loads: list[Load] = []
    yield loads
    for server in servers:
        scripts, commands, cpu = _snapshot(server)
        was = before[server.address]
        loads.append(Load(server.address, scripts - was[0], commands - was[1], cpu - was[2]))
