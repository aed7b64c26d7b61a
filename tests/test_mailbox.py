"""The mailbox between the pipeline thread and the event loop: a step after a quiet
interval goes at once, steps that come faster go together once an interval, in order,
and nothing is lost (gpu_worker/mailbox.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gpu_worker.mailbox import Mailbox


async def test_a_post_after_a_quiet_interval_goes_at_once_and_those_close_behind_wait_for_it() -> None:
    mailbox: Mailbox[int] = Mailbox(asyncio.get_running_loop(), interval_s=0.2)
    posted = time.monotonic()
    mailbox.post(1)
    assert await asyncio.wait_for(mailbox.get(), 0.1) == [1]  # at once
    mailbox.post(2)
    mailbox.post(3)
    assert await mailbox.get() == [2, 3]
    assert time.monotonic() - posted >= 0.19  # at the end of the interval, together
    await asyncio.sleep(0.25)
    quiet = time.monotonic()
    mailbox.post(4)
    assert await mailbox.get() == [4]
    assert time.monotonic() - quiet < 0.1


async def test_fast_posts_from_another_thread_arrive_in_order_once_an_interval() -> None:
    mailbox: Mailbox[int] = Mailbox(asyncio.get_running_loop(), interval_s=0.05)

    def pipeline() -> None:  # a step every 5 ms for half a second
        for step in range(1, 101):
            mailbox.post(step)
            time.sleep(0.005)

    thread = threading.Thread(target=pipeline)
    thread.start()
    bunches = []
    while sum(len(bunch) for bunch in bunches) < 100:
        bunch = await asyncio.wait_for(mailbox.get(), 1)
        assert bunch is not None
        bunches.append(bunch)
    thread.join()
    assert [step for bunch in bunches for step in bunch] == list(range(1, 101))
    assert len(bunches) <= 16  # about 0.55 s / 0.05 s, not 100


async def test_close_hands_over_what_waits_at_once_then_ends_and_takes_no_more() -> None:
    mailbox: Mailbox[int] = Mailbox(asyncio.get_running_loop(), interval_s=10)
    mailbox.post(1)
    assert await mailbox.get() == [1]
    mailbox.post(2)  # waits for an interval that has just begun…
    mailbox.close()  # …but the job is over: it goes now
    assert await asyncio.wait_for(mailbox.get(), 0.1) == [2]
    assert await mailbox.get() is None
    mailbox.post(3)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(mailbox.get(), 0.05)


async def test_with_no_interval_every_post_goes_alone() -> None:
    mailbox: Mailbox[int] = Mailbox(asyncio.get_running_loop(), interval_s=0)
    for step in range(1, 4):
        mailbox.post(step)
        assert await asyncio.wait_for(mailbox.get(), 0.1) == [step]
