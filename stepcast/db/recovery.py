"""What the recovery pass (:mod:`stepcast.recovery`) reads and writes: expired leases, pending jobs.

Its writes are fenced like the worker's (``attempt``) and by the lease having
run out, so a worker that renewed meanwhile keeps its job.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from stepcast.db.store import Store
from stepcast.db.timings import FINISH_TIMES
from stepcast.jobs import Job
from stepcast.status import Status


class RecoveryStore(Store):
    async def expired_leases(self) -> list[Job]:
        rows = await self.pool.fetch(
            """
            SELECT * FROM jobs WHERE status = 'processing' AND lease_expires_at < now()
            ORDER BY lease_expires_at
            """
        )
        return [Job.from_record(row) for row in rows]

    async def requeue_expired(self, job_id: uuid.UUID, attempt: int) -> Job | None:
        """Back to pending, unless the worker renewed its lease meanwhile (fenced) or a cancel
        was asked for (the recovery pass cancels it instead: a pending job no claim accepts
        would wait for nothing)."""
        row = await self.pool.fetchrow(
            """
            UPDATE jobs SET status = 'pending', worker = NULL, lease_expires_at = NULL, progress_step = 0
            WHERE id = $1 AND attempt = $2 AND status = 'processing' AND lease_expires_at < now()
              AND NOT cancel_requested
            RETURNING *
            """,
            job_id,
            attempt,
        )
        return Job.from_record(row) if row else None

    async def finish_expired(
        self,
        job_id: uuid.UUID,
        attempt: int,
        *,
        status: Status,
        seq: int,
        code: str | None = None,
        message: str | None = None,
    ) -> Job | None:
        """A terminal state for a job whose worker is gone (fenced like requeue_expired)."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE jobs SET status = $3, error_code = $4, error_message = $5, last_seq = $6, {FINISH_TIMES}
            WHERE id = $1 AND attempt = $2 AND status = 'processing' AND lease_expires_at < now()
            RETURNING *
            """,
            job_id, attempt, status.value, code, message, seq,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    async def pending_after(
        self, seconds: float, after: tuple[datetime, uuid.UUID] | None, *, limit: int
    ) -> list[Job]:
        """Up to ``limit`` jobs pending for over ``seconds``, in queue order from just after
        ``after`` (a job's ``(created_at, id)``; None: from the oldest): a page of a sweep."""
        rows = await self.pool.fetch(
            """
            SELECT * FROM jobs
            WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
              AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
            ORDER BY created_at, id LIMIT $4
            """,
            seconds,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [Job.from_record(row) for row in rows]

    async def expired_in_queue(self, *, limit: int = 1000) -> list[Job]:
        """Pending jobs past their queue TTL."""
        rows = await self.pool.fetch(
            """
            SELECT * FROM jobs WHERE status = 'pending' AND queue_expires_at <= now()
            ORDER BY queue_expires_at LIMIT $1
            """,
            limit,
        )
        return [Job.from_record(row) for row in rows]
