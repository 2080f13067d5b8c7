"""What the soak needs from a networked backend, and where each backend lives.

Everything backend-specific sits behind :class:`Backend` (parent side) and one
``open_child_bus`` function (child side) in one module per backend, chosen by URL
scheme from :data:`BACKENDS`. The soak, its proxy, its children and its checker are
backend-neutral. A Redis module would provide the same names: a scratch key prefix,
a reader of its streams, and its own server-side faults.
"""

from __future__ import annotations

import importlib
import random
import subprocess
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import ModuleType
from typing import Any, Protocol

import chatbus

from ._check import StoreSnapshot

#: URL scheme → module providing ``make_backend(url, run_id, options=...)`` (parent)
#: and ``open_child_bus(config)`` (child).
BACKENDS: dict[str, str] = {
    "postgresql": "benchmarks.chaos._postgres",
    "postgres": "benchmarks.chaos._postgres",
}


class Backend(Protocol):
    """The parent's handle on one backend for one run."""

    #: Backend module name, passed to children so they import the same module.
    module: str
    #: Where the proxy forwards to: always a loopback address.
    upstream: tuple[str, int]
    #: Server-side fault kinds this backend implements, beyond the neutral ones.
    server_faults: Sequence[str]

    def describe(self) -> str:
        """One line: server and scratch namespace."""
        ...

    def child_config(self, proxy_port: int) -> dict[str, Any]:
        """JSON-able config a child passes to ``open_child_bus`` to connect via the proxy."""
        ...

    async def prepare(self) -> None:
        """Check the server answers and create the fresh scratch namespace."""
        ...

    async def snapshot(self, streams: Sequence[str]) -> StoreSnapshot:
        """Read the store's final state straight from the server (not through chatbus)."""
        ...

    async def heads(self, streams: Sequence[str]) -> dict[int, int]:
        """The current head of each stream, by stream index."""
        ...

    async def server_fault(
        self, kind: str, client_ports: Sequence[int], duration: float, rng: random.Random
    ) -> str:
        """Inflict one server-side fault on the sessions behind ``client_ports``.

        Returns a short note for the log. Must restore everything it disturbed before
        returning, including when cancelled.
        """
        ...

    async def session_states(self, client_ports: Sequence[int]) -> dict[str, int]:
        """Server-side sessions behind ``client_ports`` by state (for fault notes)."""
        ...

    def resume_all(self) -> None:
        """Undo any server-side freeze still in force (synchronous, idempotent)."""
        ...

    async def drop(self) -> None:
        """Remove the scratch namespace."""
        ...


class ChildModule(Protocol):
    def open_child_bus(
        self, config: dict[str, Any]
    ) -> AbstractAsyncContextManager[chatbus.Bus]: ...


def resume_watchdog(pids: Sequence[int], after: float) -> None:
    """SIGCONT ``pids`` after ``after`` seconds from a detached shell, whatever happens.

    Insurance for SIGSTOP faults: should the soak itself die mid-fault, nothing stays
    stopped. Harmless when the processes were already resumed or have exited.
    """
    if not pids:
        return
    listed = " ".join(str(int(p)) for p in pids)
    subprocess.Popen(
        ["sh", "-c", f"sleep {after:.1f}; kill -CONT {listed} 2>/dev/null; true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def backend_module(url: str) -> ModuleType:
    """The backend module for ``url``'s scheme."""
    scheme = url.split(":", 1)[0].lower()
    try:
        return importlib.import_module(BACKENDS[scheme])
    except KeyError:
        raise SystemExit(f"no chaos backend for URL scheme {scheme!r}") from None
