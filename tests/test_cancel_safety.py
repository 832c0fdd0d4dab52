"""A cancel swallowed inside a library call must not leave a sender loop (or the daemon's
TaskGroup) waiting forever."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from dynoai_daemon.publish.mqtt import _publish
from dynoai_daemon.service.daemon import _cancel_hard


class SwallowingClient:
    """publish() behaves like 3.11's wait_for when the ack and a cancel coincide."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.sent = 0

    async def publish(self, topic: str, payload: Any, **kwargs: Any) -> None:
        self.entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        self.sent += 1


async def test_publish_re_raises_a_swallowed_cancel() -> None:
    client = SwallowingClient()
    idle = asyncio.Event()

    async def sender() -> None:
        while True:
            await _publish(client, "t", b"x", qos=1)  # type: ignore[arg-type]
            await idle.wait()  # without the checkpoint: waits here forever

    task = asyncio.create_task(sender())
    await client.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert client.sent == 1


async def test_cancel_hard_cancels_again_until_the_task_ends() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        for _ in range(2):  # swallows the first two cancels
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await asyncio.sleep(3600)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await _cancel_hard(task, tries=5, wait_s=0.05)
    assert task.cancelled() and swallowed == 2
