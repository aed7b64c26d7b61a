"""Jobs as the server sees them: admit and insert, read, page, finish one that never started.

``insert_many`` admits a submit's jobs in one statement (the limits are kept in
``job_counts``: the schema, stepcast/migrations); a job's row comes back as a
:class:`stepcast.jobs.Job`. The worker's writes are :mod:`stepcast.db.runs`.
"""

from __future__ import annotations

import base64
import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from stepcast.db.store import Store
from stepcast.errors import InvalidParams
from stepcast.jobs import Job
from stepcast.params import JobParams, Preview
from stepcast.status import Status


@dataclass(frozen=True)
class Insertion:
    """What a submit's one statement found and did."""

    job: Job | None  # None: refused, the queue or the owner was at its limit
    created: bool  # False with a job: the owner's earlier job with this idempotency key
    pending: int  # pending jobs on the queue before it: a new job's place is pending + 1
    unfinished: int  # the owner's pending and processing jobs before it
    address_unfinished: int | None = None  # an anonymous job's address's unfinished jobs before it
    queue_cost_ms: int = 0  # the cost of the queue's pending jobs before it
    owner_cost_ms: int = 0  # the cost of the owner's unfinished jobs before it
    ahead: int = 0  # a new job's: the pending jobs ahead of it in its queue's order (position - 1)
    work_ahead: float = 0.0  # their megapixel-steps
    running_work: float = 0.0  # the megapixel-steps left to the jobs its queue runs now


