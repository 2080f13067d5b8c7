"""The Redis stream lifecycle: stream info, trim, retention scan, delete, redact.

Owns: how :class:`~._store.RedisStore`'s lifecycle methods become script calls (the
bounded trim loop, the ``SCAN`` of a server for streams under the prefix and their
examination against a retention policy, the Cluster's servers by first slot).
Functions of the store's pieces (its script call, prefix, client); the store keeps
the public methods and delegates. Imports this package's :mod:`._lua`,
:mod:`._lua_lifecycle`, :mod:`._append` and :mod:`._resp`; never the store or the
listener.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import trio

from .._event import from_micros
from .._exceptions import store_error
from .._message import Message, StreamInfo, check_stream
from .._retention import RetentionPage
from ._append import REDIS_ERRORS, Client, each
from ._lua import Script, StreamKeys
from ._lua_lifecycle import (
    DELETE,
    EXAMINE,
    INFO,
    LIFECYCLE_BATCH,
    REDACT,
    SCAN_STREAMS,
    TRIM_BATCH,
    TRIM_FIRST,
    TRIM_KEYS,
)
from ._resp import hash_slot


class Call(Protocol):
    """The store's script call (``RedisStore._call``): failures as StoreError."""

    async def __call__(
        self,
        operation: str,
        script: Script,
        keys: list[str],
        args: Sequence[str | int],
        stream: str | None = None,
        /,
    ) -> Any: ...


def _no_limit(value: int | None) -> int:
    """A script argument for an optional limit: -1 for none."""
    return -1 if value is None else value


@functools.cache
def _slot_tag(slot: int) -> str:
    """A short hash tag whose key lands in ``slot`` (routes a script to its server)."""
    return next(str(n) for n in itertools.count() if hash_slot(str(n).encode()) == slot)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _stream_of(key: bytes, prefix: str) -> str | None:
    """The stream whose meta key is ``key`` (None for a key that is not one)."""
    text = key.decode("utf-8", "replace")
    head, tail = f"{prefix}:{{", "}:m"
    if not (text.startswith(head) and text.endswith(tail)):
        return None
    try:
        return bytes.fromhex(text[len(head) : -len(tail)]).decode("utf-8")
    except ValueError:
        return None


async def stream_info(call: Call, prefix: str, stream: str) -> StreamInfo:
    """:meth:`~._store.RedisStore.stream_info`."""
    check_stream(stream)
    head, first_id, epoch, reset = await call(
        "stream info", INFO, [StreamKeys.of(prefix, stream).meta], [], stream
    )
    if not epoch:
        return StreamInfo(stream=stream, head=0, first_id=1, epoch=0, exists=False)
    return StreamInfo(
        stream=stream,
        head=int(head),
        first_id=int(first_id),
        epoch=int(epoch),
        exists=True,
        reset_by_store=bool(reset),
    )


async def trim(
    call: Call,
    prefix: str,
    stream: str,
    before: int,
    *,
    keys_for: float | None,
    epoch: int | None,
) -> int:
    """:meth:`~._store.RedisStore.trim`."""
    check_stream(stream)
    keys = StreamKeys.of(prefix, stream)
    wanted = "" if epoch is None else epoch
    first, go = (
        int(value)
        for value in await call(
            "trim", TRIM_FIRST, [keys.meta], [before, keys.channel, stream, wanted], stream
        )
    )
    if first == 0:
        return 1
    if not go:
        return first  # another history than the caller examined
    while True:
        removed = await call(
            "trim",
            TRIM_BATCH,
            [keys.entries, keys.keys, keys.trimmed],
            [first, LIFECYCLE_BATCH],
            stream,
        )
        if int(removed) < LIFECYCLE_BATCH:
            break
    if keys_for is not None:
        window = round(keys_for * 1_000_000)
        while True:
            examined = await call(
                "trim",
                TRIM_KEYS,
                [keys.keys, keys.trimmed],
                [window, LIFECYCLE_BATCH, first],
                stream,
            )
            if int(examined) < LIFECYCLE_BATCH:
                break
    return first


