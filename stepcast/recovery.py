"""Recovery without a human (DESIGN §2, invariant 3).

Every few seconds, in exactly one process at a time (a Postgres advisory lock
decides; it is safe to run in every server and worker):

- a processing job whose lease expired (its worker died or hangs) goes back to
  ``pending`` and is enqueued again, with a ``requeued`` event; after
  ``max_attempts`` claims it fails for good with code ``worker_lost``. A job
  whose cancel was asked for is canceled instead;
- a pending job that the queue does not hold (the enqueue failed, Redis lost
  its data) is enqueued again under the same id;
- a pending job past its queue TTL fails with code ``expired`` (workers refuse
  to claim it already).

Attempts a worker handed back on shutdown do not count against max attempts.

Stale workers cannot overwrite the new attempt: every worker write is fenced
by ``attempt``.
"""

from __future__ import annotations

import logging
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

from stepcast import queue
from stepcast.db import Database
from stepcast.events import EventLog
from stepcast.jobs import Job, Status
from stepcast.settings import Settings
from stepcast.tasks import every

logger = logging.getLogger(__name__)


class Recovery:
    def __init__(
        self,
        db: Database,
        events: EventLog,
        arq: ArqRedis,
        *,
        max_attempts: int,
        interval_s: float,
        enqueue_grace_s: float,
    ) -> None:
        self.db = db
        self.events = events
        self.arq = arq
        self.max_attempts = max_attempts
        self.interval_s = interval_s
        self.enqueue_grace_s = enqueue_grace_s

    @classmethod
    def from_settings(cls, settings: Settings, db: Database, events: EventLog, arq: ArqRedis) -> Recovery:
        return cls(
            db,
            events,
            arq,
            max_attempts=settings.max_attempts,
            interval_s=settings.recovery_interval_s,
            enqueue_grace_s=settings.enqueue_grace_s,
        )

    async def run(self) -> None:
        await every(self.interval_s, self.tick, "recovery")

    async def tick(self) -> bool:
        """One pass; False if another process holds the recovery lock."""
        async with self.db.singleton("recovery") as held:
            if not held:
                return False
            for job in await self.db.expired_leases():
                await self._expired(job)
            for job in await self.db.expired_in_queue():
                await self._expired_in_queue(job)
            for job in await self.db.pending_older_than(self.enqueue_grace_s):
                if not await self.arq.exists(job_key_prefix + str(job.id)):
                    log = {"job_id": str(job.id)}
                    logger.warning("pending job missing from the queue; enqueueing it again", extra=log)
                    await queue.enqueue(
                        self.arq, job.id, job.queue, place=job.created_at, ticket=queue.Ticket.of(job)
                    )
            return True

    async def _expired(self, job: Job) -> None:
        key = str(job.id)
        log = {"job_id": key, "attempt": job.attempt}
        if job.cancel_requested:
            await self._finish(job, Status.CANCELED, {})
        elif (lost := job.attempt - job.handoffs) >= self.max_attempts:
            message = f"the worker stopped responding on each of {lost} attempts (the most allowed)"
            await self._finish(job, Status.FAILED, {"error": {"code": "worker_lost", "message": message}})
        elif (requeued := await self.db.requeue_expired(job.id, job.attempt)) is not None:
            logger.warning("lease expired; job goes back to the queue", extra=log)
            fields = {"attempt": job.attempt + 1, "reason": "lease_expired"}
            await self.events.emit(key, job.owner, "requeued", fields, floor=requeued.last_seq)
            # The dead run's arq keys would make arq refuse (or delay) the same id.
            await self.arq.delete(job_key_prefix + key, in_progress_key_prefix + key, retry_key_prefix + key)
            await queue.enqueue(
                self.arq, job.id, job.queue, place=job.created_at, ticket=queue.Ticket.of(job)
            )

    async def _expired_in_queue(self, job: Job) -> None:
        key = str(job.id)
        waited = (job.queue_expires_at - job.created_at).total_seconds() if job.queue_expires_at else 0
        message = f"the job waited in the queue longer than its {waited:g} s limit"
        error = {"code": "expired", "message": message}
        seq = await self.events.reserve(key, floor=job.last_seq)
        done = await self.db.finish_pending(job.id, status=Status.FAILED, seq=seq, **error)
        if done is not None:
            logger.warning("job expired in the queue", extra={"job_id": key})
            await self.events.emit(key, job.owner, "failed", {"error": error}, floor=seq, seq=seq)

    async def _finish(self, job: Job, status: Status, fields: dict[str, Any]) -> None:
        """Record the terminal state with a reserved seq, then publish it."""
        key = str(job.id)
        seq = await self.events.reserve(key, floor=job.last_seq)
        error = fields.get("error") or {}
        done = await self.db.finish_expired(
            job.id, job.attempt, status=status, seq=seq, code=error.get("code"), message=error.get("message")
        )
        if done is not None:
            logger.warning("job %s by recovery", status.value, extra={"job_id": key, "attempt": job.attempt})
            await self.events.emit(key, job.owner, status.value, fields, floor=seq, seq=seq)
