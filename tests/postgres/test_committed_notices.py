"""Committed notices on a real server: a one-stream append's NOTIFY carries what it
stored (the subscriber side, across buses and backends: tests/test_committed_notices.py).

Every test runs on a fresh schema and is bounded by an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import pytest
import trio

from chatbus._codec import NOTICE_DATA_BYTES
from chatbus.postgres import PostgresNotifier, PostgresStore

from support.pg import CommittedRecorder, draft, eventually

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("stream", ["plain", 'a "quoted" \\ name ✓'])
async def test_a_one_stream_append_notifies_what_it_stored(
    pair: tuple[PostgresStore, PostgresNotifier], nursery: trio.Nursery, stream: str
) -> None:
    store, notifier = pair
    recorder = CommittedRecorder()
    with trio.fail_after(20):
        await nursery.start(notifier.listen, recorder)
        await store.append(stream, [draft({"n": 1}), draft([1, "é"])])
        await store.append(stream, [draft("k", key="key-1"), draft(None)])
        await eventually(lambda: len(recorder.committed_notices) == 2)
        stored = await store.read(stream, 0, 10)
        decoded = [m for n in recorder.committed_notices for m in n.messages() or []]
        assert decoded == stored
        assert [m.key for m in decoded] == [None, None, "key-1", None]
        assert {n.epoch for n in recorder.committed_notices} == {
            (await store.stream_info(stream)).epoch
        }
        assert recorder.notices == []


async def test_bodies_too_big_for_a_notice_get_a_plain_one(
    pair: tuple[PostgresStore, PostgresNotifier], nursery: trio.Nursery
) -> None:
    store, notifier = pair
    recorder = CommittedRecorder()
    with trio.fail_after(20):
        await nursery.start(notifier.listen, recorder)
        await store.append("big", [draft("x" * NOTICE_DATA_BYTES)])
        await eventually(lambda: recorder.notices == [("big", 1)])
        assert recorder.committed_notices == []
