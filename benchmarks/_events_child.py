"""The subscriber process of the Postgres events scenario.

Opens its own bus over ``--schema`` (the parent's), subscribes to ``--stream`` with
``events=True``, prints ``ready``, then receives events until the end marker (a
durable message) and prints what it saw as one JSON object (see
:class:`benchmarks.events.Received`). Times are ``time.time()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import trio

from ._backends import open_backend_bus
from .events import receive_events


async def _main(dsn: str, schema: str, stream: str) -> None:
    async with (
        open_backend_bus("postgres", dsn, schema=schema, drop_schema=False) as bus,
        bus.open_subscriber(stream, events=True) as subscriber,
    ):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        received = await receive_events(subscriber, time.time)
    json.dump(dataclasses.asdict(received), sys.stdout)
    sys.stdout.flush()


def main() -> None:
    """Parse arguments and run the subscriber."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--stream", required=True)
    args = parser.parse_args()
    trio.run(_main, args.dsn, args.schema, args.stream)


if __name__ == "__main__":
    main()
