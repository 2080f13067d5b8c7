"""The invariants, checked over plain data: no I/O, no backend, unit-tested alone.

Everything the soak learns (the store's final rows, the publishers' acknowledgements,
the subscribers' observations, the fault windows, memory samples) arrives here as
values; each check returns an :class:`Invariant` row with a count of violations.
"""

from __future__ import annotations

import hashlib
import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import attrs

MIB = 1024 * 1024


@attrs.frozen(kw_only=True)
class StoredMessage:
    """One row of the store, as the backend's reader returns it."""

    stream: int  # index into the run's stream list
    id: int
    key: str | None
    token: str | None  # the body's "tok", None if the body is not a harness body
    created_micros: int  # created_at, µs since the epoch


@attrs.frozen(kw_only=True)
class StoreSnapshot:
    """The store's state at the end: per-stream counters and every message."""

    last_ids: Mapping[int, int]
    messages: Sequence[StoredMessage]


@attrs.frozen(kw_only=True)
class Ack:
    """A publish that returned: the token and the id it was acknowledged with."""

    token: str
    stream: int
    id: int
    keyed: bool
    ts: float  # wall clock when publish() returned


@attrs.frozen(kw_only=True)
class Violation:
    """An in-process delivery violation a subscriber saw."""

    label: str
    stream: int
    kind: str  # "gap", "duplicate", "first" (first id is not after + 1)
    expected: int
    got: int


@attrs.frozen(kw_only=True)
class Segment:
    """A contiguous run of ids a subscription delivered, and a digest of their tokens."""

    label: str
    stream: int
    first: int
    last: int
    digest: str


@attrs.frozen(kw_only=True)
class FinalReport:
    """Whether a subscriber process reached the final head of each stream."""

    label: str
    reached: Mapping[int, bool]


@attrs.frozen(kw_only=True)
class MemSample:
    """One resident-set-size sample of a child process incarnation."""

    label: str
    ts: float
    rss: int


@attrs.frozen(kw_only=True)
class FaultWindow:
    """A fault's time window; ``exempt_until`` > ``start`` excuses publish stalls."""

    kind: str
    start: float
    end: float
    exempt_until: float
    target: str = ""


@attrs.frozen(kw_only=True)
class Invariant:
    """One row of the result table."""

    name: str
    checked: int
    violations: int
    detail: str = ""
    informational: bool = False  # reported, never fails the run

    @property
    def passed(self) -> bool:
        return self.informational or self.violations == 0


def segment_digest(rows: Iterable[tuple[int, str | None]]) -> str:
    """The digest a subscriber computes over ``(id, token)`` in delivery order."""
    h = hashlib.sha256()
    for id_, token in rows:
        h.update(f"{id_}:{token}\n".encode())
    return h.hexdigest()[:16]


def _by_stream(messages: Iterable[StoredMessage]) -> dict[int, list[StoredMessage]]:
    out: dict[int, list[StoredMessage]] = defaultdict(list)
    for m in messages:
        out[m.stream].append(m)
    for rows in out.values():
        rows.sort(key=lambda m: m.id)
    return out


def check_dense_ids(snapshot: StoreSnapshot) -> Invariant:
    """Ids are exactly 1..last_id in every stream, and the counter says last_id."""
    rows = _by_stream(snapshot.messages)
    bad = 0
    notes: list[str] = []
    streams = set(rows) | set(snapshot.last_ids)
    for s in sorted(streams):
        ids = [m.id for m in rows.get(s, [])]
        last = snapshot.last_ids.get(s, 0)
        top = ids[-1] if ids else 0
        want = set(range(1, last + 1))
        have = set(ids)
        missing = len(want - have)
        extra = len(have - want) + (len(ids) - len(have))
        stale = 1 if top != last else 0
        if missing or extra or stale:
            bad += missing + extra + stale
            notes.append(f"s{s}: {missing} missing, {extra} extra, counter {last} vs max {top}")
    return Invariant(
        name="dense ids 1..last_id per stream",
        checked=len(snapshot.messages),
        violations=bad,
        detail="; ".join(notes[:3]),
    )


def check_acks(snapshot: StoreSnapshot, acks: Sequence[Ack]) -> Invariant:
    """Every acknowledged token is stored exactly once, at the id it was acked with."""
    where: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for m in snapshot.messages:
        if m.token is not None:
            where[m.token].append((m.stream, m.id))
    bad = 0
    lost = wrong = conflicting = 0
    acked: dict[str, tuple[int, int]] = {}
    for a in acks:
        prev = acked.setdefault(a.token, (a.stream, a.id))
        if prev != (a.stream, a.id):
            conflicting += 1
            continue
        found = where.get(a.token, [])
        if not found:
            lost += 1
        elif (a.stream, a.id) not in found:
            wrong += 1
    bad = lost + wrong + conflicting
    detail = f"{lost} lost, {wrong} at another id, {conflicting} acked twice differently"
    return Invariant(
        name="acked publish stored, at its acked id",
        checked=len(acks),
        violations=bad,
        detail=detail if bad else "",
    )


