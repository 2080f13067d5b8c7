"""An assistant streams a reply as events; a watcher joins halfway through.

The worker sets a status (a keyed event: the latest value wins), streams the reply
as unkeyed events (its parts), then commits the whole reply as one durable message
and sets the status to done. A watcher on a second bus (another process, as far as
chatbus can tell: on Postgres its own connections and LISTEN over the same schema)
joins while the parts are flowing: it is first given the parts so far and the
current status, then the rest live, then the final message.

    python examples/assistant_stream.py                 # in memory
    python examples/assistant_stream.py postgresql://postgres@127.0.0.1:5432/test

On Postgres the example works in a fresh schema and drops it afterwards.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

import chatbus
import chatbus.memory

STREAM = "chat-42"
REPLY = "Trio runs every task in a nursery, so nothing outlives the block that started it."
#: Parts emitted before the watcher joins.
BEFORE_JOIN = 6


def parts_of(text: str) -> list[str]:
    """The reply in word-sized parts, as a model would stream it."""
    words = text.split(" ")
    return [word + " " for word in words[:-1]] + [words[-1]]


@asynccontextmanager
async def open_buses(dsn: str | None) -> AsyncIterator[tuple[chatbus.Bus, chatbus.Bus]]:
    """Two buses over one store: the worker's and the watcher's."""
    if dsn is None:
        store, notifier = chatbus.memory.MemoryStore(), chatbus.memory.MemoryNotifier()
        async with (
            chatbus.open_bus(store=store, notifier=notifier) as worker_bus,
            chatbus.open_bus(store=store, notifier=notifier) as watcher_bus,
        ):
            yield worker_bus, watcher_bus
        return
    schema = f"assistant_example_{secrets.token_hex(4)}"
    url = f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
    try:
        async with chatbus.open_bus(url) as worker_bus, chatbus.open_bus(url) as watcher_bus:
            yield worker_bus, watcher_bus
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(drop_schema, dsn, schema)


def drop_schema(dsn: str, schema: str) -> None:
    """Drop the example's schema (psycopg, synchronous: run in a thread)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as connection:
        drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        connection.execute(drop)


async def worker(bus: chatbus.Bus, halfway: trio.Event, joined: trio.Event) -> None:
    """Stream the reply as parts, with status events, then commit it."""
    async with bus.open_publisher(STREAM) as publisher:
        question = await publisher.publish({"role": "user", "text": "Why nurseries?"})
        print(f"worker : committed message {question.id} (the question)")
        await publisher.emit({"status": "thinking"}, key="status")
        await trio.sleep(0.05)
        await publisher.emit({"status": "streaming"}, key="status")
        for n, part in enumerate(parts_of(REPLY)):
            if n == BEFORE_JOIN:
                print(f"worker : {n} parts streamed; the watcher joins now")
                halfway.set()
                await joined.wait()
            await publisher.emit({"part": n, "delta": part})
            await trio.sleep(0.01)
        reply = await publisher.publish({"role": "assistant", "text": REPLY})
        print(f"worker : committed message {reply.id} (the whole reply)")
        await publisher.emit({"status": "done"}, key="status")


async def watcher(bus: chatbus.Bus, halfway: trio.Event, joined: trio.Event) -> None:
    """Join halfway; show the parts so far, the live rest, the final message."""
    await halfway.wait()
    status = "-"
    text = ""
    seen_parts = 0
    async with bus.open_subscriber(STREAM, after=0, events=True) as subscriber:
        joined.set()
        async for item in subscriber:
            if isinstance(item, chatbus.Message):
                who = item.body["role"]
                print(f"watcher: message {item.id} [{who}] {item.body['text']}")
                if who == "assistant":
                    break
                continue
            if item.key == "status":
                status = item.body["status"]
                print(f"watcher: status line -> [{status}]")
                continue
            when = "so far" if item.body["part"] < BEFORE_JOIN else "live  "
            text += item.body["delta"]
            seen_parts += 1
            print(f"watcher: part {item.body['part']:2} ({when}) {text!r}")
        stats = subscriber.statistics()
        # The status after the final message: a keyed event emitted right after it.
        with trio.move_on_after(2):
            async for item in subscriber:
                if isinstance(item, chatbus.Event) and item.key == "status":
                    status = item.body["status"]
                    break
    print(f"watcher: status line -> [{status}]")
    expected = len(parts_of(REPLY))
    print(
        f"watcher: saw {seen_parts} of {expected} parts"
        f" ({stats.events_stale} stale, {stats.events_dropped} dropped)"
    )
    if seen_parts != expected or text != REPLY or status != "done":
        raise SystemExit("the watcher did not see the whole reply in order")


async def main(dsn: str | None) -> None:
    """Run the worker and the watcher on two buses over one store."""
    print(f"backend: {'postgres' if dsn else 'memory'}")
    halfway, joined = trio.Event(), trio.Event()
    async with open_buses(dsn) as (worker_bus, watcher_bus), trio.open_nursery() as nursery:
        nursery.start_soon(watcher, watcher_bus, halfway, joined)
        nursery.start_soon(worker, worker_bus, halfway, joined)
    print("done")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else None)
