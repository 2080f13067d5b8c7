"""A child process for the cross-process lifecycle tests (tests/postgres/test_lifecycle.py).

``python lifecycle_child.py publish DSN SCHEMA STREAM NAME STOP PAUSE``: publish keyed
messages one at a time (PAUSE seconds apart) until the file STOP exists; print the
acknowledged ids as JSON.

``python lifecycle_child.py subscribe DSN SCHEMA STREAM READ_BATCH DELAY``: print
``ready`` once subscribed, then follow the stream through every lifecycle error,
reopening as a client would (after ``HistoryTruncated``: from the first retained id,
same epoch; after ``StreamDeleted`` / ``HistoryReset``: from the start of the new
epoch), until a message with body ``"END"``; print the segments as JSON. DELAY
seconds per message make a slow consumer.
"""

from __future__ import annotations

import json
import sys

import trio

import chatbus
from chatbus.postgres import open_postgres


async def publish(dsn: str, schema: str, stream: str, name: str, stop: str, pause: float) -> None:
    ids: list[int] = []
    async with (
        open_postgres(dsn, schema=schema) as (store, notifier),
        chatbus.open_bus(store=store, notifier=notifier) as bus,
    ):
        while not await trio.Path(stop).exists():
            seq = len(ids)
            message = await bus.publish(stream, {"from": name, "seq": seq}, key=f"{name}-{seq}")
            ids.append(message.id)
            await trio.sleep(pause)
    print(json.dumps(ids))


async def subscribe(dsn: str, schema: str, stream: str, read_batch: int, delay: float) -> None:
    segments: list[dict[str, object]] = []
    after, epoch = 0, None
    async with (
        open_postgres(dsn, schema=schema) as (store, notifier),
        chatbus.open_bus(store=store, notifier=notifier, read_batch=read_batch) as bus,
    ):
        ready = False
        while True:
            segment: dict[str, object] = {"after": after, "epoch": epoch, "ids": []}
            segments.append(segment)
            ids: list[int] = segment["ids"]  # type: ignore[assignment]
            try:
                async with bus.open_subscriber(stream, after=after, epoch=epoch) as sub:
                    segment["after"] = sub.cursor  # after=0: the first retained id - 1
                    if not ready:
                        print("ready", flush=True)
                        ready = True
                    async for message in sub:
                        ids.append(message.id)
                        epoch = segment["epoch"] = sub.epoch
                        if message.body == "END":
                            segment["end"] = "END"
                            print(json.dumps(segments))
                            return
                        await trio.sleep(delay)
            except chatbus.HistoryTruncated as exc:
                segment["end"] = "HistoryTruncated"
                segment["first_id"] = exc.first_id
                after = exc.first_id - 1  # reload from what is retained, same epoch
            except chatbus.HistoryReset as exc:  # StreamDeleted too
                segment["end"] = type(exc).__name__
                segment["new_epoch"] = exc.epoch
                after, epoch = 0, None  # start again in the new history


def main() -> None:
    role, dsn, schema, stream, *rest = sys.argv[1:]
    if role == "publish":
        name, stop, pause = rest
        trio.run(publish, dsn, schema, stream, name, stop, float(pause))
    else:
        read_batch, delay = rest
        trio.run(subscribe, dsn, schema, stream, int(read_batch), float(delay))


if __name__ == "__main__":
    main()