def check_duplicates(snapshot: StoreSnapshot) -> Invariant:
    """No token is stored twice (a retry after an error that had in fact committed)."""
    counts = Counter(m.token for m in snapshot.messages if m.token is not None)
    dup_tokens = [t for t, c in counts.items() if c > 1]
    extra = sum(counts[t] - 1 for t in dup_tokens)
    keyed_dups = sum(
        1 for m in snapshot.messages if m.key is not None and counts.get(m.token or "", 0) > 1
    )
    foreign = sum(1 for m in snapshot.messages if m.token is None)
    detail = ""
    if dup_tokens:
        detail = f"{len(dup_tokens)} tokens stored more than once ({keyed_dups} keyed rows)"
        detail += f", e.g. {sorted(dup_tokens)[:2]}"
    if foreign:
        detail += f"; {foreign} rows without a harness token"
    return Invariant(
        name="no token stored twice",
        checked=len(counts),
        violations=extra + foreign,
        detail=detail.lstrip("; "),
    )


def check_keys(snapshot: StoreSnapshot) -> Invariant:
    """A keyed row's key is its body's token (the publisher uses the token as key)."""
    keyed = [m for m in snapshot.messages if m.key is not None]
    bad = [m for m in keyed if m.key != m.token]
    return Invariant(
        name="keyed rows carry their own key",
        checked=len(keyed),
        violations=len(bad),
        detail=f"e.g. s{bad[0].stream} id {bad[0].id}" if bad else "",
    )


def check_subscriber_order(violations: Sequence[Violation], delivered: int) -> Invariant:
    """Every subscription yielded after+1, after+2, … with no gap, duplicate or reorder."""
    kinds = Counter(v.kind for v in violations)
    detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    if violations:
        v = violations[0]
        detail += f"; first: {v.label} s{v.stream} expected {v.expected} got {v.got}"
    return Invariant(
        name="subscriptions contiguous, in order, no dups",
        checked=delivered,
        violations=len(violations),
        detail=detail,
    )


def check_segments(snapshot: StoreSnapshot, segments: Sequence[Segment]) -> Invariant:
    """What subscribers delivered is what the store holds at those ids."""
    rows = {(m.stream, m.id): m.token for m in snapshot.messages}
    bad = 0
    first_bad = ""
    for seg in segments:
        expect = segment_digest(
            (i, rows.get((seg.stream, i))) for i in range(seg.first, seg.last + 1)
        )
        if expect != seg.digest:
            bad += 1
            first_bad = first_bad or f"{seg.label} s{seg.stream} ids {seg.first}..{seg.last}"
    return Invariant(
        name="delivered content matches the store",
        checked=len(segments),
        violations=bad,
        detail=f"first mismatch: {first_bad}" if bad else "",
    )


def check_caught_up(
    finals: Sequence[FinalReport], expected_labels: Sequence[str], streams: int
) -> Invariant:
    """At the end every subscriber process reached every stream's head."""
    by_label = {f.label: f for f in finals}
    bad = 0
    notes: list[str] = []
    for label in expected_labels:
        f = by_label.get(label)
        if f is None:
            bad += streams
            notes.append(f"{label}: no final report")
            continue
        missed = [s for s in range(streams) if not f.reached.get(s, False)]
        bad += len(missed)
        if missed:
            notes.append(f"{label}: behind on s{missed}")
    return Invariant(
        name="subscribers reach the final head",
        checked=len(expected_labels) * streams,
        violations=bad,
        detail="; ".join(notes[:3]),
    )


def check_created_at(snapshot: StoreSnapshot) -> Invariant:
    """``created_at`` never goes backwards in id order within a stream."""
    bad = 0
    worst = 0
    for rows in _by_stream(snapshot.messages).values():
        for prev, cur in itertools.pairwise(rows):
            if cur.created_micros < prev.created_micros:
                bad += 1
                worst = max(worst, prev.created_micros - cur.created_micros)
    return Invariant(
        name="created_at non-decreasing in id order",
        checked=len(snapshot.messages),
        violations=bad,
        detail=f"worst step back {worst / 1000:.1f} ms" if bad else "",
    )


