"""The subscriber process of the cross-process latency and events scenarios.

Subscribes to ``--stream`` in ``--schema`` (for ``--backend redis``: ``--dsn`` is the
server's URL and ``--schema`` the key prefix; with ``--events``: for events, as the
events scenario measures them), prints ``ready``, then collects latencies
(``time.time()`` at receipt minus the scheduled send time in the body) until the end
marker, and prints them as one JSON object. With ``--plain-notices`` it takes no
messages from notices (see chatbus._codec.CommittedNotice): the baseline.
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


def _plain_notices() -> None:
    """Take every notice as a plain one, as before committed notices: each makes the
    subscription read the store (the same-run baseline of the latency scenario). The
    listeners call ``committed`` only where the bus's router has it."""
    from chatbus._topic import Router

    del Router.committed


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
    parser.add_argument("--plain-notices", action="store_true")
    args = parser.parse_args()
    if args.plain_notices:
        _plain_notices()
    trio.run(_main, args.dsn, args.schema, args.stream, args.events, args.backend)


if __name__ == "__main__":
    main()
