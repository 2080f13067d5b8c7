"""The chaos soak's pure invariant checker and its reply-losing proxy (no database).

Each check is shown to pass on a clean history and to fail on a history fabricated to
break exactly its invariant, so a PASS in a soak's table means something.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` does not put the repository root first
    sys.path.insert(0, str(ROOT))

from benchmarks.chaos import _check as check  # noqa: E402
from benchmarks.chaos._proxy import Proxy  # noqa: E402


def _msg(
    stream: int,
    id_: int,
    token: str | None = None,
    *,
    key: str | None = None,
    created: int | None = None,
) -> check.StoredMessage:
    return check.StoredMessage(
        stream=stream,
        id=id_,
        key=key,
        token=token if token is not None else f"t{stream}.{id_}",
        created_micros=created if created is not None else id_ * 1000,
    )


def _clean(n: int = 5) -> check.StoreSnapshot:
    rows = [
        _msg(s, i, key=f"t{s}.{i}" if i % 2 else None) for s in (0, 1) for i in range(1, n + 1)
    ]
    return check.StoreSnapshot(last_ids={0: n, 1: n}, messages=rows)


def _acks(snapshot: check.StoreSnapshot) -> list[check.Ack]:
    return [
        check.Ack(token=m.token or "", stream=m.stream, id=m.id, keyed=m.key is not None, ts=m.id)
        for m in snapshot.messages
    ]


def test_clean_history_passes_every_store_check() -> None:
    snap = _clean()
    for inv in (
        check.check_dense_ids(snap),
        check.check_acks(snap, _acks(snap)),
        check.check_duplicates(snap),
        check.check_keys(snap),
        check.check_created_at(snap),
    ):
        assert inv.passed and inv.violations == 0, inv


def test_dense_ids_catches_gap_duplicate_and_stale_counter() -> None:
    snap = _clean()
    gap = check.StoreSnapshot(
        last_ids=snap.last_ids, messages=[m for m in snap.messages if (m.stream, m.id) != (0, 3)]
    )
    assert check.check_dense_ids(gap).violations == 1
    dup = check.StoreSnapshot(last_ids=snap.last_ids, messages=[*snap.messages, _msg(1, 2, "x")])
    assert check.check_dense_ids(dup).violations == 1
    stale = check.StoreSnapshot(last_ids={0: 5, 1: 4}, messages=snap.messages)
    inv = check.check_dense_ids(stale)
    assert not inv.passed and "counter 4 vs max 5" in inv.detail


def test_acks_catch_lost_wrong_id_and_conflicting() -> None:
    snap = _clean()
    acks = _acks(snap)
    lost = [*acks, check.Ack(token="never-stored", stream=0, id=9, keyed=False, ts=0)]
    assert check.check_acks(snap, lost).violations == 1
    moved = [*acks[:-1], check.Ack(token=acks[-1].token, stream=1, id=1, keyed=False, ts=0)]
    assert check.check_acks(snap, moved).violations == 1
    twice = [*acks, check.Ack(token=acks[0].token, stream=0, id=2, keyed=True, ts=0)]
    inv = check.check_acks(snap, twice)
    assert inv.violations == 1 and "acked twice" in inv.detail


def test_duplicate_token_is_reported() -> None:
    snap = _clean()
    rows = [*snap.messages, _msg(0, 6, "t0.2")]  # a retried publish that had committed
    inv = check.check_duplicates(check.StoreSnapshot(last_ids={0: 6, 1: 5}, messages=rows))
    assert inv.violations == 1 and "t0.2" in inv.detail
    foreign = [
        *snap.messages,
        check.StoredMessage(stream=0, id=6, key=None, token=None, created_micros=0),
    ]
    assert (
        check.check_duplicates(
            check.StoreSnapshot(last_ids={0: 6, 1: 5}, messages=foreign)
        ).violations
        == 1
    )


def test_key_must_be_the_token() -> None:
    snap = check.StoreSnapshot(last_ids={0: 1}, messages=[_msg(0, 1, "a", key="b")])
    assert check.check_keys(snap).violations == 1


def test_created_at_going_backwards_is_counted() -> None:
    rows = [_msg(0, 1, created=100), _msg(0, 2, created=90), _msg(0, 3, created=95)]
    inv = check.check_created_at(check.StoreSnapshot(last_ids={0: 3}, messages=rows))
    assert inv.violations == 1 and "step back" in inv.detail


def test_subscriber_order_and_content() -> None:
    assert check.check_subscriber_order([], 10).passed
    v = check.Violation(label="s0.0", stream=1, kind="gap", expected=4, got=6)
    inv = check.check_subscriber_order([v], 10)
    assert inv.violations == 1 and "1 gap" in inv.detail

    snap = _clean()
    good = check.segment_digest((i, f"t0.{i}") for i in range(2, 5))
    seg = check.Segment(label="s0.0", stream=0, first=2, last=4, digest=good)
    assert check.check_segments(snap, [seg]).passed
    bad = check.segment_digest([(2, "t0.2"), (3, "t0.4"), (4, "t0.3")])  # swapped bodies
    seg_bad = check.Segment(label="s0.0", stream=0, first=2, last=4, digest=bad)
    assert check.check_segments(snap, [seg, seg_bad]).violations == 1


def test_caught_up() -> None:
    ok = check.FinalReport(label="s0.0", reached={0: True, 1: True})
    assert check.check_caught_up([ok], ["s0.0"], 2).passed
    behind = check.FinalReport(label="s0.0", reached={0: True, 1: False})
    assert check.check_caught_up([behind], ["s0.0"], 2).violations == 1
    assert check.check_caught_up([], ["s0.0"], 2).violations == 2


def test_stalls_excused_only_by_server_faults() -> None:
    acks = [check.Ack(token=str(t), stream=0, id=1, keyed=False, ts=t) for t in (0, 1, 2, 10, 11)]
    stall = check.stalls(acks, [], streams=1, start=0, end=11)
    assert stall[0].seconds == 8
    assert check.check_stalls(stall, [], limit=5).violations == 1
    # A server fault over the gap excuses it ...
    server = check.FaultWindow(kind="terminate", start=2.5, end=3, exempt_until=9.5)
    excused = check.stalls(acks, [server], streams=1, start=0, end=11)
    assert excused[0].seconds == 1.0 and check.check_stalls(excused, [server], limit=5).passed
    # ... a frozen client does not, and the detail names it.
    freeze = check.FaultWindow(kind="freeze", start=2.5, end=9, exempt_until=2.5, target="p1.0")
    inv = check.check_stalls(
        check.stalls(acks, [freeze], streams=1, start=0, end=11), [freeze], limit=5
    )
    assert inv.violations == 1 and "freeze p1.0" in inv.detail
    # A stream that never got a publish stalled for the whole run.
    assert check.stalls([], [], streams=1, start=0, end=11)[0].seconds == 11


def test_memory_growth_and_errors_and_workload() -> None:
    flat = [check.MemSample(label="p0.0", ts=t, rss=100 * check.MIB) for t in range(0, 60, 2)]
    assert check.check_memory(flat).passed
    growing = [
        check.MemSample(label="p0.0", ts=t, rss=(100 + 3 * t) * check.MIB) for t in range(0, 60, 2)
    ]
    assert check.check_memory(growing).violations == 1
    assert check.check_errors({}, []).passed
    assert check.check_errors({"ExceptionGroup[OSError]": 2}, ["p0.0 exit 1"]).violations == 3
    assert check.check_workload(10, 5).passed
    assert check.check_workload(10, 0).violations == 1


async def test_proxy_forwards_then_loses_a_reply_after_the_server_acted() -> None:
    seen: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        async for data in stream:
            seen.append(data)
            await stream.send_all(b"reply:" + data)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            proxy = Proxy(upstream=("127.0.0.1", port))
            pub_port = await nursery.start(proxy.serve, "p0", "pub")

            client = await trio.open_tcp_stream("127.0.0.1", pub_port)
            await client.send_all(b"SELECT 1")
            assert await client.receive_some(100) == b"reply:SELECT 1"
            assert len(proxy.upstream_ports()) == len(proxy.upstream_ports("p0")) == 1

            proxy.arm()
            await client.send_all(b'INSERT {"tok": "w/1"}')  # a publish: reply is lost
            assert await client.receive_some(100) == b""  # connection closed, no reply
            assert seen[-1] == b'INSERT {"tok": "w/1"}'  # ... but the server had it
            assert proxy.dropped == 1
            await client.aclose()
            nursery.cancel_scope.cancel()
