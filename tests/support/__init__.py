"""Small helpers shared by the test modules."""

from __future__ import annotations

import math

import trio

import chatbus


async def items(sub: chatbus.Subscriber, count: int, *, seconds: float = 10) -> list[object]:
    """The next ``count`` items of ``sub``: messages as ids, events as bodies."""
    out: list[object] = []
    with trio.fail_after(seconds):
        while len(out) < count:
            item = await sub.receive()
            out.append(item.id if isinstance(item, chatbus.Message) else item.body)
    return out


async def collect(sub: chatbus.Subscriber, count: int, *, seconds: float = 10) -> list[int]:
    """Receive ``count`` messages from ``sub`` (failing after ``seconds``); return ids."""
    ids = []
    with trio.fail_after(seconds):
        while len(ids) < count:
            ids.append((await sub.receive()).id)
    return ids


async def assert_quiet(sub: chatbus.Subscriber, *, seconds: float = 0.3) -> None:
    """Assert ``sub`` yields nothing more within ``seconds`` (no duplicates, no extras)."""
    with trio.move_on_after(seconds):
        message = await sub.receive()
        raise AssertionError(f"unexpected extra message {message.id}: {message.body!r}")


def dense(n: int, start: int = 1) -> list[int]:
    """[start, start + 1, …, n]."""
    return list(range(start, n + 1))


INF = math.inf
