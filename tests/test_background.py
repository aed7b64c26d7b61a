"""Background tasks stop when they are told to: a shutdown waits on each of them, and one that
swallowed its cancellation would hold the shutdown for ever."""

from __future__ import annotations

import asyncio

import pytest

from stepcast.background import cancel_and_wait, every
from stepcast.db import Database
from stepcast.db.presence import Presence


async def test_a_caller_cancelled_while_it_waits_for_a_task_to_stop_is_cancelled() -> None:
    stopping = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopping.set()
            await asyncio.sleep(0.5)  # its clean-up takes a while

    async def shut_down(task: asyncio.Task[None]) -> None:
        await cancel_and_wait(task)
        await asyncio.Event().wait()  # only reached if its own cancellation was swallowed

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    caller = asyncio.create_task(shut_down(task))
    await stopping.wait()
    caller.cancel()
    done, _ = await asyncio.wait({caller}, timeout=2)
    assert done and caller.cancelled()
    await asyncio.wait({task})


async def test_a_task_stopped_with_a_failure_passes_it_on() -> None:
    async def fails_on_its_way_out() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("the clean-up failed")

    task = asyncio.create_task(fails_on_its_way_out())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="the clean-up failed"):
        await cancel_and_wait(task)


async def test_a_retrying_loop_stops_when_its_cancellation_arrives_as_another_failure() -> None:
    passes = 0

    async def tick() -> None:
        """A pass whose clean-up fails when it is cancelled (an unlock on a connection the
        cancellation left mid-query): the loop sees that failure, not the CancelledError."""
        nonlocal passes
        passes += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ConnectionError("another operation is in progress") from None

    loop = asyncio.create_task(every(0.01, tick, "test"))
    await asyncio.sleep(0.05)
    loop.cancel()
    done, _ = await asyncio.wait({loop}, timeout=2)
    assert done and loop.cancelled()
    assert passes == 1


@pytest.mark.parametrize("turns", range(4))
async def test_a_presence_stops_when_its_session_ends_as_it_is_cancelled(
    database_url: str, turns: int
) -> None:
    """The worker's close ends the session (which wakes the watcher) and cancels the watcher in
    the same breath; the wake must not swallow the cancellation, at any interleaving."""
    await (await Database.connect(database_url, max_size=1)).close()  # the schema is there
    presence = Presence(database_url, "test", check_s=5)
    await presence.hold()
    keeping = asyncio.create_task(presence.keep())
    await asyncio.sleep(0.05)
    try:
        presence._lost.set()  # what the session's end does
        for _ in range(turns):
            await asyncio.sleep(0)
        keeping.cancel()
        done, _ = await asyncio.wait({keeping}, timeout=3)
        assert done and keeping.cancelled()
    finally:
        keeping.cancel()
        await presence.close()
