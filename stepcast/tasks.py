"""Small asyncio helpers shared by the server and the worker."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a background task and wait until it has really stopped."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
