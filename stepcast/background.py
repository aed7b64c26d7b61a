"""Small asyncio helpers shared by the server and the worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a background task and wait until it has really stopped; what it raised other than
    its cancellation goes on up. So does a cancellation of the caller meanwhile (a ``suppress``
    around ``await task`` would swallow that one, and a shutdown waiting on the caller hang)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and (failure := task.exception()) is not None:
        raise failure


def stop_if_cancelled(exc: Exception) -> None:
    """For a retry loop's ``except Exception``: raise CancelledError when this task was cancelled
    meanwhile. A cancellation can reach such a loop as another exception, raised by the cleanup it
    set off (an unlock on a connection it left mid-query), and a loop that retried would never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


async def every(interval_s: float, tick: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``tick`` now and then every ``interval_s``, for ever; a failed pass is logged and retried."""
    while True:
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stop_if_cancelled(exc)
            logger.exception("%s pass failed; trying again", what)
        await asyncio.sleep(interval_s)
