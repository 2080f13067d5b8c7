"""The subscriber process of the Postgres latency scenario.

Subscribes to ``--stream`` in ``--schema``, prints ``ready``, then collects latencies
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

import chatbus

from .latency import collect


async def _main(dsn: str, schema: str, stream: str) -> None:
    from chatbus.postgres import open_postgres

    async with (
        open_postgres(dsn, schema=schema) as (store, notifier),
        chatbus.open_bus(store=store, notifier=notifier) as bus,
        bus.open_subscriber(stream) as subscriber,
    ):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        collected = await collect(subscriber, time.time)
    json.dump(dataclasses.asdict(collected), sys.stdout)
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
