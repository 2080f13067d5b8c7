"""The merge logic: unit tests of the pure state, and a property test of the whole loop."""

from __future__ import annotations

import datetime

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import chatbus
from chatbus._cache import DurableCache
from chatbus._merge import MergeState
from chatbus.memory import MemoryStore


def msg(i: int) -> chatbus.Message:
    return chatbus.Message(
        stream="s", id=i, body=i, key=None, created_at=datetime.datetime.now(datetime.UTC)
    )


def msgs(*ids: int) -> list[chatbus.Message]:
    return [msg(i) for i in ids]


class TestDurableCache:
    def test_run_is_contiguous_from_cursor(self):
        cache = DurableCache(10)
        cache.put(msgs(4, 5, 7))
        assert [m.id for m in cache.run_after(3, 100)] == [4, 5]
        assert cache.run_after(5, 100) == []  # 6 is missing: cannot prove anything
        assert [m.id for m in cache.run_after(6, 100)] == [7]
        cache.put(msgs(6))
        assert [m.id for m in cache.run_after(3, 100)] == [4, 5, 6, 7]
        assert [m.id for m in cache.run_after(3, 2)] == [4, 5]

    def test_evicts_lowest_ids_beyond_capacity(self):
        cache = DurableCache(3)
        cache.put(msgs(1, 2, 3, 4, 5))
        assert len(cache) == 3 and cache.floor == 2
        assert cache.run_after(0, 10) == []
        assert [m.id for m in cache.run_after(2, 10)] == [3, 4, 5]
        cache.put(msgs(1))  # below the floor: ignored
        assert len(cache) == 3
        cache.put(msgs(100))  # a jump evicts everything older
        assert [m.id for m in cache.run_after(99, 10)] == [100]
        assert len(cache) == 1

    def test_bounded_whatever_the_order(self):
        cache = DurableCache(8)
        for start in range(0, 10_000, 10):
            cache.put(msgs(*reversed(range(start + 1, start + 11))))
            assert len(cache) <= 8


class TestMergeState:
    def test_take_skips_duplicates_and_advances(self):
        state = MergeState(cursor=3)
        assert [m.id for m in state.take(msgs(2, 3, 4, 5), limit=10)] == [4, 5]
        assert state.cursor == 5 and state.duplicates_skipped == 2 and state.delivered == 2

    def test_take_rejects_a_store_with_holes(self):
        state = MergeState(cursor=3)
        with pytest.raises(chatbus.HistoryTruncated, match="not dense"):
            state.take(msgs(4, 6), limit=10)

    def test_rescan_lasts_until_a_short_page(self):
        state = MergeState(cursor=0)
        assert state.wants_store(high_water=0)  # the start-up snapshot
        state.take(msgs(1, 2), limit=2)
        assert state.rescan  # a full page: there may be more
        state.take(msgs(3), limit=2)
        assert not state.rescan and not state.wants_store(high_water=3)
        assert state.wants_store(high_water=4)
        state.request_rescan()
        assert state.wants_store(high_water=0) and state.rescans == 1

    def test_stale_high_water_needs_nothing(self):
        state = MergeState(cursor=100, rescan=False)
        assert not state.wants_store(high_water=96)

    def test_from_cache_stops_at_hole(self):
        cache = DurableCache(10)
        cache.put(msgs(4, 5, 7))
        state = MergeState(cursor=3)
        assert [m.id for m in state.from_cache(cache, 10)] == [4, 5]
        assert state.from_cache(cache, 10) == []
        assert state.cursor == 5 and state.cache_hits == 2


# One step of the adversary: racing local and remote producers commit; local cache
# fills and notices arrive late, out of order, twice or never; stale notices and
# resyncs come and go; subscribers run (or not) between any two steps; more join.
_actions = st.one_of(
    st.tuples(st.just("commit"), st.integers(1, 3), st.sampled_from(["local", "remote"])),
    st.tuples(st.just("fill"), st.integers(0, 10)),
    st.tuples(st.just("notice"), st.integers(0, 10), st.sampled_from(["once", "twice", "drop"])),
    st.tuples(st.just("stale"), st.integers(0, 30)),
    st.tuples(st.just("resync")),
    st.tuples(st.just("run")),
    st.tuples(st.just("join"), st.integers(0, 30)),
)