async def over_retention(
    call: Call,
    prefix: str,
    servers: list[int],
    after: str,
    limit: int,
    *,
    max_messages: int | None,
    max_age: float | None,
    keys_for: float | None,
) -> RetentionPage:
    """:meth:`~._store.RedisStore.over_retention`, given the :func:`servers` now."""
    slot, cursor = 0, 0
    if after:
        slot_text, _, cursor_text = after.partition(":")
        slot, cursor = int(slot_text), int(cursor_text)
    server = next((first for first in servers if first >= slot), -1)
    if server < 0:
        return RetentionPage(trims=[], next_after=None)
    if server != slot:  # the layout changed since: that cursor means nothing here
        slot, cursor = server, 0
    route = f"{prefix}:{{{_slot_tag(slot)}}}:scan"
    pattern = _glob_escape(prefix) + ":{*}:m"
    next_cursor, found = await call(
        "retention", SCAN_STREAMS, [route], [cursor, pattern, 2 * limit]
    )
    names = [_stream_of(key, prefix) for key in found]
    streams = list(dict.fromkeys(name for name in names if name is not None))
    policy = [
        _no_limit(max_messages),
        _no_limit(None if max_age is None else round(max_age * 1_000_000)),
        _no_limit(None if keys_for is None else round(keys_for * 1_000_000)),
        LIFECYCLE_BATCH,
    ]
    results: dict[str, list[Any]] = {}

    async def examine(stream: str) -> None:
        keys = StreamKeys.of(prefix, stream)
        script_keys = [keys.meta, keys.entries, keys.redactions, keys.trimmed]
        results[stream] = await call("retention", EXAMINE, script_keys, policy, stream)

    await each(streams, examine)
    trims: list[tuple[str, int, int]] = []
    again = False
    for stream in streams:
        epoch, before, more, stale, first = results[stream]
        if not epoch:
            continue  # deleted since the scan
        if int(before) > int(first) or int(stale):
            trims.append((stream, int(before), int(epoch)))
        again = again or bool(int(more))
    if again:
        return RetentionPage(trims=trims, next_after=after)
    if int(next_cursor) != 0:
        return RetentionPage(trims=trims, next_after=f"{slot}:{int(next_cursor)}")
    later = [first for first in servers if first > slot]
    return RetentionPage(trims=trims, next_after=f"{later[0]}:0" if later else None)


async def servers(client: Client, cluster: bool) -> list[int]:
    """The first slot of each server holding slots (one server: ``[0]``), sorted."""
    if not cluster:
        await trio.lowlevel.checkpoint()
        return [0]
    try:
        shards: list[Any] = await client.cluster_shards()
    except REDIS_ERRORS as exc:
        raise store_error("retention", exc) from exc
    # One shard per master: its slot ranges as [start, end, start, end, ...].
    ranges = [shard.get(b"slots") or shard.get("slots") or [] for shard in shards]
    return sorted(min(int(low) for low in slots[::2]) for slots in ranges if slots)


async def delete_stream(call: Call, prefix: str, stream: str) -> None:
    """:meth:`~._store.RedisStore.delete_stream`."""
    check_stream(stream)
    keys = StreamKeys.of(prefix, stream)
    await call("delete", DELETE, keys.all, [keys.channel, stream], stream)


async def redact(call: Call, prefix: str, stream: str, id: int) -> Message | None:
    """:meth:`~._store.RedisStore.redact`."""
    check_stream(stream)
    keys = StreamKeys.of(prefix, stream)
    found = await call(
        "redact",
        REDACT,
        [keys.meta, keys.entries, keys.keys, keys.redactions],
        [id, keys.channel, stream],
        stream,
    )
    if found is None:
        return None
    key, micros = found
    return Message(
        stream=stream,
        id=id,
        body=None,
        key=key.decode("utf-8") or None,
        created_at=from_micros(int(micros)),
        redacted=True,
    )
