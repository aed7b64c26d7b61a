"""Queue positions pushed as the queue moves: ``queued {position, eta_s}``.

One server at a time does it (a Postgres advisory lock elects it; another
takes over when it dies), once a second, and only for jobs whose position
changed. Near the head (position 10 or less) every change goes out; further
back a job hears at most every ``position / 10`` intervals (position 500:
every 50 s), so a deep queue moving fast costs tens of events a second, not
one per waiting job. ETAs scale measured seconds per step for the job's size
by the number of workers recently busy on its queue (:class:`EtaEstimator`
here; a submit reads the same figures in its one statement and shares
:func:`drain_s`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

from stepcast.db import Database
from stepcast.jobs import Job

if TYPE_CHECKING:
    from server.services import Services

logger = logging.getLogger(__name__)

EVERY_CHANGE_UP_TO = 10  # positions that hear of every move


class EtaEstimator:
    """Seconds until a pending job should be done: its position times the measured
    run time of jobs of its shape, shared among the workers busy on its queue.
    Caches per instance, so make one per pass."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._per_job: dict[tuple[str, int, int, int], float | None] = {}
        self._workers: dict[str, int] = {}

    async def eta_s(self, job: Job, position: int) -> float | None:
        params = job.params
        return await self.drain_s(job.queue, params["width"], params["height"], params["steps"], position)

    async def drain_s(self, queue: str, width: int, height: int, steps: int, jobs: int) -> float | None:
        """Seconds the queue's workers need for ``jobs`` jobs of this shape (None: never measured)."""
        shape = (queue, width, height, steps)
        if shape not in self._per_job:
            self._per_job[shape] = await self.db.mean_run_s(*shape)
        mean = self._per_job[shape]
        if mean is None:
            return None
        if queue not in self._workers:
            self._workers[queue] = await self.db.active_workers(queue)
        return drain_s(jobs, mean, self._workers[queue])


def drain_s(jobs: int, mean_run_s: float | None, workers: int) -> float | None:
    """Seconds ``workers`` need for ``jobs`` jobs of ``mean_run_s`` each (None: never measured)."""
    return None if mean_run_s is None else round(jobs * mean_run_s / workers, 3)


class QueueAnnouncer:
    def __init__(self, services: Services, *, interval_s: float) -> None:
        self.services = services
        self.interval_s = interval_s
        self._announced: dict[uuid.UUID, tuple[int, float]] = {}  # position, when

    async def run(self) -> None:
        while True:
            try:
                # While another server announces, poll for the lock (it frees on that server's exit).
                async with self.services.db.singleton("queue_announcer") as leader:
                    while leader:
                        await self.tick()
                        await asyncio.sleep(self.interval_s)
                await asyncio.sleep(self.interval_s * 2)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("queue announcer failed; retrying")
                self._announced.clear()
                await asyncio.sleep(self.interval_s)

    def _due(self, job_id: uuid.UUID, position: int, now: float) -> bool:
        if job_id not in self._announced:
            return True
        last_position, last_at = self._announced[job_id]
        if position == last_position:
            return False
        if position <= EVERY_CHANGE_UP_TO:
            return True
        return now - last_at >= self.interval_s * position / EVERY_CHANGE_UP_TO

    async def tick(self) -> None:
        db, events = self.services.db, self.services.events
        pending = await db.pending_positions()
        estimator = EtaEstimator(db)
        now = time.monotonic()
        for job, position in pending:
            if not self._due(job.id, position, now):
                continue
            fields = {"position": position, "eta_s": await estimator.eta_s(job, position)}
            await events.emit(
                str(job.id), job.owner, "queued", fields, floor=job.last_seq, position_update=True
            )
            self._announced[job.id] = (position, now)
        live = {job.id for job, _ in pending}
        for job_id in [j for j in self._announced if j not in live]:
            del self._announced[job_id]
