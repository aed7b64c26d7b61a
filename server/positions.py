"""Queue positions pushed as the queue moves: ``queued {position, eta_s, estimated_start_at}``.

One server at a time (:class:`QueueAnnouncer`, elected by an advisory lock) pushes, once a second,
the positions that changed (in the queue's order, owners taking turns: docs/scheduling.md): near
the head every pass, further back every ``position / 10`` to ``position / 5`` passes, so a pass
reads a few dozen rows however deep the queue. :class:`EtaEstimator` makes the estimates.
docs/protocol.md, "Guarantees".
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.catalog import ModelCatalog
from stepcast.background import stop_if_cancelled
from stepcast.db import Database, Pace, Place
from stepcast.events import Queued
from stepcast.jobs import Job, timestamp
from stepcast.lifecycle import Lifecycle, Speaker

logger = logging.getLogger(__name__)

EVERY_CHANGE_UP_TO = 10  # positions read every pass
# Where each band of positions starts: band b (from 10 * 2**(b-1) + 1) is read every 2**b passes.
BANDS = tuple(EVERY_CHANGE_UP_TO * 2**band + 1 for band in range(40))
UNKNOWN_PACE = Pace(megapixel_step_s=None, workers=1)
NO_WORKER = "no_worker"  # a queued event's reason for its null ETA


@dataclass(frozen=True)
class Estimate:
    """When a pending job should start and be done, in seconds from now (None: not known)."""

    start_in_s: float | None
    done_in_s: float | None

    def start_at(self) -> str | None:
        """The start as a wire timestamp."""
        if self.start_in_s is None:
            return None
        return timestamp(datetime.now(UTC) + timedelta(seconds=self.start_in_s))


class EtaEstimator:
    """When a pending job should start: the work running now and the work waiting ahead of it
    in the queue's order, at the queue's measured pace, shared among its busy workers
    (:class:`Pace`); done: that, and its own work on one worker.

    A queue's pace is read once per ``max_age_s`` (one statement, whose answer the submits
    and announcements meanwhile share): submits at hundreds a second each reading the
    queue's recent history would cost Postgres more than the insert does.
    """

    # Past this many queues held, a miss first forgets the stale ones.
    PRUNE_AT = 256

    def __init__(self, db: Database, catalog: ModelCatalog, *, max_age_s: float) -> None:
        self.db = db
        self.catalog = catalog
        self.max_age_s = max_age_s
        self._paces: dict[str, tuple[float, asyncio.Future[Pace]]] = {}

    def pace(self, queue: str) -> asyncio.Future[Pace]:
        """The queue's pace: done at once while the last reading is fresh; otherwise read now,
        in a task, so a submit reads it while it inserts."""
        now = time.monotonic()
        held = self._paces.get(queue)
        if held is not None and now - held[0] < self.max_age_s:
            return held[1]
        if len(self._paces) >= self.PRUNE_AT:
            for stale in [k for k, (at, _) in self._paces.items() if now - at >= self.max_age_s]:
                del self._paces[stale]
        reading = asyncio.ensure_future(self._read(queue))
        self._paces[queue] = (now, reading)
        return reading

    async def _read(self, queue: str) -> Pace:
        try:
            return await self.db.counts.pace(queue)
        except Exception as exc:  # an ETA is a nicety: a job is placed without one
            logger.warning("could not read the queue's pace: %s", exc)
            return UNKNOWN_PACE

    async def queued(self, job: Job, place: Place) -> Queued:
        """The job's ``queued`` event: its place and ETA, or no ETA and why while no worker of
        its model runs (one will start it: a pool scaling up from zero, a restart)."""
        return await self.queued_for(job, place, await self.waiting_reason(job))

    async def queued_for(self, job: Job, place: Place, reason: str | None) -> Queued:
        """:meth:`queued`, its reason known (the ETA is read only when there is none)."""
        if reason is not None:
            return Queued(position=place.position, eta_s=None, reason=reason)
        estimate = await self.estimate(job, place)
        return Queued(place.position, estimate.done_in_s, estimated_start_at=estimate.start_at())

    async def start_at(self, job: Job, place: Place) -> str | None:
        """When the job at ``place`` should start (None: not known, or no worker of its model runs)."""
        if await self.waiting_reason(job) is not None:
            return None
        return (await self.estimate(job, place)).start_at()

    async def waiting_reason(self, job: Job) -> str | None:
        """Why the job has no ETA: ``no_worker`` while no worker of its model runs."""
        return None if await self.catalog.live_workers(job.model_name) else NO_WORKER

    async def estimate(self, job: Job, place: Place) -> Estimate:
        """After the work ahead, its own: only the steps left to it if it resumes."""
        params = job.params
        pace = await self.pace(job.queue)
        start = pace.start_in_s(place)
        own = pace.seconds(params.megapixel_steps * (1 - (job.resumed_from_step or 0) / params.steps))
        done = None if start is None or own is None else round(start + own, 3)
        return Estimate(start, done)

    async def would_start_in_s(self, queue: str, share: str, model: str) -> float | None:
        """When a job of ``share`` (an owner, or a browser session's address) submitted now to
        ``queue`` should start (None: not known, or no worker of ``model`` runs)."""
        if not await self.catalog.live_workers(model):
            return None
        place = await self.db.counts.place_of_new(queue, share)
        return (await self.pace(queue)).start_in_s(place)


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
        for job, place in await db.counts.positions_due(self._turn, BANDS):
            told = self._announced.get(job.id)
            reason = await estimator.waiting_reason(job)
            if told is None or told[0] != (place.position, reason):  # (its ETA only then)
                queued = await estimator.queued_for(job, place, reason)
                await lifecycle.emit(job.id, job.owner, queued, Speaker.waiting(job), position_update=True)
            self._announced[job.id] = ((place.position, reason), self._turn)
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
