"""The soak's parent process: children, proxy, fault schedule, final check."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from . import _check as check
from ._backend import Backend, backend_module, resume_watchdog
from ._proxy import Proxy
from ._report import counts, invariant_json, table, write_json

#: The streams of every run; one name is hostile to anything that builds SQL or keys
#: by string formatting.
STREAMS: Final[tuple[str, ...]] = (
    "chat-0",
    "room/1",
    "ström \"'; DROP TABLE x;-- ☃",
    "chat 3",
    "chat-4",
)

#: Faults that act on the server for everyone: a publish stall inside one (plus a
#: recovery grace) is excused. Client-side faults (a frozen or killed client, a lost
#: reply) must never stall other clients, so they excuse nothing.
GRACE: Final[dict[str, float]] = {"terminate": 5.0, "blackhole": 5.0, "restart": 10.0}


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


@attrs.frozen(kw_only=True)
class Options:
    minutes: float
    seed: int
    url: str
    keep: bool = False
    allow_restart: bool = False
    json_path: Path | None = None
    publishers: int = 3
    subscribers: int = 2
    loops: int = 2
    rate: float = 15.0
    keyed_share: float = 0.4
    sabotage: bool = False
    max_stall: float = 5.0
    cluster: str = "15/main"
    faults: frozenset[str] = frozenset(
        {"terminate", "blackhole", "restart", "freeze", "kill", "proxy_drop"}
    )


@attrs.define(eq=False)
class Slot:
    role: str  # "pub" or "sub"
    index: int
    incarnation: int = -1
    label: str = ""
    proc: trio.Process | None = None
    killed_by_us: bool = False
    frozen: bool = False
    started_at: float = 0.0

    @property
    def key(self) -> str:
        """The slot's name, also its proxy listener's: ``p0``, ``s1``, …"""
        return f"{self.role[0]}{self.index}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: int) -> bool:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
                return True
        return False


@attrs.define(eq=False)
class Soak:
    opts: Options
    backend: Backend
    run_dir: Path
    rng: random.Random
    proxy: Proxy
    slots: list[Slot] = attrs.field(factory=list)
    labels: list[tuple[str, str]] = attrs.field(factory=list)  # (role, label) of every child
    windows: list[check.FaultWindow] = attrs.field(factory=list)
    fault_counts: Counter[str] = attrs.field(factory=Counter)
    crashes: list[str] = attrs.field(factory=list)
    log: list[str] = attrs.field(factory=list)
    server_lock: trio.Lock = attrs.field(factory=trio.Lock)
    pubs_stopping: bool = False
    ending: bool = False
    deadline: float = 0.0  # time.time() by which children must be gone
    stopped_at: float = 0.0

    def note(self, text: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {text}")

    # -- children ------------------------------------------------------------------

    def _spec(self, slot: Slot) -> dict[str, Any]:
        role_port = self.proxy.ports[slot.key]
        return {
            "role": slot.role,
            "label": slot.label,
            "streams": list(STREAMS),
            "config": self.backend.child_config(role_port),
            "module": self.backend.module,
            # Per child, from the run's seed and the label alone: the workload does not
            # depend on how the fault schedule's draws interleaved with restarts.
            "seed": random.Random(f"{self.opts.seed}/{slot.label}").getrandbits(64),
            "out": str(self.run_dir / f"{slot.label}.jsonl"),
            "stop": str(self.run_dir / f"stop-{slot.role}"),
            "deadline": self.deadline + 15,
            "rate": self.opts.rate,
            "loops": self.opts.loops,
            "keyed_share": self.opts.keyed_share,
            "sabotage": self.opts.sabotage,
        }

    async def supervise(self, slot: Slot) -> None:
        """Run one child slot: start it, and restart it whenever it dies before the end."""
        while True:
            slot.incarnation += 1
            slot.label = f"{slot.role[0]}{slot.index}.{slot.incarnation}"
            slot.killed_by_us = False
            slot.frozen = False
            slot.started_at = time.time()
            self.labels.append((slot.role, slot.label))
            spec = json.dumps(self._spec(slot))
            log = _open_log(self.run_dir / f"{slot.label}.log")
            try:
                slot.proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "benchmarks.chaos._child", "--spec", spec],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=os.getcwd(),  # children import what the parent imported
                )
            finally:
                os.close(log)
            try:
                rc = await slot.proc.wait()
            finally:
                with trio.CancelScope(shield=True):
                    if slot.proc.returncode is None:
                        slot.proc.kill()
                        await slot.proc.wait()
            if rc != 0 and not slot.killed_by_us:
                tail = (self.run_dir / f"{slot.label}.log").read_text(errors="replace")
                last = tail.strip().splitlines()[-1:] or ["(no output)"]
                self.crashes.append(f"{slot.label} exit {rc}: {last[0][:120]}")
                self.note(f"child {slot.label} exited {rc}")
            if self.ending or (slot.role == "pub" and self.pubs_stopping):
                return
            if slot.role == "sub" and rc == 0:  # it finished its final catch-up
                return
            await trio.sleep(
                random.Random(f"{self.opts.seed}/{slot.label}/respawn").uniform(0.3, 1.5)
            )

    def running(self, role: str | None = None) -> list[Slot]:
        return [s for s in self.slots if s.alive() and (role is None or s.role == role)]

    def client_fault_candidates(self, role: str) -> list[Slot]:
        """Children a freeze or kill may hit now.

        A publisher only while enough others stay healthy (running, not frozen, up for
        5 s): a stall is then chatbus's doing, not the harness having stopped every
        publisher of a stream.
        """
        healthy = [
            s for s in self.running(role) if not s.frozen and time.time() - s.started_at > 5
        ]
        if role == "pub" and len(healthy) - 1 < max(1, (self.opts.publishers + 1) // 2):
            return []
        return healthy

    # -- faults --------------------------------------------------------------------

    def _window(self, kind: str, start: float, end: float, target: str = "") -> None:
        exempt = end + GRACE[kind] if kind in GRACE else start
        self.windows.append(
            check.FaultWindow(kind=kind, start=start, end=end, exempt_until=exempt, target=target)
        )

    async def fault(self, kind: str, chaos_end: float) -> None:
        """Inflict one fault; faults with a duration end by ``chaos_end``."""
        rng = self.rng
        start = time.time()
        if kind in ("terminate", "blackhole", "restart"):
            if self.server_lock.locked():
                self.fault_counts[f"{kind} (skipped, busy)"] += 1
                return
            async with self.server_lock:
                duration = min(rng.uniform(3, 10), max(0.5, chaos_end - time.time()))
                ports = self.proxy.upstream_ports()
                start = time.time()
                what = "cancelled"
                try:
                    with trio.fail_after(duration + 60):
                        what = await self.backend.server_fault(kind, ports, duration, rng)
                except Exception as exc:  # a failed fault is logged, not fatal
                    what = f"failed: {type(exc).__name__}: {exc}"
                finally:  # recorded even when cancelled: it excuses stalls
                    self.note(f"{kind}: {what}")
                    self._window(kind, start, time.time())
        elif kind == "freeze":
            # Mostly publishers, long enough to outlast --max-stall: a publisher frozen
            # inside a transaction must not stall the stream for the other clients.
            role = "pub" if rng.random() < 0.8 else "sub"
            candidates = self.client_fault_candidates(role)
            if not candidates:
                self.fault_counts[f"{kind} (skipped, busy)"] += 1
                return
            slot = rng.choice(candidates)
            duration = min(rng.uniform(6, 10), max(0.5, chaos_end - time.time()))
            slot.frozen = True
            assert slot.proc is not None
            resume_watchdog([slot.proc.pid], duration + 3)
            try:
                slot.signal(signal.SIGSTOP)
                await trio.sleep(min(1.0, duration))
                # What the frozen client left open on the server, e.g. a transaction
                # holding a stream's row lock ("idle in transaction").
                ports = self.proxy.upstream_ports(slot.key)
                states: dict[str, int] = {}
                with contextlib.suppress(Exception), trio.move_on_after(2):
                    states = await self.backend.session_states(ports)
                held = ", ".join(f"{n} {k}" for k, n in sorted(states.items()))
                self.note(f"freeze {slot.label} for {duration:.1f} s; its sessions: {held}")
                if states.get("idle in transaction") or states.get("active"):
                    # A session mid-transaction or mid-statement, waiting on this client.
                    self.fault_counts["freeze with server work pending"] += 1
                await trio.sleep(max(0.0, duration - 1.0))
            finally:
                slot.signal(signal.SIGCONT)
                slot.frozen = False
            self._window(kind, start, time.time(), slot.label)
        elif kind == "kill":
            candidates = self.client_fault_candidates("pub")
            if not candidates:
                self.fault_counts[f"{kind} (skipped, busy)"] += 1
                return
            slot = rng.choice(candidates)
            slot.killed_by_us = True
            slot.signal(signal.SIGKILL)
            self.note(f"SIGKILL {slot.label}")
            self._window(kind, start, start, slot.label)
        elif kind == "proxy_drop":
            self.proxy.arm()
            self._window(kind, start, start)
        self.fault_counts[kind] += 1

    async def fault_schedule(self, chaos_end: float) -> None:
        rng = self.rng
        kinds = {"proxy_drop": 5.0, "terminate": 1.5, "blackhole": 1.0, "freeze": 3.0, "kill": 1.5}
        kinds = {k: w for k, w in kinds.items() if k in self.opts.faults}
        restarts: list[float] = []
        if self.opts.allow_restart and "restart" in self.opts.faults:
            span = chaos_end - time.time()
            n = max(1, int(self.opts.minutes / 2))
            restarts = sorted(time.time() + rng.uniform(0.25, 0.75) * span for _ in range(n))
        async with trio.open_nursery() as nursery:
            await trio.sleep(3)  # let the children connect first
            while kinds and time.time() < chaos_end - 2:
                await trio.sleep(rng.uniform(1.0, 4.0))
                if restarts and time.time() >= restarts[0]:
                    restarts.pop(0)
                    kind = "restart"
                else:
                    kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
                nursery.start_soon(self.fault, kind, chaos_end)
            nursery.cancel_scope.deadline = trio.current_time() + 12

    def resume_everything(self) -> None:
        self.backend.resume_all()
        for s in self.slots:
            s.signal(signal.SIGCONT)
            s.frozen = False

    # -- the run -------------------------------------------------------------------

    async def wait_role(self, role: str, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            for slot in self.running(role):
                assert slot.proc is not None
                await slot.proc.wait()
            return True
        return False

    async def run(self) -> int:
        opts = self.opts
        total = opts.minutes * 60
        t0 = time.time()
        tail = min(30.0, max(12.0, total * 0.25))
        chaos_end = t0 + max(10.0, total - tail)
        self.deadline = t0 + total + 45
        await self.backend.prepare()
        self.note(f"run dir {self.run_dir}; {self.backend.describe()}")
        async with trio.open_nursery() as nursery:
            self.slots = [Slot("pub", i) for i in range(opts.publishers)] + [
                Slot("sub", i) for i in range(opts.subscribers)
            ]
            for slot in self.slots:
                await nursery.start(self.proxy.serve, slot.key, slot.role)
            supervisors = trio.CancelScope()

            async def supervise_all() -> None:
                with supervisors:
                    async with trio.open_nursery() as sup:
                        for slot in self.slots:
                            sup.start_soon(self.supervise, slot)

            nursery.start_soon(supervise_all)
            try:
                await self.fault_schedule(chaos_end)
                await trio.sleep_until(trio.current_time() + max(0.0, chaos_end - time.time()))
            finally:
                self.resume_everything()
            self.note("chaos over; stopping publishers")
            await trio.sleep(2)
            self.pubs_stopping = True
            (self.run_dir / "stop-pub").write_text("stop")
            if not await self.wait_role("pub", 12):
                self.note("publishers did not stop in 12 s; killed")
                for s in self.running("pub"):
                    s.killed_by_us = True
                    s.signal(signal.SIGKILL)
            heads = await self.backend.heads(STREAMS)
            tmp = self.run_dir / "stop-sub.tmp"
            tmp.write_text(json.dumps(heads))
            tmp.rename(self.run_dir / "stop-sub")
            self.note(f"final heads {heads}; waiting for subscribers")
            if not await self.wait_role("sub", 20):
                self.note("subscribers did not finish in 20 s; killed")
            self.ending = True
            for s in self.running():
                s.killed_by_us = True
                s.signal(signal.SIGKILL)
            supervisors.cancel()
            nursery.cancel_scope.cancel()
        self.stopped_at = time.time()
        return await self.evaluate(t0, chaos_end)

    # -- evaluation ----------------------------------------------------------------

    async def evaluate(self, t0: float, chaos_end: float) -> int:
        snapshot = await self.backend.snapshot(STREAMS)
        acks: list[check.Ack] = []
        violations: list[check.Violation] = []
        segments: list[check.Segment] = []
        finals: list[check.FinalReport] = []
        mem: list[check.MemSample] = []
        outcomes: Counter[str] = Counter()
        unexpected: Counter[str] = Counter()
        session_errors: Counter[str] = Counter()
        sub_delivered = 0
        resubscribes = 0
        for role, label in self.labels:
            path = self.run_dir / f"{label}.jsonl"
            if not path.exists():
                continue
            last_subs: dict[int, tuple[int, int]] = {}
            for line in path.read_text(errors="replace").splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut by SIGKILL
                t = r.get("t")
                if t == "ack":
                    acks.append(
                        check.Ack(
                            token=r["tok"], stream=r["s"], id=r["id"], keyed=r["k"], ts=r["ts"]
                        )
                    )
                    outcomes["acked keyed" if r["k"] else "acked unkeyed"] += 1
                elif t == "err":
                    outcomes[f"{role} {r['kind']}"] += 1
                elif t == "unknown":
                    outcomes["outcome unknown"] += 1
                elif t == "exc":
                    session_errors[r["type"]] += 1
                    if not r.get("documented", True):
                        unexpected[f"{r['type']}: {r['msg'][:60]}"] += 1
                elif t == "viol":
                    violations.append(
                        check.Violation(
                            label=label,
                            stream=r["s"],
                            kind=r["kind"],
                            expected=r["expected"],
                            got=r["got"],
                        )
                    )
                elif t == "seg":
                    segments.append(
                        check.Segment(
                            label=label,
                            stream=r["s"],
                            first=r["first"],
                            last=r["last"],
                            digest=r["digest"],
                        )
                    )
                    sub_delivered += r["last"] - r["first"] + 1
                elif t == "subs":
                    last_subs[r["s"]] = (r["delivered"], r["resubscribes"])
                elif t == "final":
                    reached = {int(k): bool(v) for k, v in r["reached"].items()}
                    finals.append(check.FinalReport(label=label, reached=reached))
                elif t == "mem":
                    mem.append(check.MemSample(label=label, ts=r["ts"], rss=r["rss"]))
                elif t == "crash":
                    unexpected[f"crash {r['msg'][:80]}"] += 1
            resubscribes += sum(v[1] for v in last_subs.values())
        final_subs = [s.label for s in self.slots if s.role == "sub"]
        per_stream = check.stalls(
            acks, self.windows, streams=len(STREAMS), start=t0, end=chaos_end
        )
        invariants = [
            check.check_workload(len(acks), sub_delivered),
            check.check_dense_ids(snapshot),
            check.check_acks(snapshot, acks),
            check.check_duplicates(snapshot),
            check.check_keys(snapshot),
            check.check_subscriber_order(violations, sub_delivered),
            check.check_segments(snapshot, segments),
            check.check_caught_up(finals, final_subs, len(STREAMS)),
            check.check_created_at(snapshot),
            check.check_stalls(per_stream, self.windows, limit=self.opts.max_stall),
            check.check_memory(mem),
            check.check_errors(unexpected, self.crashes),
        ]
        faults = dict(sorted(self.fault_counts.items()))
        faults["replies cut by proxy"] = self.proxy.dropped
        faults["children restarted"] = len(self.labels) - len(self.slots)
        traffic = {
            "stored": len(snapshot.messages),
            "subscriber deliveries": sub_delivered,
            "subscriptions": resubscribes,
            "proxy connections": self.proxy.accepted,
        }
        failed = [inv.name for inv in invariants if not inv.passed]
        elapsed = self.stopped_at - t0
        print(
            f"chatbus chaos soak: seed {self.opts.seed}, {self.opts.minutes:g} min, "
            f"{self.backend.describe()}, {elapsed:.0f} s to the end of the traffic"
        )
        print(counts("faults", faults))
        print(counts("publishes", dict(sorted(outcomes.items()))))
        print(counts("session errors", dict(sorted(session_errors.items()))))
        print(counts("traffic", traffic))
        print(
            counts(
                "stall per stream, s", {f"s{s}": f"{v.seconds:.1f}" for s, v in per_stream.items()}
            )
        )
        print()
        print(table(invariants))
        print()
        print(
            f"{len(invariants) - len(failed)} of {len(invariants)} invariants held"
            + (f"; FAILED: {', '.join(failed)}" if failed else "")
        )
        if self.opts.json_path is not None:
            write_json(
                self.opts.json_path,
                {
                    "seed": self.opts.seed,
                    "minutes": self.opts.minutes,
                    "backend": self.backend.describe(),
                    "streams": list(STREAMS),
                    "invariants": [invariant_json(i) for i in invariants],
                    "faults": faults,
                    "publishes": dict(outcomes),
                    "session_errors": dict(session_errors),
                    "traffic": traffic,
                    "stalls": {str(s): v.seconds for s, v in per_stream.items()},
                    "crashes": self.crashes,
                    "log": self.log,
                    "passed": not failed,
                },
            )
        return 1 if failed else 0


async def _main(opts: Options) -> int:
    module = backend_module(opts.url)
    run_id = f"{opts.seed}_{os.getpid()}_{secrets.token_hex(3)}"
    backend: Backend = module.make_backend(opts.url, run_id, options={"cluster": opts.cluster})
    run_dir = Path(tempfile.mkdtemp(prefix=f"chatbus-chaos-{run_id}-"))
    soak = Soak(
        opts=opts,
        backend=backend,
        run_dir=run_dir,
        rng=random.Random(opts.seed),
        proxy=Proxy(upstream=backend.upstream),
    )
    rc = 2
    try:
        with trio.move_on_after(opts.minutes * 60 + 50) as guard:
            rc = await soak.run()
        if guard.cancelled_caught:
            print("chaos soak: hit its hard time limit", file=sys.stderr)
    finally:
        with trio.move_on_after(20, shield=True):
            soak.resume_everything()
            for s in soak.slots:
                s.signal(signal.SIGKILL)
            if not opts.keep:
                with contextlib.suppress(Exception):
                    await backend.drop()
        if opts.keep:
            print(f"kept: run dir {run_dir}, {backend.describe()}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return rc


def run(opts: Options) -> int:
    """Run one soak; the exit status: 0 if every invariant held, 1 if not, 2 if no verdict."""
    return trio.run(_main, opts)
