"""Recovery without a human: periodic passes, each in one process at a time (an advisory lock).

A job whose worker is gone (its session ended, or its lease expired) goes back to ``pending``
with a ``requeued`` event saying where the next attempt resumes (or fails with ``worker_lost``
after ``max_attempts``, or is canceled if a cancel was asked); a pending job the queue does not
hold is enqueued again (the ``HEAD_ROWS`` first in the queues' order and ``SWEEP_ROWS`` more by
age each pass); a job past its queue TTL fails with ``expired``; a job a server of before fair
shares inserted gets its place in its queue's turns. docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime

import asyncpg
from arq.connections import ArqRedis

from stepcast import queue
from stepcast.background import every, stop_if_cancelled
from stepcast.checkpoints import Checkpoints
from stepcast.db import Database
from stepcast.events import Canceled, EventLog, Failed, Terminal
from stepcast.jobs import Job
from stepcast.lifecycle import Lifecycle, Speaker
from stepcast.models import queue_of
from stepcast.redis_keys import DEFAULT_QUEUE
from stepcast.settings import SharedSettings
from stepcast.status import Status

logger = logging.getLogger(__name__)


class Recovery:
    HEAD_ROWS = 100  # the pending jobs first in the queues' order, checked against the queue every pass
    SWEEP_ROWS = 250  # and this many more per pass, sweeping the rest of the queue

    def __init__(
        self,
        db: Database,
        events: EventLog,
        arq: ArqRedis,
        *,
        max_attempts: int,
        interval_s: float,
        enqueue_grace_s: float,
        session_check_s: float = 0.25,
        session_confirm_s: float = 1.0,
        queue_prefix: str = DEFAULT_QUEUE,
    ) -> None:
        self.db = db
        self.lifecycle = Lifecycle(db, events)
        self.checkpoints = Checkpoints(events.redis, ttl_s=events.ttl_s)
        self.arq = arq
        self.max_attempts = max_attempts
        self.interval_s = interval_s
        self.enqueue_grace_s = enqueue_grace_s
        self.session_check_s = session_check_s
        self.session_confirm_s = session_confirm_s
        self.queue_prefix = queue_prefix
        self._swept_to: tuple[datetime, uuid.UUID] | None = None  # the last job checked
        # (job, attempt, session) -> when this process first saw the session gone
        self._gone: dict[tuple[uuid.UUID, int, int | None], float] = {}

    @classmethod
    def from_settings(
        cls, settings: SharedSettings, db: Database, events: EventLog, arq: ArqRedis
    ) -> Recovery:
        return cls(
            db,
            events,
            arq,
            max_attempts=settings.max_attempts,
            interval_s=settings.recovery_interval_s,
            enqueue_grace_s=settings.enqueue_grace_s,
            session_check_s=settings.session_check_s,
            session_confirm_s=settings.session_confirm_s,
            queue_prefix=settings.queue_name,
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as passes:
            passes.create_task(every(self.interval_s, self.tick, "recovery"))
            passes.create_task(self.watch_sessions())

    async def watch_sessions(self) -> None:
        """For ever: once this process holds the sessions lock (kept, not taken each pass; the
        others wait for it), look every ``session_check_s`` for jobs whose worker's session is
        gone."""
        while True:
            try:
                async with self.db.leading("sessions") as conn:
                    while True:  # until a query fails: the lock's connection (and lock) gone
                        await self.check_sessions(conn)
                        await asyncio.sleep(self.session_check_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stop_if_cancelled(exc)
                logger.warning("sessions pass failed (%s); trying again", exc)
            self._gone.clear()
            await asyncio.sleep(self.session_check_s)

    async def check_sessions(self, conn: asyncpg.Connection | None = None) -> list[Job]:
        """One look: jobs whose worker's session has stayed gone ``session_confirm_s`` go
        back to the queue (or fail, or are canceled); those it took."""
        now = time.monotonic()
        gone = {
            (job.id, job.attempt, job.worker_session): job
            for job in await self.db.recovery.lost_sessions(conn)
        }
        self._gone = {key: self._gone.get(key, now) for key in gone}
        taken = [job for key, job in gone.items() if now - self._gone[key] >= self.session_confirm_s]
        for job in taken:
            await self._expired(job, "worker_lost")
        return taken

    async def tick(self) -> bool:
        """One pass; False if another process holds the recovery lock."""
        async with self.db.singleton("recovery") as held:
            if not held:
                return False
            for job in await self.db.recovery.expired_leases():
                await self._expired(job, "lease_expired")
            for job in await self.db.recovery.expired_in_queue():
                await self._expired_in_queue(job)
            for job in await self.db.recovery.tag_untagged(self.enqueue_grace_s):
                logger.info(
                    "pending job from before fair shares given its place", extra={"job_id": str(job.id)}
                )
                await queue.rescore(self.arq, job)
            waiting = await self._pending_to_check()
            queued = await queue.held(self.arq, waiting)
            for job in waiting:
                log = {"job_id": str(job.id)}
                if job.queue != self._queue_of(job):
                    logger.warning("pending job on another queue than its model's; moving it", extra=log)
                    await self._enqueue_again(job)
                elif job.id not in queued:
                    logger.warning("pending job missing from the queue; enqueueing it again", extra=log)
                    await self._enqueue_again(job)
            return True

    def _queue_of(self, job: Job) -> str:
        return queue_of(self.queue_prefix, job.model_name)

    async def _enqueue_again(self, job: Job) -> None:
        """In its first place in its model's queue, with a ticket from its row (it says where
        the job resumes). A job an older version left on the one queue of before (it had no
        queue per model) moves to its model's first. ``afresh``: the keys arq keeps of an
        earlier run (a dead worker's) would make arq refuse or delay the same id."""
        if job.queue != (model_queue := self._queue_of(job)):
            moved = await self.db.recovery.move_to_queue(job.id, model_queue)
            if moved is None:  # it left the queue meanwhile (started, canceled)
                return
            job = moved
        ticket = queue.Ticket.of(job)
        await queue.enqueue(
            self.arq, job.id, job.queue, place=queue.place_of(job), ticket=ticket, afresh=True
        )

    async def _pending_to_check(self) -> list[Job]:
        """The heads of the queues (the next to run, in the queues' order) and the next page of
        the sweep, which goes through every pending job by age."""
        grace_s = self.enqueue_grace_s
        head = await self.db.recovery.head(grace_s, limit=self.HEAD_ROWS)
        if len(head) < self.HEAD_ROWS:  # the head is the whole queue
            self._swept_to = None
            return head
        besides = [job.id for job in head]
        page = await self.db.recovery.pending_after(
            grace_s, self._swept_to, limit=self.SWEEP_ROWS, besides=besides
        )
        self._swept_to = (page[-1].created_at, page[-1].id) if len(page) == self.SWEEP_ROWS else None
        return head + page

    async def _expired(self, job: Job, reason: str) -> None:
        """The job's worker is gone (``reason``): the job goes back to the queue, to resume
        from its newest checkpoint, unless it was canceled or has lost too many attempts."""
        log = {"job_id": str(job.id), "attempt": job.attempt}
        if job.cancel_requested:
            await self._finish(job, Status.CANCELED, Canceled())
            return
        if (lost := job.attempt - job.handoffs) >= self.max_attempts:
            message = f"the worker stopped responding on each of {lost} attempts (the most allowed)"
            await self._finish(job, Status.FAILED, Failed(code="worker_lost", message=message))
            return
        step = await self.checkpoints.step_of(str(job.id))
        back = await self.lifecycle.requeue(
            job,
            reason,
            lambda: self.db.recovery.requeue_expired(job.id, job.attempt, resume_step=step),
            resume_step=step,
        )
        if back is not None:
            logger.warning("worker gone (%s); job goes back to the queue", reason, extra=log)
            await self._enqueue_again(back)

    async def _expired_in_queue(self, job: Job) -> None:
        waited = (job.queue_expires_at - job.created_at).total_seconds() if job.queue_expires_at else 0
        message = f"the job waited in the queue longer than its {waited:g} s limit"
        done = await self.lifecycle.finish(
            job,
            Status.FAILED,
            Speaker.waiting(job),
            lambda seq: self.db.jobs.finish_pending(
                job.id, status=Status.FAILED, seq=seq, code="expired", message=message
            ),
            Failed(code="expired", message=message),
        )
        if done is not None:
            logger.warning("job expired in the queue", extra={"job_id": str(job.id)})

    async def _finish(self, job: Job, status: Status, event: Terminal) -> None:
        """A terminal state for a job whose worker is gone; from then on Redis refuses its
        attempt's events (the event speaks for the next attempt)."""
        code, message = (event.code, event.message) if isinstance(event, Failed) else (None, None)
        done = await self.lifecycle.finish(
            job,
            status,
            Speaker.waiting(job),
            lambda seq: self.db.recovery.finish_expired(
                job.id, job.attempt, status=status, seq=seq, code=code, message=message
            ),
            event,
        )
        if done is not None:
            logger.warning(
                "job %s by recovery", status.value, extra={"job_id": str(job.id), "attempt": job.attempt}
            )