def _merge(windows: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(windows):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _uncovered(a: float, b: float, cover: Sequence[tuple[float, float]]) -> float:
    total = b - a
    for x, y in cover:
        lo, hi = max(a, x), min(b, y)
        if hi > lo:
            total -= hi - lo
    return total


@attrs.frozen(kw_only=True)
class Stall:
    """A stream's longest time without an acknowledged publish, outside exempt faults."""

    seconds: float
    start: float
    end: float


def stalls(
    acks: Sequence[Ack],
    faults: Sequence[FaultWindow],
    *,
    streams: int,
    start: float,
    end: float,
) -> dict[int, Stall]:
    """Per stream, the longest time with no acknowledged publish outside exempt faults.

    Measured from the stream's first ack (start-up is not a stall) to ``end``.
    """
    cover = _merge((f.start, f.exempt_until) for f in faults if f.exempt_until > f.start)
    times: dict[int, list[float]] = defaultdict(list)
    for a in acks:
        if start <= a.ts <= end:
            times[a.stream].append(a.ts)
    out: dict[int, Stall] = {}
    for s in range(streams):
        ts = sorted(times.get(s, []))
        edges = [*ts, end] if ts else [start, end]
        worst = Stall(seconds=0.0, start=edges[0], end=edges[0])
        for x, y in itertools.pairwise(edges):
            gap = _uncovered(x, y, cover)
            if gap > worst.seconds:
                worst = Stall(seconds=gap, start=x, end=y)
        out[s] = worst
    return out


def check_stalls(
    per_stream: Mapping[int, Stall], faults: Sequence[FaultWindow], *, limit: float
) -> Invariant:
    """No stream goes more than ``limit`` seconds without a publish, outside server faults.

    The detail names the faults that overlapped each stall (client-side faults excuse
    nothing: a frozen or killed client must not stall the others).
    """
    bad = {s: v for s, v in per_stream.items() if v.seconds > limit}
    worst = max((v.seconds for v in per_stream.values()), default=0.0)
    detail = f"worst {worst:.1f} s (limit {limit:g} s)"
    notes = []
    for s, v in sorted(bad.items(), key=lambda kv: -kv[1].seconds)[:2]:
        during = Counter(
            f"{f.kind} {f.target}".strip() for f in faults if f.start < v.end and f.end > v.start
        )
        named = ", ".join(k for k, _ in during.most_common(3))
        notes.append(f"s{s} {v.seconds:.1f} s" + (f" during {named}" if named else ""))
    if len(bad) > 2:
        notes.append(f"{len(bad) - 2} more streams")
    if notes:
        detail += "; " + "; ".join(notes)
    return Invariant(
        name="no publish stall outside server faults",
        checked=len(per_stream),
        violations=len(bad),
        detail=detail,
    )


def check_workload(acks: int, deliveries: int) -> Invariant:
    """The run did something: publishes were acknowledged and subscribers got messages."""
    missing = [what for what, n in (("acks", acks), ("deliveries", deliveries)) if n == 0]
    return Invariant(
        name="workload ran (acks and deliveries)",
        checked=2,
        violations=len(missing),
        detail=f"no {' and no '.join(missing)}"
        if missing
        else f"{acks:,} acks, {deliveries:,} deliveries",
    )


def check_memory(
    samples: Sequence[MemSample], *, min_span: float = 20.0, limit: int = 32 * MIB
) -> Invariant:
    """Each child's RSS is roughly flat: last third's median vs the middle third's."""
    by_label: dict[str, list[MemSample]] = defaultdict(list)
    for m in samples:
        by_label[m.label].append(m)
    checked = bad = 0
    worst = (0, "")
    for label, ms in sorted(by_label.items()):
        ms.sort(key=lambda m: m.ts)
        span = ms[-1].ts - ms[0].ts
        if span < min_span or len(ms) < 6:
            continue
        checked += 1
        t1 = ms[0].ts + span / 3
        t2 = ms[0].ts + 2 * span / 3
        middle = statistics.median(m.rss for m in ms if t1 <= m.ts < t2)
        last = statistics.median(m.rss for m in ms if m.ts >= t2)
        growth = int(last - middle)
        if growth > worst[0]:
            worst = (growth, label)
        if growth > max(limit, middle // 4):
            bad += 1
    detail = f"worst growth {worst[0] / MIB:.1f} MiB ({worst[1]})" if worst[1] else ""
    return Invariant(
        name="child memory roughly flat",
        checked=checked,
        violations=bad,
        detail=detail or "no incarnation lived long enough",
    )


def check_errors(unexpected: Mapping[str, int], crashes: Sequence[str]) -> Invariant:
    """Children saw only documented errors (chatbus.BusError) and never crashed."""
    n = sum(unexpected.values()) + len(crashes)
    parts = [f"{k} x{v}" for k, v in sorted(unexpected.items())] + list(crashes[:3])
    return Invariant(
        name="only documented errors, no child crash",
        checked=n,
        violations=n,
        detail="; ".join(parts)[:200],
    )
