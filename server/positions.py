"""Queue positions pushed as the queue moves: ``queued {position, eta_s}``.

One server at a time (:class:`QueueAnnouncer`, elected by an advisory lock) pushes, once a second,
the positions that changed: near the head every pass, further back every ``position / 10`` to
``position / 5`` passes, so a pass reads a few dozen rows however deep the queue.
:class:`EtaEstimator` makes the ETAs. docs/protocol.md, "Guarantees".
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
import uuid

from server.catalog import ModelCatalog
from stepcast.background import stop_if_cancelled
from stepcast.db import Database, Pace
from stepcast.events import Queued
from stepcast.jobs import Job
from stepcast.lifecycle import Lifecycle, Speaker

logger = logging.getLogger(__name__)

EVERY_CHANGE_UP_TO = 10  # positions read every pass
# Where each band of positions starts: band b (from 10 * 2**(b-1) + 1) is read every 2**b passes.
BANDS = tuple(EVERY_CHANGE_UP_TO * 2**band + 1 for band in range(40))
UNKNOWN_PACE = Pace(per_step_s=None, workers=1)
NO_WORKER = "no_worker"  # a queued event's reason for its null ETA


class EtaEstimator:
    """Seconds until a pending job should be done: its position times the measured run time
    of jobs of its size, shared among the workers busy on its queue (:class:`Pace`).

    A queue's pace for a size is read once per ``max_age_s`` (one statement, whose answer
    the submits and announcements meanwhile share): submits at hundreds a second each
    reading the queue's recent history would cost Postgres more than the insert does.
    """

    # Past this many sizes held, a miss first forgets the stale ones.
    PRUNE_AT = 256

    def __init__(self, db: Database, catalog: ModelCatalog, *, max_age_s: float) -> None:
        self.db = db
        self.catalog = catalog
        self.max_age_s = max_age_s
        self._paces: dict[tuple[str, int, int], tuple[float, asyncio.Future[Pace]]] = {}

    def pace(self, queue: str, width: int, height: int) -> asyncio.Future[Pace]:
        """The queue's pace for this size: done at once while the last reading is fresh;
        otherwise read now, in a task, so a submit reads it while it inserts."""
        key = (queue, width, height)
        now = time.monotonic()
        held = self._paces.get(key)
        if held is not None and now - held[0] < self.max_age_s:
            return held[1]
        if len(self._paces) >= self.PRUNE_AT:
            for stale in [k for k, (at, _) in self._paces.items() if now - at >= self.max_age_s]:
                del self._paces[stale]
        reading = asyncio.ensure_future(self._read(key))
        self._paces[key] = (now, reading)
        return reading

    async def _read(self, key: tuple[str, int, int]) -> Pace:
        try:
            return await self.db.counts.pace(*key)
        except Exception as exc:  # an ETA is a nicety: a job is placed without one
            logger.warning("could not read the queue's pace: %s", exc)
            return UNKNOWN_PACE

    async def queued(self, job: Job, position: int) -> Queued:
        """The job's ``queued`` event: its place and ETA, or no ETA and why while no worker of
        its model runs (one will start it: a pool scaling up from zero, a restart)."""
        return await self.queued_for(job, position, await self.waiting_reason(job))

    async def queued_for(self, job: Job, position: int, reason: str | None) -> Queued:
        """:meth:`queued`, its reason known (the ETA is read only when there is none)."""
        if reason is not None:
            return Queued(position=position, eta_s=None, reason=reason)
        return Queued(position=position, eta_s=await self.eta_s(job, position))

    async def waiting_reason(self, job: Job) -> str | None:
        """Why the job has no ETA: ``no_worker`` while no worker of its model runs."""
        return None if await self.catalog.live_workers(job.model_name) else NO_WORKER

    async def eta_s(self, job: Job, position: int) -> float | None:
        """The jobs ahead, whole, then this one's own steps: only those left to it if it
        resumes from a checkpoint."""
        params = job.params
        pace = await self.pace(job.queue, params.width, params.height)
        ahead = pace.drain_s(position - 1, params.steps)
        own = pace.drain_s(1, params.steps - (job.resumed_from_step or 0))
        return None if ahead is None or own is None else round(ahead + own, 3)


class QueueAnnouncer:
    # Every this many passes, forget the jobs not read for twice their band's period (and more).
    FORGET_EVERY = 64

    def __init__(self, db: Database, lifecycle: Lifecycle, eta: EtaEstimator, *, interval_s: float) -> None:
        self.db = db
        self.lifecycle = lifecycle
        self.eta = eta
        self.interval_s = interval_s
        self._turn = 0
        # What each job was told (its position, and whether a worker runs), and the turn it was read.
        self._announced: dict[uuid.UUID, tuple[tuple[int, str | None], int]] = {}

    async def run(self) -> None:
        while True:
            try:
                # While another server announces, poll for the lock (it frees on that server's exit).
                async with self.db.singleton("queue_announcer") as leader:
                    while leader:
                        await self.tick()
                        await asyncio.sleep(self.interval_s)
                await asyncio.sleep(self.interval_s * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stop_if_cancelled(exc)
                logger.exception("queue announcer failed; retrying")
                self._announced.clear()
                await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        db, lifecycle, estimator = self.db, self.lifecycle, self.eta
        self._turn += 1
        for job, position in await db.counts.positions_due(self._turn, BANDS):
            told = self._announced.get(job.id)
            reason = await estimator.waiting_reason(job)
            if told is None or told[0] != (position, reason):  # (its ETA only then)
                queued = await estimator.queued_for(job, position, reason)
                await lifecycle.emit(job.id, job.owner, queued, Speaker.waiting(job), position_update=True)
            self._announced[job.id] = ((position, reason), self._turn)
        if self._turn % self.FORGET_EVERY == 0:
            self._forget_gone()

    def _forget_gone(self) -> None:
        """Drop the jobs that left the queue: those not read for twice their band's period
        and ``FORGET_EVERY`` passes more (one still waiting that is dropped, because its
        position went up, is only told its position again)."""
        for job_id, ((position, _), turn) in list(self._announced.items()):
            if self._turn - turn > 2 * period(position) + self.FORGET_EVERY:
                del self._announced[job_id]


def period(position: int) -> int:
    """Every how many passes a job at ``position`` is read."""
    return 1 << bisect.bisect_right(BANDS, position)
