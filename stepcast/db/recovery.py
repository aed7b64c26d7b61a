"""What the recovery pass (:mod:`stepcast.recovery`) reads and writes: lost workers, pending jobs.

A worker is lost when its lease ran out, or when no session holds its session lock
(:mod:`stepcast.db.presence`). The pass's writes are fenced like the worker's (``attempt``)
and by the worker still being lost, so a worker that renewed (or came back) meanwhile keeps
its job.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from stepcast.db.presence import LOCK_CLASS
from stepcast.db.store import Store
from stepcast.db.timings import FINISH_TIMES
from stepcast.jobs import Job
from stepcast.status import Status

# The worker running the job is gone: its lease ran out, or its session ended.
_LOST = """(lease_expires_at < now()
            OR (worker_session IS NOT NULL AND NOT worker_session_alive(worker_session)))"""


class RecoveryStore(Store):
    async def expired_leases(self) -> list[Job]:
        rows = await self.pool.fetch(
            """
            SELECT * FROM jobs WHERE status = 'processing' AND lease_expires_at < now()
            ORDER BY lease_expires_at
            """
        )
        return [Job.from_record(row) for row in rows]

    async def lost_sessions(self, via: asyncpg.Connection | asyncpg.Pool | None = None) -> list[Job]:
        """Processing jobs whose worker's session no connection holds (read in one pass over
        the locks). ``via``: the connection to ask on (the one holding the pass's lock)."""
        rows = await (via or self.pool).fetch(
            """
            SELECT * FROM jobs
            WHERE status = 'processing' AND worker_session IS NOT NULL
              AND worker_session::oid NOT IN (
                SELECT objid FROM pg_locks
                WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::oid
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
            """,
            LOCK_CLASS,
        )
        return [Job.from_record(row) for row in rows]

    async def requeue_expired(self, job_id: uuid.UUID, attempt: int, *, resume_step: int = 0) -> Job | None:
        """Back to pending, to resume from ``resume_step`` (0: from the start), unless the
        worker renewed its lease or came back meanwhile (fenced) or a cancel was asked for
        (the recovery pass cancels it instead: a pending job no claim accepts would wait for
        nothing)."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE jobs SET status = 'pending', worker = NULL, lease_expires_at = NULL,
                worker_session = NULL, progress_step = $3, resumed_from_step = nullif($3, 0)
            WHERE id = $1 AND attempt = $2 AND status = 'processing' AND {_LOST}
              AND NOT cancel_requested
            RETURNING *
            """,
            job_id,
            attempt,
            resume_step,
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
            WHERE id = $1 AND attempt = $2 AND status = 'processing' AND {_LOST}
            RETURNING *
            """,
            job_id, attempt, status.value, code, message, seq,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    async def pending_after(
        self,
        seconds: float,
        after: tuple[datetime, uuid.UUID] | None,
        *,
        limit: int,
        besides: Sequence[uuid.UUID] = (),
    ) -> list[Job]:
        """Up to ``limit`` jobs pending for over ``seconds``, by age from just after ``after``
        (a job's ``(created_at, id)``; None: from the oldest), but for those ``besides``: a
        page of a sweep."""
        rows = await self.pool.fetch(
            """
            SELECT * FROM jobs
            WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
              AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3)) AND id <> ALL($5::uuid[])
            ORDER BY created_at, id LIMIT $4
            """,
            seconds,
            after[0] if after else None,
            after[1] if after else None,
            limit,
            list(besides),
        )
        return [Job.from_record(row) for row in rows]

    async def head(self, seconds: float, *, limit: int) -> list[Job]:
        """The first ``limit`` jobs of each queue pending for over ``seconds``, in its order
        (docs/scheduling.md): those a worker takes next. The queues are those the kept counts
        say have pending jobs."""
        rows = await self.pool.fetch(
            """
            SELECT first.* FROM (
                SELECT key FROM job_counts WHERE kind = 'pending' GROUP BY key HAVING sum(n) > 0
            ) queues CROSS JOIN LATERAL (
                SELECT * FROM jobs
                WHERE queue = queues.key AND status = 'pending'
                  AND created_at < now() - make_interval(secs => $1)
                ORDER BY fair_tag, id LIMIT $2
            ) first
            """,
            seconds,
            limit,
        )
        return [Job.from_record(row) for row in rows]

    async def tag_untagged(self, seconds: float, *, limit: int = 1000) -> list[Job]:
        """Give pending jobs that a server of before fair shares inserted (no fair tag) over
        ``seconds`` ago (time for it to enqueue them) their place: behind their share's
        unfinished jobs or at the queue's clock, a share's in the order they came, 1 ms of
        virtual time apart; and their work (their cost stays unknown: they count nothing
        against a budget)."""
        rows = await self.pool.fetch(
            """
            WITH untagged AS (
                SELECT id, queue, coalesce('address:' || anonymous_address, owner) AS share,
                       row_number() OVER (PARTITION BY queue, coalesce('address:' || anonymous_address, owner)
                                          ORDER BY created_at, id) AS k
                FROM jobs
                WHERE status = 'pending' AND fair_tag IS NULL
                  AND created_at < now() - make_interval(secs => $1)
                ORDER BY created_at, id LIMIT $2
            )
            UPDATE jobs j SET
                fair_tag = share_start(u.queue, u.share, queue_clock(u.queue)) + (u.k - 1),
                fair_finish = share_start(u.queue, u.share, queue_clock(u.queue)) + u.k,
                fair_share = u.share,
                work = params_work(params)
            FROM untagged u
            WHERE j.id = u.id AND j.status = 'pending' AND j.fair_tag IS NULL
            RETURNING j.*
            """,
            seconds,
            limit,
        )
        return [Job.from_record(row) for row in rows]

    async def move_to_queue(self, job_id: uuid.UUID, to_queue: str) -> Job | None:
        """A pending job to another queue (its model's); None if it is no longer pending."""
        # Its place is its new queue's: the clocks of two queues do not compare.
        row = await self.pool.fetchrow(
            """
            UPDATE jobs SET queue = $2,
                fair_tag = share_start($2, fair_share, queue_clock($2)),
                fair_finish = share_start($2, fair_share, queue_clock($2)) + greatest(coalesce(cost_ms, 0), 1)
            WHERE id = $1 AND status = 'pending'
            RETURNING *
            """,
            job_id,
            to_queue,
        )
        return Job.from_record(row) if row else None

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
