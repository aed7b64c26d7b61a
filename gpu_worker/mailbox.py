"""What the pipeline thread reports, handed to the event loop in bunches.

A :class:`Mailbox` hands over at most once per ``interval_s``: a post after a quiet interval goes
at once, the posts close behind it go together at the end of that interval. Nothing is dropped or
reordered, nothing waits longer than ``interval_s``; with 0 every post goes at once. Why:
docs/events.md, "Where events live".
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """:meth:`post` from any thread; :meth:`get` on the loop: the items posted since the last
    hand-over, in order, or None once it is closed and emptied."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._lock = threading.Lock()  # the posting thread and the loop both touch what follows
        self._posted: list[T] = []
        self._due = False  # a hand-over is on its way to the loop
        self._handed_at = -interval_s  # (monotonic) so that the first post goes at once
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._bunches: asyncio.Queue[list[T] | None] = asyncio.Queue()

    def post(self, item: T) -> None:
        with self._lock:
            if self._closed:
                return
            self._posted.append(item)
            if self._due:
                return
            self._due = True
            wait_s = self._handed_at + self._interval_s - time.monotonic()
        self._loop.call_soon_threadsafe(self._schedule, wait_s)

    def _schedule(self, wait_s: float) -> None:
        if wait_s <= 0:
            self._hand_over()
        else:
            self._timer = self._loop.call_later(wait_s, self._hand_over)

    def _hand_over(self) -> None:
        self._timer = None
        with self._lock:
            posted, self._posted = self._posted, []
            self._due = False
            self._handed_at = time.monotonic()
        if posted:
            self._bunches.put_nowait(posted)

    def close(self) -> None:
        """On the loop: no more posts are taken; what was posted is handed over now."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._closed = True
            posted, self._posted = self._posted, []
        if posted:
            self._bunches.put_nowait(posted)
        self._bunches.put_nowait(None)

    async def get(self) -> list[T] | None:
        return await self._bunches.get()
