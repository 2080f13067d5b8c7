"""A publisher or subscriber OS process of the soak: ``python -m benchmarks.chaos._child``.

It runs trio, opens a bus through the backend module named in its config, and writes
what it observes as JSON lines to its result file with unbuffered ``os.write`` (so a
SIGKILL loses nothing already written). It polls a stop file, and exits on its own at
its deadline whatever the parent does.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

import chatbus

OutcomeUnknown: type[BaseException] | None = getattr(chatbus, "OutcomeUnknown", None)


@attrs.define(eq=False)
class Recorder:
    """Appends JSON lines to the result file, one ``write`` each."""

    fd: int

    def put(self, **record: Any) -> None:
        os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


@attrs.define(eq=False)
class Context:
    role: str
    label: str
    streams: Sequence[str]
    config: dict[str, Any]
    module: str
    rng: random.Random
    out: Recorder
    stop_path: str
    deadline: float  # time.time()
    rate: float  # publishes per second per loop
    loops: int
    keyed_share: float
    sabotage: bool = False  # self-test: corrupt our own observations on purpose
    stopping: bool = False
    final_heads: dict[int, int] | None = None
    sub_states: list[SubState] = attrs.field(factory=list)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _poll_stop(ctx: Context) -> None:
    # A tiny local file, polled every couple of seconds: blocking is harmless here.
    if not os.path.exists(ctx.stop_path):
        return
    ctx.stopping = True
    if ctx.role == "sub":
        with open(ctx.stop_path) as f:
            ctx.final_heads = {int(k): int(v) for k, v in json.load(f).items()}


async def _watch(ctx: Context, cancel: trio.CancelScope) -> None:
    """Memory samples, the stop file and the deadline."""
    while True:
        ctx.out.put(t="mem", ts=time.time(), rss=_rss())
        if not ctx.stopping:
            _poll_stop(ctx)
        for st in ctx.sub_states:
            _check_reached(ctx, st)
        if time.time() > ctx.deadline:
            ctx.out.put(t="exc", where="deadline", type="Deadline", msg="child deadline hit")
            cancel.cancel()
            return
        await trio.sleep(0.25 if ctx.stopping else 2.0)


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "ExceptionGroup[" + ",".join(_error_name(e) for e in exc.exceptions) + "]"
    return type(exc).__name__


def _leaf_text(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_leaf_text(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _documented(exc: BaseException) -> bool:
    return isinstance(exc, chatbus.BusError)


class _TasksFailed(Exception):
    """The harness's own nursery failed: its direct exceptions are chatbus's."""

    def __init__(self, group: BaseExceptionGroup[BaseException]) -> None:
        super().__init__("session tasks failed")
        self.leaves: list[BaseException] = []
        for e in group.exceptions:
            if isinstance(e, _TasksFailed):  # a nested nursery of ours
                self.leaves.extend(e.leaves)
            elif not isinstance(e, trio.Cancelled):
                self.leaves.append(e)


def _record_session_error(ctx: Context, where: str, exc: Exception) -> None:
    leaves: list[BaseException] = exc.leaves if isinstance(exc, _TasksFailed) else [exc]
    for e in leaves:
        ctx.out.put(
            t="exc", where=where, type=_error_name(e), msg=str(e)[:200], documented=_documented(e)
        )


# -- publisher ---------------------------------------------------------------------


@attrs.define(eq=False)
class PubLoop:
    """One publish loop's state; survives bus sessions, so a keyed retry continues."""

    stream: int
    name: str
    index: int  # loops of one stream in one process are told apart by this
    seq: int = 0
    #: (token, keyed, body) awaiting an outcome; a retry resends exactly this body.
    pending: tuple[str, bool, dict[str, Any]] | None = None


