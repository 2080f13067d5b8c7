"""Two OS processes chatting through one PostgreSQL database.

Run it with a DSN (or set ``CHATBUS_DSN``; the default is the local test server)::

    python examples/postgres_chat.py postgresql://postgres@127.0.0.1:5432/test

The script plays "alice" and starts a second copy of itself as "bob". Each process
opens its own bus on the same database (``CHATBUS_SCHEMA``, default
``chatbus_example``), subscribes to one fresh chat stream from the beginning,
publishes a few lines and prints every message it sees. Both see the same messages,
with the same ids, in the same order, and stop once they have seen everything.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import uuid

import trio

import chatbus
from chatbus.postgres import open_postgres

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
LINES = {
    "alice": ["hi bob!", "are you on the other process?", "bye"],
    "bob": ["hello alice", "yes, pid %(pid)s here", "see you"],
}


async def chat(dsn: str, schema: str, stream: str, me: str) -> None:
    expected = sum(len(lines) for lines in LINES.values())
    async with (
        open_postgres(dsn, schema=schema) as (store, notifier),
        chatbus.open_bus(store=store, notifier=notifier) as bus,
        bus.open_subscriber(stream, after=0) as sub,
        trio.open_nursery() as nursery,
    ):

        async def talk() -> None:
            for n, line in enumerate(LINES[me]):
                text = line % {"pid": os.getpid()}
                # The key makes a retry after an error safe: it cannot double-post.
                await bus.publish(stream, {"from": me, "text": text}, key=f"{me}-{n}")
                await trio.sleep(0.05)

        nursery.start_soon(talk)
        seen = 0
        async for msg in sub:
            seen += 1
            print(f"{me} saw #{msg.id} from {msg.body['from']}: {msg.body['text']}", flush=True)
            if seen == expected:
                break


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", nargs="?", default=os.environ.get("CHATBUS_DSN", DEFAULT_DSN))
    parser.add_argument("--role", default="alice", choices=sorted(LINES))
    parser.add_argument("--stream", default=None)
    args = parser.parse_args()
    schema = os.environ.get("CHATBUS_SCHEMA", "chatbus_example")
    stream = args.stream or f"chat-{uuid.uuid4().hex[:8]}"

    with trio.fail_after(30):
        if args.role != "alice":
            await chat(args.dsn, schema, stream, args.role)
            return
        async with trio.open_nursery() as nursery:
            # The second process: this same script, as bob, on the same stream.
            child = [sys.executable, __file__, args.dsn, "--role", "bob", "--stream", stream]
            nursery.start_soon(functools.partial(trio.run_process, child))
            await chat(args.dsn, schema, stream, "alice")
        print(f"alice: bob's process is done too; stream {stream!r} in schema {schema!r}")


if __name__ == "__main__":
    trio.run(main)
