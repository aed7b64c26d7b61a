"""Small asyncio helpers shared by the server and the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a background task and wait until it has really stopped."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def every(interval_s: float, tick: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``tick`` now and then every ``interval_s``, for ever; a failed pass is logged and retried."""
    while True:
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s pass failed; trying again", what)
        await asyncio.sleep(interval_s)
