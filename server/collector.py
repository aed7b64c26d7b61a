"""CPython's cyclic garbage collector, paced for a process holding thousands of sockets.

:class:`Collector` collects the young generations every ``freeze_every_s`` and freezes what
survived (also after each collection CPython starts by itself), so no collection rescans the
long-lived sockets; every ``sweep_every_s`` (``STEPCAST_GC_SWEEP_S``) it unfreezes, collects
everything and freezes again. Why, and the figures: docs/scaling.md, "Capacity model".
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

logger = logging.getLogger(__name__)


class Collector:
    def __init__(self, *, freeze_every_s: float = 0.1, sweep_every_s: float) -> None:
        self.freeze_every_s = freeze_every_s
        self.sweep_every_s = sweep_every_s

    def tick(self) -> None:
        """Collect the young generations and freeze their survivors."""
        gc.collect(1)
        gc.freeze()

    def sweep(self) -> int:
        """Collect every object, frozen ones too, and freeze the survivors; what was freed."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        logger.info(
            "garbage sweep",
            extra={
                "objects_freed": found,
                "objects_kept": gc.get_freeze_count(),
                "sweep_s": round(time.perf_counter() - started, 3),
            },
        )
        return found

    @staticmethod
    def _after_collection(phase: str, info: dict[str, int]) -> None:
        # After every collection, CPython's own ones included: a loop busy for seconds (a
        # connect storm) runs no tick, and what it builds must not pile up unfrozen.
        if phase == "stop":
            gc.freeze()

    async def run(self) -> None:
        gc.callbacks.append(self._after_collection)
        try:
            self.sweep()  # start-up's garbage goes, what it built is frozen
            last_sweep = time.monotonic()
            while True:
                await asyncio.sleep(self.freeze_every_s)
                if time.monotonic() - last_sweep >= self.sweep_every_s:
                    self.sweep()
                    last_sweep = time.monotonic()
                else:
                    self.tick()
        finally:
            gc.callbacks.remove(self._after_collection)
            gc.unfreeze()  # whoever runs next in this process collects as CPython does
