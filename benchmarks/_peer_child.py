"""One peer run of the pg-throughput workload shape, in its own process and asyncio loop.

``python -I benchmarks/_peer_child.py nats|redis URL --streams 8 --callers 8 --per-caller N``

``streams x callers`` concurrent publishers, each awaiting one acknowledged publish
at a time, and one subscriber per stream that must receive every message of its
stream. The clock runs from the first publish to the last receipt (subscribers are
ready before it starts). Prints one JSON object: ``{"rate": …, "info": {…}}``, or
``{"skipped": "<reason>"}`` when the client is missing or the server refuses.

* NATS JetStream (nats-py): one file-storage stream with a subject per chat stream;
  ``js.publish`` awaits its PubAck; one ordered push consumer per subject.
* Redis Streams (redis-py asyncio): one key per chat stream; one ``XADD`` per
  publish (on a pool of connections); one ``XREAD BLOCK`` reader per key, each on
  its own connection.

Names are unique to the run (pid and random hex) and deleted afterwards. Kept free
of trio and chatbus: nothing here shares an event loop with chatbus.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


class Skip(Exception):
    """The peer cannot be measured here (client missing, server refused)."""


def _body(tag: int, i: int) -> bytes:
    return json.dumps({"n": tag, "i": i, "text": "hello"}).encode()


async def _drive(
    streams: list[str],
    callers: int,
    per_caller: int,
    publish: Callable[[str, bytes], Awaitable[object]],
) -> None:
    async def caller(stream: str, tag: int) -> None:
        for i in range(per_caller):
            await publish(stream, _body(tag, i))

    await asyncio.gather(*(caller(s, tag) for s in streams for tag in range(callers)))


async def _nats(url: str, n_streams: int, callers: int, per_caller: int) -> dict[str, Any]:
    try:
        import nats
        from nats.js.api import StorageType, StreamConfig
    except ImportError as exc:
        raise Skip(f"nats-py not installed: {exc}") from exc
    uid = f"{os.getpid()}_{secrets.token_hex(3)}"
    name = f"CHATBUS_BENCH_{uid}"
    subjects = [f"chatbus_bench.{uid}.chat-{i}" for i in range(n_streams)]
    try:
        pub_conn = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
        sub_conn = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
    except Exception as exc:
        raise Skip(f"NATS connect to {url} failed: {type(exc).__name__}: {exc}") from exc
    js = pub_conn.jetstream()
    try:
        try:
            await js.add_stream(
                StreamConfig(
                    name=name, subjects=[f"chatbus_bench.{uid}.>"], storage=StorageType.FILE
                )
            )
        except Exception as exc:
            raise Skip(f"JetStream unavailable: {type(exc).__name__}: {exc}") from exc
        try:
            return await _nats_measure(js, sub_conn.jetstream(), subjects, callers, per_caller)
        finally:
            await js.delete_stream(name)
    finally:
        await sub_conn.close()
        await pub_conn.close()


async def _nats_measure(
    js: Any, sub_js: Any, subjects: list[str], callers: int, per_caller: int
) -> dict[str, Any]:
    per_stream = callers * per_caller
    done: list[float] = []

    async def consume(sub: Any) -> None:
        seen = 0
        async for _ in sub.messages:
            seen += 1
            if seen == per_stream:
                break
        done.append(time.perf_counter())

    subs = [await sub_js.subscribe(subject, ordered_consumer=True) for subject in subjects]
    consumers = [asyncio.create_task(consume(sub)) for sub in subs]
    start = time.perf_counter()
    await _drive(subjects, callers, per_caller, js.publish)
    await asyncio.gather(*consumers)
    elapsed = max(done) - start
    for sub in subs:
        await sub.unsubscribe()
    return {
        "rate": per_stream * len(subjects) / elapsed,
        "info": {"storage": "file", "ack": "PubAck per publish", "seconds": elapsed},
    }


async def _redis(url: str, n_streams: int, callers: int, per_caller: int) -> dict[str, Any]:
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:
        raise Skip(f"redis-py not installed: {exc}") from exc
    uid = f"{os.getpid()}_{secrets.token_hex(3)}"
    keys = [f"chatbus_bench:{uid}:chat-{i}" for i in range(n_streams)]
    client = aioredis.from_url(url, socket_connect_timeout=3)
    readers = [aioredis.from_url(url, socket_connect_timeout=3) for _ in keys]
    try:
        try:
            await client.ping()
            config = await client.config_get("append*")
        except Exception as exc:
            raise Skip(f"Redis at {url} failed: {type(exc).__name__}: {exc}") from exc
        try:
            result = await _redis_measure(client, readers, keys, callers, per_caller)
        finally:
            await client.delete(*keys)
        result["info"]["config"] = {str(k): str(v) for k, v in config.items()}
        return result
    finally:
        for reader in readers:
            await reader.aclose()
        await client.aclose()


async def _redis_measure(
    client: Any, readers: list[Any], keys: list[str], callers: int, per_caller: int
) -> dict[str, Any]:
    per_stream = callers * per_caller
    done: list[float] = []
    ready = asyncio.Event()
    waiting = len(keys)

    async def read_all(reader: Any, key: str) -> None:
        nonlocal waiting
        await reader.ping()  # its connection is open before the clock starts
        waiting -= 1
        if waiting == 0:
            ready.set()
        last, seen = "0-0", 0
        while seen < per_stream:
            reply = await reader.xread({key: last}, block=5_000, count=1_000)
            for _, entries in reply:
                seen += len(entries)
                last = entries[-1][0]
        done.append(time.perf_counter())

    async def xadd(key: str, body: bytes) -> object:
        return await client.xadd(key, {"body": body})

    tasks = [asyncio.create_task(read_all(r, k)) for r, k in zip(readers, keys, strict=True)]
    await ready.wait()
    start = time.perf_counter()
    await _drive(keys, callers, per_caller, xadd)
    await asyncio.gather(*tasks)
    elapsed = max(done) - start
    return {
        "rate": per_stream * len(keys) / elapsed,
        "info": {"xadd": "one per publish", "seconds": elapsed},
    }


PEERS = {"nats": _nats, "redis": _redis}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    try:
        async with asyncio.timeout(args.timeout):
            return await PEERS[args.peer](args.url, args.streams, args.callers, args.per_caller)
    except Skip as exc:
        return {"skipped": str(exc)}


def main() -> None:
    """Parse arguments, run one measurement, print its JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("url")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--callers", type=int, required=True, help="per stream")
    parser.add_argument("--per-caller", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    result = asyncio.run(_main(parser.parse_args()))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
