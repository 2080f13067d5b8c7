"""The Postgres side of the soak: scratch schema, direct reader, server-side faults.

The reader and the faults use synchronous psycopg on a direct connection (never
through the proxy, never through chatbus), in a worker thread. The soak's own
sessions are found in ``pg_stat_activity`` by their client port: every chatbus
connection of the run goes through the harness's proxy, which knows the local port of
each upstream socket, so no other user's sessions on a shared server are touched.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import attrs
import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import chatbus

from ._backend import resume_watchdog
from ._check import StoredMessage, StoreSnapshot

LOOPBACK: Final = frozenset({"127.0.0.1", "localhost"})
MODULE: Final = __name__
CONTROL_APP: Final = "chatbus-chaos-control"


def _micros(ts: datetime.datetime) -> int:
    # Exact: whole seconds and microseconds separately, no float rounding.
    return int(ts.timestamp()) * 1_000_000 + ts.microsecond


@attrs.define(eq=False)
class PostgresBackend:
    """A fresh schema on a loopback Postgres server, and the faults one can do to it."""

    url: str
    schema: str
    cluster: str  # "15/main", for pg_ctlcluster restarts
    module: str = MODULE
    upstream: tuple[str, int] = ("127.0.0.1", 5432)
    server_faults: Sequence[str] = ("terminate", "blackhole", "restart")
    _stopped: set[int] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        params = conninfo_to_dict(self.url)
        host = str(params.get("host") or "127.0.0.1")
        if host not in LOOPBACK:
            raise SystemExit(f"the chaos soak only talks to 127.0.0.1, not {host!r}")
        self.upstream = ("127.0.0.1", int(params.get("port") or 5432))

    def describe(self) -> str:
        return f"postgres {self.upstream[0]}:{self.upstream[1]}, schema {self.schema}"

    def child_config(self, proxy_port: int) -> dict[str, Any]:
        params = conninfo_to_dict(self.url)
        params.update(host="127.0.0.1", port=str(proxy_port))
        return {"dsn": make_conninfo("", **params), "schema": self.schema}

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, application_name=CONTROL_APP
        )

    def _sync_prepare(self) -> None:
        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))

    async def prepare(self) -> None:
        await trio.to_thread.run_sync(self._sync_prepare)

    def _sync_snapshot(self, streams: Sequence[str]) -> StoreSnapshot:
        index = {name: i for i, name in enumerate(streams)}
        with self._connect() as conn:
            last = conn.execute(
                sql.SQL("SELECT stream, last_id FROM {}").format(
                    sql.Identifier(self.schema, "streams")
                )
            ).fetchall()
            rows: list[StoredMessage] = []
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("SELECT stream, id, key, body::text, created_at FROM {}").format(
                        sql.Identifier(self.schema, "messages")
                    )
                )
                for stream, id_, key, body, created in cur:
                    token: str | None = None
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        token = json.loads(body).get("tok")
                    rows.append(
                        StoredMessage(
                            stream=index.get(stream, -1),
                            id=int(id_),
                            key=key,
                            token=token if isinstance(token, str) else None,
                            created_micros=_micros(created),
                        )
                    )
        return StoreSnapshot(last_ids={index.get(s, -1): int(n) for s, n in last}, messages=rows)

    async def snapshot(self, streams: Sequence[str]) -> StoreSnapshot:
        return await trio.to_thread.run_sync(self._sync_snapshot, streams)

    def _sync_heads(self, streams: Sequence[str]) -> dict[int, int]:
        index = {name: i for i, name in enumerate(streams)}
        with self._connect() as conn:
            try:
                rows = conn.execute(
                    sql.SQL("SELECT stream, last_id FROM {}").format(
                        sql.Identifier(self.schema, "streams")
                    )
                ).fetchall()
            except psycopg.errors.UndefinedTable:
                rows = []
        heads = dict.fromkeys(range(len(streams)), 0)
        heads.update({index[s]: int(n) for s, n in rows if s in index})
        return heads

    async def heads(self, streams: Sequence[str]) -> dict[int, int]:
        return await trio.to_thread.run_sync(self._sync_heads, streams)

    def _sync_backends(self, client_ports: Sequence[int]) -> list[int]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)"
                " AND client_addr = '127.0.0.1' AND backend_type = 'client backend'"
                " AND application_name LIKE 'chatbus%%' AND pid <> pg_backend_pid()",
                (list(client_ports),),
            ).fetchall()
        return [int(r[0]) for r in rows]

    def _sync_states(self, client_ports: Sequence[int]) -> dict[str, int]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity"
                " WHERE client_port = ANY(%s) AND client_addr = '127.0.0.1'"
                " AND backend_type = 'client backend' GROUP BY 1",
                (list(client_ports),),
            ).fetchall()
        return {str(k): int(n) for k, n in rows}

    async def session_states(self, client_ports: Sequence[int]) -> dict[str, int]:
        """How many of the run's sessions are in each state (``idle in transaction`` …)."""
        return await trio.to_thread.run_sync(self._sync_states, client_ports)

    def _sync_terminate(self, pids: Sequence[int]) -> int:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                " FROM unnest(%s::int[]) AS pid",
                (list(pids),),
            ).fetchall()
        return int(rows[0][0])

    async def server_fault(
        self, kind: str, client_ports: Sequence[int], duration: float, rng: random.Random
    ) -> str:
        if kind == "restart":
            version, name = self.cluster.split("/", 1)
            await trio.run_process(
                [
                    "pg_ctlcluster",
                    "--skip-systemctl-redirect",
                    version,
                    name,
                    "restart",
                    "-m",
                    "fast",
                ],
                capture_stdout=True,
                capture_stderr=True,
            )
            return f"restarted cluster {self.cluster}"
        pids = await trio.to_thread.run_sync(self._sync_backends, client_ports)
        if not pids:
            return "no sessions"
        if kind == "terminate":
            chosen = pids if rng.random() < 0.4 else rng.sample(pids, max(1, len(pids) // 2))
            n = await trio.to_thread.run_sync(self._sync_terminate, chosen)
            return f"terminated {n} of {len(pids)} sessions"
        if kind == "blackhole":
            chosen = pids if rng.random() < 0.3 else rng.sample(pids, max(1, len(pids) // 2))
            resume_watchdog(chosen, duration + 3)
            try:
                for pid in chosen:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                        self._stopped.add(pid)
                await trio.sleep(duration)
            finally:
                self.resume_all()
            return f"stopped {len(chosen)} of {len(pids)} backends for {duration:.1f} s"
        raise ValueError(f"unknown server fault {kind!r}")

    def resume_all(self) -> None:
        """SIGCONT every backend this object stopped (idempotent, synchronous)."""
        for pid in list(self._stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self._stopped.discard(pid)

    def _sync_drop(self) -> None:
        with self._connect() as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )

    async def drop(self) -> None:
        await trio.to_thread.run_sync(self._sync_drop)


def make_backend(url: str, run_id: str, *, options: dict[str, Any]) -> PostgresBackend:
    """A backend with a fresh schema name for this run; ``options["cluster"]`` is
    the ``pg_ctlcluster`` version/name pair used for restarts."""
    cluster = str(options.get("cluster") or "15/main")
    return PostgresBackend(url=url, schema=f"chaos_{run_id}", cluster=cluster)


@contextlib.asynccontextmanager
async def open_child_bus(config: dict[str, Any]) -> AsyncIterator[chatbus.Bus]:
    """Child side: a bus on the run's schema, connected through the proxy."""
    from chatbus.postgres import open_postgres

    async with open_postgres(config["dsn"], schema=config["schema"]) as (store, notifier):
        async with chatbus.open_bus(store=store, notifier=notifier) as bus:
            yield bus