@dataclass(frozen=True)
class NewJob:
    """A submit's job, as :meth:`JobStore.insert_many` takes it."""

    owner: str
    params: JobParams
    model_name: str
    preview: Preview | None = None
    webhook: dict[str, Any] | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    # An anonymous owner's (a browser session's): its own smaller limit, and the
    # client address whose anonymous owners share one cap.
    anonymous: bool = False
    address: str | None = None
    # What it asks of a GPU (ms, the budgets' unit), and its owner's weight in the queue's turns.
    cost_ms: int = 0
    weight: float = 1.0
    max_cost_ms: int | None = None  # the owner's budget for its unfinished jobs' cost


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The ``(created_at, id)`` a page starts after. A cursor comes back from the client, so it
    may be anything: a time without a zone (which asyncpg would read in the server's own zone)
    or one that leaves the years 1-9999 on its way to UTC (which asyncpg cannot send) is as
    invalid as one that is not base64."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, job_id = raw.partition("|")
        after = datetime.fromisoformat(created)
        if after.tzinfo is None:
            raise ValueError("no time zone")
        return after.astimezone(UTC), uuid.UUID(job_id)
    except (ValueError, OverflowError):
        raise InvalidParams.one("cursor", "cursor is not valid") from None


class JobStore(Store):
    async def insert(
        self,
        *,
        owner: str,
        params: JobParams,
        preview: Preview | None,
        webhook: dict[str, Any] | None = None,
        queue: str,
        model_name: str,
        version: str,
        queue_ttl_s: float,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        max_pending: int | None = None,
        max_unfinished: int | None = None,
    ) -> Insertion:
        """:meth:`insert_many` for one job."""
        new = NewJob(owner, params, model_name, preview, webhook, idempotency_key, request_hash)
        (insertion,) = await self.insert_many(
            [new],
            queue=queue,
            version=version,
            queue_ttl_s=queue_ttl_s,
            max_pending=max_pending,
            max_unfinished=max_unfinished,
        )
        if isinstance(insertion, BaseException):
            raise insertion
        return insertion

    async def insert_many(
        self,
        jobs: Sequence[NewJob],
        *,
        queue: str,
        version: str,
        queue_ttl_s: float,
        max_pending: int | None = None,
        max_unfinished: int | None = None,
        max_anonymous_unfinished: int | None = None,
        max_anonymous_per_address: int | None = None,
        max_queue_cost_ms: int | None = None,
    ) -> list[Insertion | BaseException]:
        """Admit and insert jobs, and place them, in one statement (one round trip).

        Each job, in order, is inserted unless the queue already holds
        ``max_pending`` pending jobs, or its owner ``max_unfinished`` unfinished
        ones (``max_anonymous_unfinished`` for an anonymous owner's job), or its
        address ``max_anonymous_per_address`` unfinished jobs of anonymous
        owners (an anonymous job's), or its cost does not fit the queue's
        ``max_queue_cost_ms`` or its owner's ``max_cost_ms``, counting the jobs
        before it in the list that were admitted; a key the owner used before
        gives that earlier job. Each admitted job gets its fair tag, its place
        in the queue's turns (the migration 0007 says how).
        The counts, which give the queue position, come back either way. The
        queue's and owners' are kept in ``job_counts`` (the schema:
        stepcast/migrations), not counted: counting would grow with the queue.
        An address's are counted: they never grow past its cap.

        If Postgres refuses the statement, nothing was inserted; with several
        jobs, each is then tried alone, so that a job it refuses fails alone
        (its error in its place in the list).
        """
        limits = [max_anonymous_unfinished if job.anonymous else max_unfinished for job in jobs]
        max_per_address = max_anonymous_per_address
        try:
            rows = await self._insert_rows(
                jobs, limits, queue, version, queue_ttl_s, max_pending, max_per_address, max_queue_cost_ms
            )
        except asyncpg.PostgresError as exc:
            if len(jobs) == 1:
                return [exc]
            alone = functools.partial(
                self.insert_many,
                queue=queue,
                version=version,
                queue_ttl_s=queue_ttl_s,
                max_pending=max_pending,
                max_unfinished=max_unfinished,
                max_anonymous_unfinished=max_anonymous_unfinished,
                max_anonymous_per_address=max_anonymous_per_address,
                max_queue_cost_ms=max_queue_cost_ms,
            )
            return [(await alone([job]))[0] for job in jobs]
        insertions: list[Insertion | BaseException] = []
        for job, limit, row in zip(jobs, limits, rows, strict=True):
            pending, unfinished = int(row["admission_pending"]), int(row["admission_unfinished"])
            theirs = row["admission_address"]
            insertion = Insertion(
                job=Job.from_record(row) if row["id"] is not None else None,
                created=row["id"] is not None,
                pending=pending,
                unfinished=unfinished,
                address_unfinished=None if theirs is None else int(theirs),
                queue_cost_ms=int(row["admission_queue_cost"]),
                owner_cost_ms=int(row["admission_owner_cost"]),
                ahead=int(row["admission_ahead"]),
                work_ahead=float(row["admission_work_ahead"]),
                running_work=float(row["admission_running_work"]),
            )
            admitted = (
                (max_pending is None or pending < max_pending)
                and (limit is None or unfinished < limit)
                and (
                    theirs is None or max_anonymous_per_address is None or theirs < max_anonymous_per_address
                )
                and (max_queue_cost_ms is None or insertion.queue_cost_ms + job.cost_ms <= max_queue_cost_ms)
                and (job.max_cost_ms is None or insertion.owner_cost_ms + job.cost_ms <= job.max_cost_ms)
            )
            if not insertion.created and admitted:
                # A concurrent or earlier submit with the same key won; its row is committed.
                # (The other jobs are in: whatever happens here is this job's alone.)
                try:
                    earlier = await self.by_idempotency_key(job.owner, job.idempotency_key or "")
                except Exception as exc:
                    insertions.append(exc)
                    continue
                if earlier is None:
                    insertions.append(RuntimeError("idempotency conflict without a conflicting job"))
                    continue
                insertion = replace(insertion, job=earlier)
            insertions.append(insertion)
        return insertions

    async def _insert_rows(
        self,
        jobs: Sequence[NewJob],
        limits: list[int | None],
        queue: str,
        version: str,
        queue_ttl_s: float,
        max_pending: int | None,
        max_per_address: int | None,
        max_queue_cost_ms: int | None,
    ) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self.pool.fetch(
            """
            SELECT (job).*, admission_pending, admission_unfinished, admission_address,
                   admission_queue_cost, admission_owner_cost, admission_ahead, admission_work_ahead,
                   admission_running_work
            FROM insert_jobs($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                             $16, $17, $18, $19, $20, $21)
            ORDER BY ord
            """,
            [uuid.uuid4() for _ in jobs], [job.owner for job in jobs], [job.params.to_json() for job in jobs],
            [job.preview.to_json() if job.preview else None for job in jobs],
            [job.webhook for job in jobs], [job.model_name for job in jobs],
            [job.idempotency_key for job in jobs], [job.request_hash for job in jobs],
            [job.params.steps for job in jobs],
            [job.address if job.anonymous else None for job in jobs], limits,
            [job.params.megapixel_steps for job in jobs], [job.cost_ms for job in jobs],
            [job.weight for job in jobs], [job.max_cost_ms for job in jobs],
            queue, version, queue_ttl_s, max_pending, max_per_address, max_queue_cost_ms,
        )  # fmt: skip
        return rows

    async def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM jobs WHERE owner = $1 AND idempotency_key = $2", owner, key
        )
        return Job.from_record(row) if row else None

    async def get(self, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM jobs WHERE id = $1 AND ($2::text IS NULL OR owner = $2)", job_id, owner
        )
        return Job.from_record(row) if row else None

    async def page(self, owner: str, *, status: Status | None, limit: int, cursor: str | None) -> Page:
        after = _decode_cursor(cursor) if cursor else (None, None)
        rows = await self.pool.fetch(
            """
            SELECT * FROM jobs
            WHERE owner = $1
              AND ($2::job_status IS NULL OR status = $2)
              AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
            ORDER BY created_at DESC, id DESC
            LIMIT $5
            """,
            owner, status.value if status else None, after[0], after[1], limit + 1,
        )  # fmt: skip
        jobs = [Job.from_record(row) for row in rows[:limit]]
        next_cursor = _encode_cursor(jobs[-1]) if len(rows) > limit else None
        return Page(jobs, next_cursor)

    async def to_show(self, owner: str, *, recent: int) -> list[Job]:
        """An owner's unfinished jobs plus the ``recent`` latest finished ones, oldest first."""
        rows = await self.pool.fetch(
            """
            (SELECT * FROM jobs WHERE owner = $1 AND status IN ('pending', 'processing'))
            UNION ALL
            (SELECT * FROM jobs WHERE owner = $1 AND status IN ('completed', 'failed', 'canceled')
             ORDER BY created_at DESC, id DESC LIMIT $2)
            ORDER BY created_at, id
            """,
            owner,
            recent,
        )
        return [Job.from_record(row) for row in rows]

    async def pending_params(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, JobParams]:
        """The params of those of these jobs still pending."""
        rows = await self.pool.fetch(
            "SELECT id, params FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'pending'", job_ids
        )
        return {row["id"]: JobParams.from_json(row["params"]) for row in rows}

    async def finish_pending(
        self,
        job_id: uuid.UUID,
        *,
        status: Status,
        seq: int,
        code: str | None = None,
        message: str | None = None,
    ) -> Job | None:
        """A terminal state for a job that never started: canceled, or failed (queue TTL)."""
        row = await self.pool.fetchrow(
            """
            UPDATE jobs SET status = $2, finished_at = now(), last_seq = $3, error_code = $4,
                error_message = $5, queue_s = extract(epoch FROM now() - created_at)
            WHERE id = $1 AND status = 'pending'
            RETURNING *
            """,
            job_id, status.value, seq, code, message,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    async def request_cancel(self, job_id: uuid.UUID) -> Job | None:
        row = await self.pool.fetchrow(
            """
            UPDATE jobs SET cancel_requested = true
            WHERE id = $1 AND status = 'processing'
            RETURNING *
            """,
            job_id,
        )
        return Job.from_record(row) if row else None