async def _publish_one(ctx: Context, pub: chatbus.Publisher, loop: PubLoop) -> None:
    assert loop.pending is not None
    token, keyed, body = loop.pending
    timeout = ctx.rng.uniform(0.0005, 0.03) if ctx.rng.random() < 0.05 else math.inf
    t0 = time.time()
    try:
        with trio.move_on_after(timeout) as cs:
            msg = await pub.publish(body, key=token if keyed else None)
    except trio.Cancelled:
        if not keyed:  # interrupted from outside: outcome unknown, never retried
            ctx.out.put(t="unknown", tok=token)
            loop.pending = None
        raise
    except BaseException as exc:
        if OutcomeUnknown is not None and isinstance(exc, OutcomeUnknown):
            ctx.out.put(t="err", kind="OutcomeUnknown", tok=token, k=keyed, s=loop.stream)
            if not keyed:
                ctx.out.put(t="unknown", tok=token)
                loop.pending = None
            return
        if isinstance(exc, chatbus.StoreError):
            # Documented: nothing was stored. Retried, keyed or not.
            ctx.out.put(t="err", kind="StoreError", tok=token, k=keyed, s=loop.stream)
            await trio.sleep(ctx.rng.uniform(0.01, 0.2))
            return
        if isinstance(exc, chatbus.BusClosed):
            ctx.out.put(t="err", kind="BusClosed", tok=token, k=keyed, s=loop.stream)
            if not keyed:
                ctx.out.put(t="unknown", tok=token)
                loop.pending = None
        raise
    if cs.cancelled_caught:
        ctx.out.put(t="err", kind="cancelled", tok=token, k=keyed, s=loop.stream)
        if not keyed:  # may or may not have committed: never retried
            ctx.out.put(t="unknown", tok=token)
            loop.pending = None
        return
    now = time.time()
    ctx.out.put(t="ack", tok=token, s=loop.stream, id=msg.id, k=keyed, ts=now, lat=now - t0)
    loop.pending = None
    if ctx.sabotage and not keyed:
        r = ctx.rng.random()
        if r < 0.01:  # self-test: publish an acknowledged unkeyed body again
            await pub.publish(body)
        elif r < 0.015:  # self-test: claim the wrong id
            ctx.out.put(t="ack", tok=token, s=loop.stream, id=msg.id + 1, k=keyed, ts=now)


async def _pub_loop(ctx: Context, pub: chatbus.Publisher, loop: PubLoop) -> None:
    while True:
        if loop.pending is None:
            if ctx.stopping:
                return
            await trio.sleep(ctx.rng.uniform(0, 2 / ctx.rate))
            loop.seq += 1
            keyed = ctx.rng.random() < ctx.keyed_share
            token = f"{ctx.label}/{loop.stream}.{loop.index}.{loop.seq}"
            body = {
                "tok": token,
                "w": ctx.label,
                "n": loop.seq,
                "pad": "x" * ctx.rng.randrange(200),
            }
            loop.pending = (token, keyed, body)
        if ctx.stopping:
            # A keyed retry still owed gets one last bounded attempt.
            with trio.move_on_after(3):
                await _publish_one(ctx, pub, loop)
            if loop.pending is not None:
                ctx.out.put(t="unknown", tok=loop.pending[0])
                loop.pending = None
            return
        await _publish_one(ctx, pub, loop)


async def run_publisher(ctx: Context, backend: Any) -> None:
    loops = [
        PubLoop(stream=i, name=s, index=j)
        for i, s in enumerate(ctx.streams)
        for j in range(ctx.loops)
    ]
    while not ctx.stopping:
        try:
            async with backend.open_child_bus(ctx.config) as bus:
                try:
                    async with trio.open_nursery() as nursery:
                        pubs = [await nursery.start(_hold_publisher, bus, n) for n in ctx.streams]
                        try:
                            async with trio.open_nursery() as loop_nursery:
                                for loop in loops:
                                    pub = pubs[loop.stream]
                                    loop_nursery.start_soon(_pub_loop, ctx, pub, loop)
                        except BaseExceptionGroup as group:
                            if group.split(trio.Cancelled)[1] is None:
                                raise
                            raise _TasksFailed(group) from group
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    if group.split(trio.Cancelled)[1] is None:
                        raise
                    raise _TasksFailed(group) from group
        except Exception as exc:
            _record_session_error(ctx, "pub-session", exc)
            await trio.sleep(ctx.rng.uniform(0.2, 1.0))


async def _hold_publisher(
    bus: chatbus.Bus, name: str, *, task_status: trio.TaskStatus[chatbus.Publisher]
) -> None:
    async with bus.open_publisher(name) as pub:
        task_status.started(pub)
        await trio.sleep_forever()


# -- subscriber --------------------------------------------------------------------


@attrs.define(eq=False)
class SubState:
    stream: int
    name: str
    cursor: int = 0
    delivered: int = 0
    resubscribes: int = 0
    reached: bool = False
    scope: trio.CancelScope | None = None


@attrs.define(eq=False)
class _Seg:
    first: int
    last: int
    hasher: Any


def _flush(ctx: Context, st: SubState, seg: _Seg | None) -> None:
    if seg is not None and seg.last >= seg.first:
        digest = seg.hasher.hexdigest()[:16]
        ctx.out.put(t="seg", s=st.stream, first=seg.first, last=seg.last, digest=digest)


def _check_reached(ctx: Context, st: SubState) -> None:
    if ctx.final_heads is not None and st.cursor >= ctx.final_heads.get(st.stream, 0):
        st.reached = True
        if st.scope is not None:
            st.scope.cancel()


