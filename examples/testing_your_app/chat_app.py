"""A tiny app built on chatbus, tested by ``test_chat_app.py`` with the chatbus fixtures.

* :func:`run_shouter` is a bot: it answers every user message in a room with the same
  text in capitals. Its reply's idempotency key is derived from the message it answers,
  so several bot processes may run at once and each message still gets one reply.
* :func:`remind` posts a reminder after a delay.
"""

from __future__ import annotations

from typing import Any

import trio

import chatbus


def is_user_message(body: Any) -> bool:
    """Whether ``body`` is something a person said."""
    return isinstance(body, dict) and body.get("role") == "user"


async def run_shouter(
    bus: chatbus.Bus,
    room: str,
    *,
    after: int = 0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer each user message of ``room`` after ``after``, until cancelled."""
    async with bus.open_subscriber(room, after=after) as messages:
        task_status.started()
        async for message in messages:
            if is_user_message(message.body):
                reply = {"role": "bot", "text": str(message.body["text"]).upper()}
                await bus.publish(room, reply, key=f"shout:{message.id}")


async def remind(bus: chatbus.Bus, room: str, text: str, *, delay: float) -> chatbus.Message:
    """Post ``text`` to ``room`` as a reminder after ``delay`` seconds."""
    await trio.sleep(delay)
    return await bus.publish(room, {"role": "reminder", "text": text})
