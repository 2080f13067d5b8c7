"""The subscriber process of the cross-process latency and events scenarios.

Subscribes to ``--stream`` in ``--schema`` (for ``--backend redis``: ``--dsn`` is the
server's URL and ``--schema`` the key prefix; with ``--events``: for events, as the
events scenario measures them), prints ``ready``, then collects latencies
(``time.time()`` at receipt minus the scheduled send time in the body) until the end
marker, and prints them as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import trio

from ._backends import open_backend_bus
from .latency import collect


async def _main(dsn: str, schema: str, stream: str, events: bool, backend: str) -> None:
    async with (
        open_backend_bus(backend, dsn, schema=schema, drop_schema=False) as bus,
        bus.open_subscriber(stream, events=events) as subscriber,
    ):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        if events:
            from .events import receive_events

            collected: object = await receive_events(subscriber, time.time)
        else:
            collected = await collect(subscriber, time.time)
    json.dump(dataclasses.asdict(collected), sys.stdout)  # type: ignore[call-overload]
    sys.stdout.flush()


def main() -> None:
    """Parse arguments and run the subscriber."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--events", action="store_true")
    parser.add_argument("--backend", choices=("postgres", "redis"), default="postgres")
    args = parser.parse_args()
    trio.run(_main, args.dsn, args.schema, args.stream, args.events, args.backend)


if __name__ == "__main__":
    main()
