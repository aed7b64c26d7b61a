"""A worker's own liveness signal, for container probes.

Each worker touches a file on every heartbeat from its event loop; ``stepcast worker-alive`` fails
when the file is older than it should be. The probe must not import torch. Why not arq's health
check: docs/design.md, "Sharp edges in the libraries".
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
