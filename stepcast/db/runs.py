"""A job's run, as the worker that claimed it records it: claim, heartbeat, finish, hand back.

Every write but the claim is fenced by ``attempt`` (docs/design.md, "Invariants"): a
worker that lost its job (lease expired, job re-claimed) matches no row and
learns so from the ``None`` (or ``False``) it gets back.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stepcast.db.store import Store
from stepcast.db.timings import FINISH_TIMES, finish_times
from stepcast.jobs import Job

# A job goes to the pipeline while its claim is in flight (gpu_worker.dispatch): it ran
# from no later than its pipeline call did, which may be before the claim's now().
_COMPLETED_TIMES = finish_times("LEAST(started_at, now() - make_interval(secs => c.pipeline_s))")


@dataclass(frozen=True)
class Completion:
    """A job's result, as the worker that ran this attempt records it."""

    job_id: uuid.UUID
    attempt: int
    owner: str
    result: dict[str, Any]
    seq: int  # of the `completed` event
    pipeline_s: float | None = None
    batch: int | None = None  # jobs in its pipeline call


class RunStore(Store):
    async def claim(
        self,
        job_ids: Sequence[uuid.UUID],
        *,
        worker: str,
        lease_s: float,
        model_revision: str,
        token: uuid.UUID,
        session: int | None = None,
    ) -> dict[uuid.UUID, Job]:
        """Start the jobs (a batch) that are still pending, in one statement: those it started.

        ``token`` names this claim: the same call again (its reply was lost) returns the
        jobs the first one started, rather than nothing. ``session``: the worker's session
        number (:class:`stepcast.db.presence.Presence`), by which recovery knows it lives.
        A resumed job keeps its progress (the step it resumes from).
        """
        rows = await self.pool.fetch(
            """
            UPDATE jobs SET
                status = 'processing', worker = $2, model_revision = $4, claim_token = $5,
                attempt = CASE WHEN status = 'pending' THEN attempt + 1 ELSE attempt END,
                started_at = CASE WHEN status = 'pending' THEN now() ELSE started_at END,
                progress_step = CASE WHEN status = 'pending' THEN coalesce(resumed_from_step, 0)
                                     ELSE progress_step END,
                lease_expires_at = now() + make_interval(secs => $3), worker_session = $6
            WHERE id = ANY($1::uuid[])
              AND (
                (status = 'pending' AND NOT cancel_requested
                 AND (queue_expires_at IS NULL OR queue_expires_at > now()))
                -- this claim again (its first reply was lost): one statement, so that a retry
                -- that waited on the first one's row lock still finds it
                OR (status = 'processing' AND claim_token = $5)
              )
            RETURNING *
            """,
            list(job_ids), worker, lease_s, model_revision, token, session,
        )  # fmt: skip
        jobs = (Job.from_record(row) for row in rows)
        return {job.id: job for job in jobs}

    async def heartbeat(
        self,
        job_id: uuid.UUID,
        attempt: int,
        *,
        lease_s: float,
        step: int,
        last_seq: int,
        session: int | None = None,
    ) -> bool | None:
        """Renew the lease and persist progress; the cancel flag, or None if the job is lost.
        The worker's session number goes along: it changes when its session is opened again."""
        value = await self.pool.fetchval(
            """
            UPDATE jobs SET
                lease_expires_at = now() + make_interval(secs => $3),
                progress_step = GREATEST(progress_step, $4),
                last_seq = GREATEST(last_seq, $5),
                worker_session = coalesce($6, worker_session)
            WHERE id = $1 AND attempt = $2 AND status = 'processing'
            RETURNING cancel_requested
            """,
            job_id, attempt, lease_s, step, last_seq, session,
        )  # fmt: skip
        return None if value is None else bool(value)

    async def complete(self, completions: Sequence[Completion]) -> list[Job | None]:
        """Record these jobs completed, one statement for each owner among them (so that a
        statement moves one owner's kept count: the schema's job_counts). Each job's row, or
        None where it moved on (fenced by attempt)."""
        by_owner: dict[str, list[Completion]] = {}
        for completion in completions:
            by_owner.setdefault(completion.owner, []).append(completion)
        done: dict[uuid.UUID, Job] = {}
        async with self.pool.acquire() as conn:
            for group in by_owner.values():
                rows = await conn.fetch(
                    f"""
                    UPDATE jobs SET status = 'completed', result = c.result, last_seq = c.seq,
                        progress_step = progress_total, pipeline_s = c.pipeline_s, batch_size = c.batch,
                        {_COMPLETED_TIMES}
                    FROM unnest($1::uuid[], $2::int[], $3::jsonb[], $4::bigint[], $5::float8[], $6::int[])
                        AS c(id, attempt, result, seq, pipeline_s, batch)
                    WHERE jobs.id = c.id AND jobs.attempt = c.attempt AND jobs.status = 'processing'
                    RETURNING jobs.*
                    """,
                    [c.job_id for c in group], [c.attempt for c in group], [c.result for c in group],
                    [c.seq for c in group], [c.pipeline_s for c in group], [c.batch for c in group],
                )  # fmt: skip
                done.update((row["id"], Job.from_record(row)) for row in rows)
        return [done.get(completion.job_id) for completion in completions]

    async def fail(self, job_id: uuid.UUID, attempt: int, *, code: str, message: str, seq: int) -> Job | None:
        row = await self.pool.fetchrow(
            f"""
            UPDATE jobs SET status = 'failed', error_code = $3, error_message = $4, last_seq = $5,
                {FINISH_TIMES}
            WHERE id = $1 AND attempt = $2 AND status = 'processing'
            RETURNING *
            """,
            job_id, attempt, code, message, seq,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    async def cancel(self, job_id: uuid.UUID, attempt: int, *, step: int, seq: int) -> Job | None:
        row = await self.pool.fetchrow(
            f"""
            UPDATE jobs SET status = 'canceled', last_seq = $3,
                progress_step = GREATEST(progress_step, $4), {FINISH_TIMES}
            WHERE id = $1 AND attempt = $2 AND status = 'processing'
            RETURNING *
            """,
            job_id, attempt, seq, step,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    async def hand_back(
        self, job_id: uuid.UUID, attempt: int, *, last_seq: int, resume_step: int = 0
    ) -> Job | None:
        """A worker shutting down returns its job to the queue, to resume from
        ``resume_step`` (its newest checkpoint; 0: from the start); the attempt does not
        count against max_attempts. None if the job moved on or a cancel is pending."""
        row = await self.pool.fetchrow(
            """
            UPDATE jobs SET status = 'pending', worker = NULL, lease_expires_at = NULL,
                worker_session = NULL, handoffs = handoffs + 1, last_seq = GREATEST(last_seq, $3),
                progress_step = $4, resumed_from_step = nullif($4, 0)
            WHERE id = $1 AND attempt = $2 AND status = 'processing' AND NOT cancel_requested
            RETURNING *
            """,
            job_id, attempt, last_seq, resume_step,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    async def resume_from(self, job_id: uuid.UUID, attempt: int, *, step: int) -> Job | None:
        """What this attempt really resumes from (0: its checkpoint was gone), fenced."""
        row = await self.pool.fetchrow(
            """
            UPDATE jobs SET resumed_from_step = $3, progress_step = $3
            WHERE id = $1 AND attempt = $2 AND status = 'processing'
            RETURNING *
            """,
            job_id, attempt, step,
        )  # fmt: skip
        return Job.from_record(row) if row else None
