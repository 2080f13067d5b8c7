"""Events across OS processes on Postgres: a joiner started in the middle of a
streamed reply gets the parts so far, the latest state, the live rest, then the
final message. Bounded by an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

import pytest
import trio

import chatbus
from chatbus.postgres import open_postgres

from support.pg import fresh_schema

pytestmark = pytest.mark.postgres

# A watcher process: prints every item of its events=True subscription as one JSON
# line (messages as their id, events as their body), until message ``until``.
WATCHER_SCRIPT = textwrap.dedent(
    """
    import json, sys, trio, chatbus
    from chatbus.postgres import open_postgres

    dsn, schema, stream, until = sys.argv[1:5]

    async def main():
        async with open_postgres(dsn, schema=schema) as (store, notifier):
            async with chatbus.open_bus(store=store, notifier=notifier) as bus:
                async with bus.open_subscriber(stream, events=True) as sub:
                    async for item in sub:
                        if isinstance(item, chatbus.Message):
                            print(json.dumps({"id": item.id}), flush=True)
                            if item.id == int(until):
                                return
                        else:
                            print(json.dumps({"event": item.body, "key": item.key}), flush=True)

    trio.run(main)
    """
)


async def test_a_joiner_in_another_process_gets_the_parts_so_far_then_the_rest():
    with trio.fail_after(60):
        async with (
            fresh_schema() as (dsn, schema),
            open_postgres(dsn, schema=schema) as (store, notifier),
            chatbus.open_bus(store=store, notifier=notifier) as bus,
            bus.open_publisher("chat") as pub,
        ):
            await pub.publish({"role": "user", "text": "a poem, please"})
            await pub.emit({"state": "running"}, key="status")
            for i in range(5):
                await pub.emit({"delta": i})
            await trio.sleep(0.3)  # flushed: the joiner's process was not running
            argv = [sys.executable, "-c", WATCHER_SCRIPT, dsn, schema, "chat", "2"]
            async with trio.open_nursery() as nursery:
                run = functools.partial(trio.run_process, argv, stdout=subprocess.PIPE)
                child = await nursery.start(run)
                assert child.stdout is not None
                lines = _Lines(child.stdout)
                seen = [await lines.next() for _ in range(7)]
                assert seen == [
                    {"id": 1},
                    {"event": {"state": "running"}, "key": "status"},
                    *({"event": {"delta": i}, "key": None} for i in range(5)),
                ]
                for i in range(5, 10):
                    await pub.emit({"delta": i})
                await pub.publish({"role": "assistant", "text": "roses are red"})
                rest = [await lines.next() for _ in range(6)]
                assert rest == [
                    *({"event": {"delta": i}, "key": None} for i in range(5, 10)),
                    {"id": 2},
                ]
                assert await child.wait() == 0  # it saw message 2 and ended


class _Lines:
    """JSON lines from a child's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> object:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError(f"the child ended; unread: {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)
