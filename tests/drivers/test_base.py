"""Driver base helpers: cancellation that never eats the caller's own cancel."""

from __future__ import annotations

import asyncio

import pytest

from drivers.base import cancel_and_wait


async def _slow_to_stop(stopping: asyncio.Event, release: asyncio.Event) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        stopping.set()
        await release.wait()  # cleanup that takes a while
        raise


async def test_caller_cancelled_while_waiting_is_cancelled() -> None:
    stopping, release = asyncio.Event(), asyncio.Event()
    inner = asyncio.create_task(_slow_to_stop(stopping, release))
    await asyncio.sleep(0)  # let it start

    outer = asyncio.create_task(cancel_and_wait(inner))
    await stopping.wait()
    outer.cancel()  # the caller itself is cancelled while it waits
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert inner.cancelled()


async def test_cleanup_in_a_finally_of_a_cancelled_task_completes() -> None:
    inner = asyncio.create_task(asyncio.Event().wait())
    cleaned = asyncio.Event()

    async def owner() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await cancel_and_wait(inner)  # the inner cancel must not abort this cleanup
            cleaned.set()

    task = asyncio.create_task(owner())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set() and inner.cancelled()


async def test_a_failed_task_is_waited_for_quietly() -> None:
    async def boom() -> None:
        raise RuntimeError("x")

    t = asyncio.create_task(boom())
    await asyncio.sleep(0)
    await cancel_and_wait(t)
    assert t.done()