async def _subscribe_once(ctx: Context, bus: chatbus.Bus, st: SubState) -> None:
    r = ctx.rng.random()
    if ctx.stopping or r < 0.85:
        after = st.cursor
    elif r < 0.9:
        after = 0
    else:
        after = ctx.rng.randint(0, st.cursor)
    slow = ctx.rng.random() < 0.15
    st.resubscribes += 1
    expected = after + 1
    first = True
    seg: _Seg | None = None
    try:
        async with bus.open_subscriber(st.name, after=after) as sub:
            with trio.move_on_after(ctx.rng.uniform(1.0, 12.0)) as cs:
                st.scope = cs
                _check_reached(ctx, st)
                async for msg in sub:
                    if msg.id != expected:
                        kind = "first" if first else ("gap" if msg.id > expected else "duplicate")
                        ctx.out.put(
                            t="viol", s=st.stream, kind=kind, expected=expected, got=msg.id
                        )
                        _flush(ctx, st, seg)
                        seg = None
                    first = False
                    if ctx.sabotage and ctx.rng.random() < 0.002:
                        continue  # self-test: lose a delivery
                    if seg is None:
                        seg = _Seg(first=msg.id, last=msg.id - 1, hasher=hashlib.sha256())
                    tok = msg.body.get("tok") if isinstance(msg.body, dict) else None
                    if ctx.sabotage and ctx.rng.random() < 0.002:
                        tok = f"{tok}-corrupted"  # self-test: misread a body
                    seg.hasher.update(f"{msg.id}:{tok}\n".encode())
                    seg.last = msg.id
                    expected = msg.id + 1
                    st.cursor = msg.id
                    st.delivered += 1
                    if seg.last - seg.first >= 2000:
                        _flush(ctx, st, seg)
                        seg = None
                    _check_reached(ctx, st)
                    if slow:
                        await trio.sleep(0.002)
    finally:
        st.scope = None
        _flush(ctx, st, seg)


async def _sub_loop(ctx: Context, bus: chatbus.Bus, st: SubState) -> None:
    while not st.reached:
        try:
            await _subscribe_once(ctx, bus, st)
        except chatbus.BusError as exc:
            ctx.out.put(t="err", kind=type(exc).__name__, s=st.stream)
            await trio.sleep(ctx.rng.uniform(0.05, 0.5))
        ctx.out.put(t="subs", s=st.stream, delivered=st.delivered, resubscribes=st.resubscribes)


async def run_subscriber(ctx: Context, backend: Any) -> None:
    states = ctx.sub_states = [SubState(stream=i, name=s) for i, s in enumerate(ctx.streams)]
    while not all(st.reached for st in states):
        try:
            async with backend.open_child_bus(ctx.config) as bus:
                try:
                    async with trio.open_nursery() as nursery:
                        for st in states:
                            nursery.start_soon(_sub_loop, ctx, bus, st)
                except BaseExceptionGroup as group:
                    if group.split(trio.Cancelled)[1] is None:
                        raise
                    raise _TasksFailed(group) from group
        except Exception as exc:
            _record_session_error(ctx, "sub-session", exc)
            await trio.sleep(ctx.rng.uniform(0.2, 1.0))
    ctx.out.put(t="final", reached={str(st.stream): st.reached for st in states})


async def amain(ctx: Context) -> None:
    backend = importlib.import_module(ctx.module)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch, ctx, nursery.cancel_scope)
        if ctx.role == "pub":
            await run_publisher(ctx, backend)
        else:
            await run_subscriber(ctx, backend)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON: the child's whole configuration")
    spec = json.loads(ap.parse_args(argv).spec)
    fd = os.open(spec["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    ctx = Context(
        role=spec["role"],
        label=spec["label"],
        streams=spec["streams"],
        config=spec["config"],
        module=spec["module"],
        rng=random.Random(spec["seed"]),
        out=Recorder(fd),
        stop_path=spec["stop"],
        deadline=spec["deadline"],
        rate=spec["rate"],
        loops=spec["loops"],
        keyed_share=spec["keyed_share"],
        sabotage=spec.get("sabotage", False),
    )
    ctx.out.put(t="start", ts=time.time(), pid=os.getpid())
    try:
        trio.run(amain, ctx)
    except BaseException as exc:
        ctx.out.put(t="crash", type=_error_name(exc), msg=_leaf_text(exc)[:300])
        raise
    ctx.out.put(t="exit", ts=time.time())
    sys.exit(0)


if __name__ == "__main__":
    main()
