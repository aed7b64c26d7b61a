"""CPython's cyclic garbage collector, paced for a process holding thousands of sockets.

A server's objects are mostly long-lived: each open WebSocket holds about a
hundred tracked objects (its protocol, parser, ASGI task and our feed) for as
long as it stays open. CPython 3.11 rescans all of them in every full
collection (0.6-0.8 s with 10,000 sockets, whenever the old generation has
grown by a quarter), and its young collections grow to tens of milliseconds
when old objects die as fast as new ones are born (a freed object counts
against the young generation's allocations, so the young list grows past its
threshold unseen). Either stalls every socket of the process.

So the server's process keeps to this schedule (:class:`Collector`):

- every ``freeze_every_s`` (0.1 s): collect the young generations (they
  hold at most 0.1 s of survivors: a millisecond or two), then freeze what
  survived; and freeze after every collection CPython starts on its own too,
  since a loop busy for seconds (a connect storm) runs no timer. Frozen
  objects are out of every later collection, so no collection rescans the
  sockets;
- every ``sweep_every_s`` (``STEPCAST_GC_SWEEP_S``): unfreeze, collect
  everything, freeze again. This frees cyclic garbage among objects that were
  frozen while alive. It is the one pause that grows with the sockets, so it
  is rare: the socket path itself makes no cyclic garbage (a test holds it to
  that), and an object freed by its reference count is freed frozen or not.

The automatic collector stays on between ticks: garbage among the young is
found as before.
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