@settings(max_examples=150, deadline=None)
@given(actions=st.lists(_actions, max_size=60), cache_size=st.integers(1, 8))
async def test_any_interleaving_yields_each_id_once_in_order(actions, cache_size):
    store = MemoryStore()
    got: dict[int, list[int]] = {}
    async with (
        chatbus.open_bus(
            store=store, poll_interval=None, cache_size=cache_size, read_batch=4
        ) as bus,
        trio.open_nursery() as nursery,
    ):

        async def follow(after: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
            ids = got.setdefault(len(got), [after])
            async with bus.open_subscriber("s", after=after) as sub:
                task_status.started()
                async for message in sub:
                    ids.append(message.id)

        await nursery.start(follow, 0)
        topic, router = bus._topics.by_name["s"], bus._router
        fills: list[list[chatbus.Message]] = []
        notices: list[int] = []
        for action in actions:
            match action:
                case ("commit", k, where):
                    committed = await store.append(
                        "s", [chatbus.Draft(body_json="0", key=None)] * k
                    )
                    if where == "local":
                        # A local producer's append: in flight until its "fill",
                        # which may come after its notice, or after later commits.
                        topic.appending += 1
                        fills.append(committed)
                    notices.append(committed[-1].id)
                case ("fill", i) if fills:
                    topic.appending -= 1
                    topic.committed(fills.pop(i % len(fills)), topic.cache.generation)
                case ("notice", i, how) if notices:
                    last_id = notices.pop(i % len(notices))
                    for _ in range({"once": 1, "twice": 2, "drop": 0}[how]):
                        router.notice("s", last_id)
                case ("stale", i):
                    router.notice("s", min(i, store.last_id("s")))
                case ("resync",):
                    router.resync()
                case ("run",):
                    await trio.testing.wait_all_tasks_blocked()
                case ("join", after):
                    await nursery.start(follow, min(after, store.last_id("s")))
        # Local appends return eventually; whatever notice was lost, a resync (as
        # after a reconnect, or the bus's poll) ends it.
        while fills:
            topic.appending -= 1
            topic.committed(fills.pop(), topic.cache.generation)
        router.resync()
        await trio.testing.wait_all_tasks_blocked()
        n = store.last_id("s")
        for ids in got.values():
            after, delivered = ids[0], ids[1:]
            assert delivered == list(range(after + 1, n + 1))
        nursery.cancel_scope.cancel()


# The same adversary, with events: remote emitters (each with its own, possibly stale,
# view of the head) emit; their batches are retained for joiners or not, and reach
# this bus late, out of order, twice or never; the bus emits too, racing its own
# and remote commits. Whatever happens, messages stay exactly 1..n in order, every
# unkeyed event sits right after its message, keyed ones never before theirs, and
# each emitter's events arrive in emit order, each at most once.
_event_actions = st.one_of(
    _actions,
    st.tuples(st.just("emit"), st.integers(0, 2), st.booleans(), st.booleans(), st.integers(1, 3)),
    st.tuples(st.just("learn"), st.integers(0, 2)),
    st.tuples(st.just("deliver"), st.integers(0, 10), st.sampled_from(["once", "twice", "drop"])),
    st.tuples(st.just("local_emit"), st.booleans()),
)


def _remote_event(emitter: int, seq: int, after: int, keyed: bool) -> chatbus.Event:
    return chatbus.Event(
        stream="s",
        after=after,
        body=[f"r{emitter}", seq],
        key="status" if keyed else None,
        ttl=None,
        # Later per emitter, like a real bus's: subscriptions order events by it.
        created_at=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
        + datetime.timedelta(microseconds=seq),
        emitter=f"r{emitter}",
        seq=seq,
    )


def check_events_in_place(after: int, items: list[chatbus.Message | chatbus.Event]) -> None:
    """The guarantees of events, for what one subscription received."""
    position = after
    last_seq: dict[str, int] = {}
    for item in items:
        if isinstance(item, chatbus.Message):
            position = item.id
            continue
        if item.key is None:
            assert item.after == position, f"{item.body} (after {item.after}) at {position}"
        else:
            assert item.after <= position, f"{item.body} (after {item.after}) at {position}"
        assert item.seq > last_seq.get(item.emitter, 0), f"{item.body} out of emit order"
        last_seq[item.emitter] = item.seq


@settings(max_examples=150, deadline=None)
@given(actions=st.lists(_event_actions, max_size=60), cache_size=st.integers(1, 8))
async def test_any_interleaving_keeps_events_in_place(actions, cache_size):
    store = MemoryStore()
    got: dict[int, tuple[int, list[chatbus.Message | chatbus.Event]]] = {}
    async with (
        chatbus.open_bus(
            store=store, poll_interval=None, cache_size=cache_size, read_batch=4
        ) as bus,
        trio.open_nursery() as nursery,
    ):

        async def follow(after: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
            items: list[chatbus.Message | chatbus.Event] = []
            got[len(got)] = (after, items)
            async with bus.open_subscriber("s", after=after, events=True) as sub:
                task_status.started()
                async for item in sub:
                    items.append(item)

        await nursery.start(follow, 0)
        topic, router = bus._topics.by_name["s"], bus._router
        fills: list[list[chatbus.Message]] = []
        notices: list[int] = []
        heads = [0, 0, 0]  # what each remote emitter knows of the head
        seqs = [0, 0, 0]
        batches: list[list[chatbus.Event]] = []
        for action in actions:
            match action:
                case ("commit", k, where):
                    committed = await store.append(
                        "s", [chatbus.Draft(body_json="0", key=None)] * k
                    )
                    if where == "local":
                        topic.appending += 1
                        fills.append(committed)
                    notices.append(committed[-1].id)
                case ("fill", i) if fills:
                    topic.appending -= 1
                    topic.committed(fills.pop(i % len(fills)), topic.cache.generation)
                case ("notice", i, how) if notices:
                    last_id = notices.pop(i % len(notices))
                    for _ in range({"once": 1, "twice": 2, "drop": 0}[how]):
                        router.notice("s", last_id)
                case ("stale", i):
                    router.notice("s", min(i, store.last_id("s")))
                case ("resync",):
                    router.resync()
                case ("run",):
                    await trio.testing.wait_all_tasks_blocked()
                case ("join", after):
                    await nursery.start(follow, min(after, store.last_id("s")))
                case ("learn", e):
                    heads[e] = store.last_id("s")
                case ("emit", e, keyed, retained, k):
                    batch = []
                    for _ in range(k):
                        seqs[e] += 1
                        batch.append(_remote_event(e, seqs[e], heads[e], keyed))
                    if retained:  # flushed to the store before it is carried
                        await store.retain_events(batch, ["x"] * len(batch))
                    batches.append(batch)
                case ("deliver", i, how) if batches:
                    batch = batches.pop(i % len(batches))
                    for _ in range({"once": 1, "twice": 2, "drop": 0}[how]):
                        router.events(batch)
                case ("local_emit", keyed):
                    await bus.emit("s", "local", key="status" if keyed else None)
        while fills:
            topic.appending -= 1
            topic.committed(fills.pop(), topic.cache.generation)
        for batch in batches:
            router.events(batch)
        router.resync()
        await trio.testing.wait_all_tasks_blocked()
        n = store.last_id("s")
        for after, items in got.values():
            ids = [item.id for item in items if isinstance(item, chatbus.Message)]
            assert ids == list(range(after + 1, n + 1))
            check_events_in_place(after, items)
        nursery.cancel_scope.cancel()
