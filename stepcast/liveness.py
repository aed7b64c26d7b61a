"""A worker's own liveness signal, for container probes.

arq's health-check key is one per queue and refreshed hourly, so it cannot
tell one stuck worker from a healthy one. Each worker instead touches a file
on every heartbeat from its event loop; ``stepcast worker-alive`` (a
liveness probe) fails when the file is older than it should be. Light on
purpose: the probe must not import torch.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path


async def keep_alive(path: Path, every_s: float) -> None:
    """Touch ``path`` every ``every_s``: a stuck event loop (or process) stops touching it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        # Deliberately on the loop itself: if the loop is blocked, the file goes stale.
        path.touch()  # noqa: ASYNC240
        await asyncio.sleep(every_s)


def alive(path: Path, max_age_s: float) -> bool:
    """Was ``path`` touched within ``max_age_s``?"""
    try:
        return time.time() - path.stat().st_mtime <= max_age_s
    except FileNotFoundError:
        return False
