"""The one module that queries Postgres (the schema and its migrations: :mod:`stepcast.schema`).

Every write a worker makes is fenced by ``attempt`` (DESIGN §2, invariant 2):
a worker that lost its job (lease expired, job re-claimed) matches no row and
learns so from the ``None`` it gets back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from stepcast.errors import InvalidParams
from stepcast.jobs import Job, Status

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0  # how long a close waits for connections in use

# pg_try_advisory_lock keys of the periodic tasks that run in one process at a time.
_SINGLETON_LOCKS = {"recovery": 0x5EC0_2EC0, "retention": 0x5EC0_2E7E, "queue_announcer": 0x5EC0_9051}

# Pending jobs ahead of one in its queue.
_AHEAD = """
    SELECT count(*) FROM jobs
    WHERE queue = {queue} AND status = 'pending' AND (created_at, id) < ({created_at}, {id})
"""


def _finish_times(started: str = "started_at") -> str:
    """The SET items of a terminal write; ``started``: when the run began."""
    return f"""
    started_at = {started},
    finished_at = now(),
    lease_expires_at = NULL,
    queue_s = extract(epoch FROM {started} - created_at),
    run_s = extract(epoch FROM now() - {started})
"""


_FINISH_TIMES = _finish_times()
# A job goes to the pipeline while its claim is in flight (gpu_worker.runner): it ran
# from no later than its pipeline call did, which may be before the claim's now().
_COMPLETED_TIMES = _finish_times("LEAST(started_at, now() - make_interval(secs => c.pipeline_s))")


T = TypeVar("T")

# Postgres is unreachable, restarting or failing over: worth trying again.
TRANSIENT_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


async def retrying(operation: Callable[[], Awaitable[T]], *, what: str, deadline_s: float) -> T:
    """Run ``operation``, trying again with back-off on transient errors for up to ``deadline_s``."""
    give_up = time.monotonic() + deadline_s
    delay = 0.1
    while True:
        try:
            return await operation()
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + delay > give_up:
                raise
            logger.warning("%s: Postgres unavailable (%s); retrying in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """Handed back to the pool as it is, without asyncpg's reset query.

    The default reset (unlock every advisory lock, close cursors, UNLISTEN,
    RESET ALL) is a round trip on every release, that is, on every query
    through the pool: it doubled the latency and the Postgres work of each.
    Nothing here leaves session state behind: no LISTEN, no session SET, no
    cursor outside a transaction; an open transaction is still rolled back;
    the one session-level advisory lock (:meth:`Database.singleton`) is
    unlocked by its holder, or its connection closed.
    """

    def get_reset_query(self) -> str:
        return ""


async def _lock_or_close(conn: asyncpg.Connection, query: str, key: int) -> Any:
    """Take or release a session-level advisory lock. The pool does not reset
    connections (:class:`_Connection`), so if this fails half-way the connection
    is closed: a closed session holds no lock."""
    try:
        return await conn.fetchval(query, key)
    except BaseException:
        # Already gone (a Postgres restart) is closed enough; what stopped us goes on up
        # (a cancellation above all: a shutdown must not hang on it).
        with contextlib.suppress(Exception):
            conn.terminate()
        raise


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@dataclass(frozen=True)
class Insertion:
    """What a submit's one statement found and did."""

    job: Job | None  # None: refused, the queue or the owner was at its limit
    created: bool  # False with a job: the owner's earlier job with this idempotency key
    pending: int  # pending jobs on the queue before it: a new job's place is pending + 1
    unfinished: int  # the owner's pending and processing jobs before it
    address_unfinished: int | None = None  # an anonymous job's address's unfinished jobs before it


@dataclass(frozen=True)
class NewJob:
    """A submit's job, as :meth:`Database.insert_jobs` takes it."""

    owner: str
    params: dict[str, Any]
    model_name: str
    preview: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    # An anonymous owner's (a browser session's): its own smaller limit, and the
    # client address whose anonymous owners share one cap.
    anonymous: bool = False
    address: str | None = None


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


@dataclass(frozen=True)
class Pace:
    """How fast a queue has lately run jobs of one size."""

    per_step_s: float | None  # seconds per step (None: none measured)
    workers: int  # workers busy on the queue lately (at least 1)

    def drain_s(self, jobs: int, steps: int) -> float | None:
        """Seconds the workers need for ``jobs`` jobs of ``steps`` steps (None: never measured)."""
        return None if self.per_step_s is None else round(jobs * self.per_step_s * steps / self.workers, 3)


@dataclass(frozen=True)
class KeptCounts:
    by_status: dict[str, int]  # every status, 0 included
    pending_by_queue: dict[str, int]  # every queue that ever had a pending job, 0 included


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


class Database:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, max_size: int = 10) -> Database:
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=max_size, init=_init_connection, connection_class=_Connection
        )
        return cls(pool)

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close every connection once it is released; after ``timeout_s``, close those still in
        use as well (a query that never returns must not hold a shutdown for ever)."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout_s)  # (a time-out terminates the pool)
        except TimeoutError:
            logger.warning("Postgres connections still in use after %g s: closed anyway", timeout_s)

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # -- the server's side -------------------------------------------------

    async def insert_job(
        self,
        *,
        owner: str,
        params: dict[str, Any],
        preview: dict[str, Any] | None,
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
        """:meth:`insert_jobs` for one job."""
        new = NewJob(owner, params, model_name, preview, webhook, idempotency_key, request_hash)
        (insertion,) = await self.insert_jobs(
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

    async def insert_jobs(
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
    ) -> list[Insertion | BaseException]:
        """Admit and insert jobs, and place them, in one statement (one round trip).

        Each job, in order, is inserted unless the queue already holds
        ``max_pending`` pending jobs, or its owner ``max_unfinished`` unfinished
        ones (``max_anonymous_unfinished`` for an anonymous owner's job), or its
        address ``max_anonymous_per_address`` unfinished jobs of anonymous
        owners (an anonymous job's), counting the jobs before it in the list
        that were admitted; a key the owner used before gives that earlier job.
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
                jobs, limits, queue, version, queue_ttl_s, max_pending, max_per_address
            )
        except asyncpg.PostgresError as exc:
            if len(jobs) == 1:
                return [exc]
            alone = functools.partial(
                self.insert_jobs,
                queue=queue,
                version=version,
                queue_ttl_s=queue_ttl_s,
                max_pending=max_pending,
                max_unfinished=max_unfinished,
                max_anonymous_unfinished=max_anonymous_unfinished,
                max_anonymous_per_address=max_anonymous_per_address,
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
            )
            admitted = (
                (max_pending is None or pending < max_pending)
                and (limit is None or unfinished < limit)
                and (
                    theirs is None or max_anonymous_per_address is None or theirs < max_anonymous_per_address
                )
            )
            if not insertion.created and admitted:
                # A concurrent or earlier submit with the same key won; its row is committed.
                # (The other jobs are in: whatever happens here is this job's alone.)
                try:
                    earlier = await self.job_by_idempotency_key(job.owner, job.idempotency_key or "")
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
    ) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self.pool.fetch(
            """
            SELECT (job).*, admission_pending, admission_unfinished, admission_address
            FROM insert_jobs($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
            ORDER BY ord
            """,
            [uuid.uuid4() for _ in jobs], [job.owner for job in jobs], [job.params for job in jobs],
            [job.preview for job in jobs], [job.webhook for job in jobs], [job.model_name for job in jobs],
            [job.idempotency_key for job in jobs], [job.request_hash for job in jobs],
            [int(job.params["steps"]) for job in jobs],
            [job.address if job.anonymous else None for job in jobs], limits,
            queue, version, queue_ttl_s, max_pending, max_per_address,
        )  # fmt: skip
        return rows

    async def job_by_idempotency_key(self, owner: str, key: str) -> Job | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM jobs WHERE owner = $1 AND idempotency_key = $2", owner, key
        )
        return Job.from_record(row) if row else None

    async def pending_params(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
        """The params of those of these jobs still pending."""
        rows = await self.pool.fetch(
            "SELECT id, params FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'pending'", job_ids
        )
        return {row["id"]: row["params"] for row in rows}

    async def get_job(self, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM jobs WHERE id = $1 AND ($2::text IS NULL OR owner = $2)", job_id, owner
        )
        return Job.from_record(row) if row else None

    async def list_jobs(self, owner: str, *, status: Status | None, limit: int, cursor: str | None) -> Page:
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

    async def jobs_to_show(self, owner: str, *, recent: int) -> list[Job]:
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

    async def positions_due(self, turn: int, bands: Sequence[int]) -> list[tuple[Job, int]]:
        """Pending jobs whose queue position (1 = next to start) is to be read at ``turn``.

        ``bands`` are ascending positions: a job before ``bands[0]`` is read every turn; one
        from ``bands[b - 1]`` up to ``bands[b]`` every ``2**b`` turns, on the turns that agree
        with its id's hash in their last ``b`` bits. So a turn reads a few rows per band,
        however deep the queue; a job is read at least once in every ``2**b`` turns while it
        stays in band ``b`` or nearer the head, and every position read is true at that turn.
        The ranks are counted over the pending index alone; whole rows are read for the jobs
        due only.
        """
        rows = await self.pool.fetch(
            """
            WITH ranked AS (
                SELECT id, row_number() OVER (PARTITION BY queue ORDER BY created_at, id) AS position
                FROM jobs WHERE status = 'pending'
            ), banded AS (
                SELECT id, position, (1::bigint << width_bucket(position, $2::bigint[])) - 1 AS mask
                FROM ranked
            ), due AS (
                SELECT id, position FROM banded
                WHERE (hashtext(id::text)::bigint & mask) = ($1::bigint & mask)
            )
            SELECT jobs.*, due.position FROM due JOIN jobs USING (id)
            """,
            turn,
            list(bands),
        )
        return [(Job.from_record(row), int(row["position"])) for row in rows]

    async def queue_position(self, job: Job) -> int:
        ahead = await self.pool.fetchval(
            _AHEAD.format(queue="$1", created_at="$2", id="$3"), job.queue, job.created_at, job.id
        )
        return int(ahead) + 1

    async def pace(self, queue: str, width: int, height: int) -> Pace:
        """How fast the queue has lately run jobs of this size: seconds per step of up to 50 of
        them among its last 200 completions, and the workers busy on it (running a job now, or
        behind one of its last 100 completions of the last minute). Both read a bounded stretch
        of a partial index (jobs_completed_finished_idx, jobs_processing_idx), however deep the
        queue and however fast it runs."""
        row = await self.pool.fetchrow(
            """
            SELECT (
                SELECT avg(run_s / progress_total) FROM (
                    SELECT run_s, progress_total FROM (
                        SELECT run_s, progress_total, params FROM jobs
                        WHERE queue = $1 AND status = 'completed'
                        ORDER BY finished_at DESC LIMIT 200
                    ) latest
                    WHERE (params->>'width')::int = $2 AND (params->>'height')::int = $3
                    LIMIT 50
                ) recent
            ) AS per_step, (
                SELECT count(DISTINCT worker) FROM (
                    SELECT worker FROM jobs WHERE queue = $1 AND status = 'processing'
                    UNION ALL
                    (SELECT worker FROM jobs
                     WHERE queue = $1 AND status = 'completed' AND finished_at > now() - interval '1 minute'
                     ORDER BY finished_at DESC LIMIT 100)
                ) recent
                WHERE worker IS NOT NULL
            ) AS workers
            """,
            queue, width, height,
        )  # fmt: skip
        per_step = row["per_step"]
        return Pace(None if per_step is None else float(per_step), max(1, int(row["workers"])))

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

    # -- the worker's side (every write fenced by attempt) -----------------

    async def claim(
        self,
        job_ids: Sequence[uuid.UUID],
        *,
        worker: str,
        lease_s: float,
        model_revision: str,
        token: uuid.UUID,
    ) -> dict[uuid.UUID, Job]:
        """Start the jobs (a batch) that are still pending, in one statement: those it started.

        ``token`` names this claim: the same call again (its reply was lost) returns the
        jobs the first one started, rather than nothing.
        """
        rows = await self.pool.fetch(
            """
            UPDATE jobs SET
                status = 'processing', worker = $2, model_revision = $4, claim_token = $5,
                attempt = CASE WHEN status = 'pending' THEN attempt + 1 ELSE attempt END,
                started_at = CASE WHEN status = 'pending' THEN now() ELSE started_at END,
                progress_step = CASE WHEN status = 'pending' THEN 0 ELSE progress_step END,
                lease_expires_at = now() + make_interval(secs => $3)
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
            list(job_ids), worker, lease_s, model_revision, token,
        )  # fmt: skip
        jobs = (Job.from_record(row) for row in rows)
        return {job.id: job for job in jobs}

    async def reserve_seqs(self, job_id: uuid.UUID, count: int, *, attempt: int | None = None) -> int | None:
        """Reserve the job's next ``count`` event seqs: the last of them (the first is
        ``last - count + 1``), above every seq ever handed out for the job. With ``attempt``,
        only while that attempt runs the job (a stale worker gets None)."""
        value = await self.pool.fetchval(
            """
            UPDATE jobs SET
                seq_ceiling = CASE WHEN seq_ceiling = 0 THEN last_seq + $2 ELSE seq_ceiling END + $2
            WHERE id = $1 AND ($3::int IS NULL OR (attempt = $3 AND status = 'processing'))
            RETURNING seq_ceiling
            """,
            job_id, count, attempt,
        )  # fmt: skip
        return None if value is None else int(value)

    async def heartbeat(
        self, job_id: uuid.UUID, attempt: int, *, lease_s: float, step: int, last_seq: int
    ) -> bool | None:
        """Renew the lease and persist progress; the cancel flag, or None if the job is lost."""
        value = await self.pool.fetchval(
            """
            UPDATE jobs SET
                lease_expires_at = now() + make_interval(secs => $3),
                progress_step = GREATEST(progress_step, $4),
                last_seq = GREATEST(last_seq, $5)
            WHERE id = $1 AND attempt = $2 AND status = 'processing'
            RETURNING cancel_requested
            """,
            job_id, attempt, lease_s, step, last_seq,
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
                {_FINISH_TIMES}
            WHERE id = $1 AND attempt = $2 AND status = 'processing'
            RETURNING *
            """,
            job_id, attempt, code, message, seq,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    async def cancel_running(self, job_id: uuid.UUID, attempt: int, *, step: int, seq: int) -> Job | None:
        row = await self.pool.fetchrow(
            f"""
            UPDATE jobs SET status = 'canceled', last_seq = $3,
                progress_step = GREATEST(progress_step, $4), {_FINISH_TIMES}
            WHERE id = $1 AND attempt = $2 AND status = 'processing'
            RETURNING *
            """,
            job_id, attempt, seq, step,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    async def restamp(self, job_id: uuid.UUID, seq: int, later: int) -> bool:
        """Record a finished job's terminal event under a later seq (the log had passed ``seq``
        before the event could be appended); fenced by the seq it replaces (done again, it is
        done: its reply may have been lost)."""
        value = await self.pool.fetchval(
            """
            UPDATE jobs SET last_seq = $3
            WHERE id = $1 AND last_seq IN ($2, $3) AND status IN ('completed', 'failed', 'canceled')
              AND $3 > $2
            RETURNING true
            """,
            job_id, seq, later,
        )  # fmt: skip
        return bool(value)

    async def hand_back(self, job_id: uuid.UUID, attempt: int, *, last_seq: int) -> Job | None:
        """A worker shutting down returns its job to the queue; the attempt does not count
        against max_attempts. None if the job moved on or a cancel is pending."""
        row = await self.pool.fetchrow(
            """
            UPDATE jobs SET status = 'pending', worker = NULL, lease_expires_at = NULL,
                handoffs = handoffs + 1, progress_step = 0, last_seq = GREATEST(last_seq, $3)
            WHERE id = $1 AND attempt = $2 AND status = 'processing' AND NOT cancel_requested
            RETURNING *
            """,
            job_id, attempt, last_seq,
        )  # fmt: skip
        return Job.from_record(row) if row else None

    # -- recovery and retention (one process at a time) --------------------

    @contextlib.asynccontextmanager
    async def singleton(self, task: str) -> AsyncIterator[bool]:
        """Hold ``task``'s lock for the block if no other process does; yields whether it is held."""
        key = _SINGLETON_LOCKS[task]
        async with self.pool.acquire() as conn:
            held = bool(await _lock_or_close(conn, "SELECT pg_try_advisory_lock($1)", key))
            try:
                yield held
            finally:
                if held:
                    await _lock_or_close(conn, "SELECT pg_advisory_unlock($1)", key)

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
            UPDATE jobs SET status = $3, error_code = $4, error_message = $5, last_seq = $6, {_FINISH_TIMES}
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

    async def images_to_expire(self, retention_s: float, *, limit: int = 500) -> list[Job]:
        """Finished jobs whose stored images are older than the retention."""
        rows = await self.pool.fetch(
            """
            SELECT * FROM jobs
            WHERE result IS NOT NULL AND images_expired_at IS NULL
              AND finished_at < now() - make_interval(secs => $1)
            ORDER BY finished_at LIMIT $2
            """,
            retention_s,
            limit,
        )
        return [Job.from_record(row) for row in rows]

    async def mark_images_expired(self, job_id: uuid.UUID) -> None:
        await self.pool.execute(
            "UPDATE jobs SET images_expired_at = now() WHERE id = $1 AND images_expired_at IS NULL", job_id
        )

    async def delete_finished_jobs(self, older_than_s: float, *, limit: int) -> int:
        """Delete up to ``limit`` of the jobs that finished more than ``older_than_s`` ago and
        have no stored images left (expired, or never made), oldest first; their webhook
        deliveries go with them. How many went."""
        return await self._deleted(
            """
            DELETE FROM jobs WHERE id IN (
                SELECT id FROM jobs
                WHERE status IN ('completed', 'failed', 'canceled')
                  AND finished_at < now() - make_interval(secs => $1)
                  AND (result IS NULL OR images_expired_at IS NOT NULL)
                ORDER BY finished_at LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            """,
            older_than_s,
            limit,
        )

    async def delete_finished_deliveries(self, older_than_s: float, *, limit: int) -> int:
        """Delete up to ``limit`` webhook deliveries made more than ``older_than_s`` ago that
        are over (delivered or failed). How many went."""
        return await self._deleted(
            """
            DELETE FROM webhook_deliveries WHERE id IN (
                SELECT id FROM webhook_deliveries
                WHERE status <> 'pending' AND created_at < now() - make_interval(secs => $1)
                ORDER BY created_at LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            """,
            older_than_s,
            limit,
        )

    async def delete_unused_anonymous_secrets(self, older_than_s: float, *, limit: int) -> int:
        """Delete up to ``limit`` webhook secrets of browser sessions' owners (``anon_…``) made
        more than ``older_than_s`` ago (their session is over) who have no job left. Should
        such an owner come back, a new secret is made on first use. How many went."""
        return await self._deleted(
            """
            DELETE FROM owner_secrets WHERE owner IN (
                SELECT owner FROM owner_secrets AS s
                WHERE starts_with(s.owner, 'anon_') AND s.created_at < now() - make_interval(secs => $1)
                  AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.owner = s.owner)
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            """,
            older_than_s,
            limit,
        )

    async def _deleted(self, query: str, *args: Any) -> int:
        status: str = await self.pool.execute(query, *args)  # "DELETE <rows>"
        return int(status.rpartition(" ")[2])

    # -- metrics -------------------------------------------------------------

    async def kept_counts(self) -> KeptCounts:
        """Jobs by status and pending jobs by queue, as kept in ``job_counts`` (schema.sql):
        a few index rows, whatever the size of the jobs table."""
        rows = await self.pool.fetch(
            """
            SELECT kind, key, sum(n)::bigint AS n FROM job_counts
            WHERE kind IN ('status', 'pending') GROUP BY kind, key
            """
        )
        counts = KeptCounts({status.value: 0 for status in Status}, {})
        for row in rows:
            kept = counts.by_status if row["kind"] == "status" else counts.pending_by_queue
            kept[row["key"]] = int(row["n"])
        return counts

    # -- API keys --------------------------------------------------------------

    async def create_api_key(self, *, owner: str, name: str, key_hash: str, prefix: str) -> uuid.UUID:
        key_id: uuid.UUID = await self.pool.fetchval(
            "INSERT INTO api_keys (owner, name, key_hash, prefix) VALUES ($1, $2, $3, $4) RETURNING id",
            owner, name, key_hash, prefix,
        )  # fmt: skip
        return key_id

    async def owner_of_key(self, key_hash: str) -> str | None:
        owner: str | None = await self.pool.fetchval(
            "SELECT owner FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
        )
        return owner

    async def active_keys(self, key_hashes: list[str]) -> set[str]:
        """Which of these key hashes belong to keys not revoked (one query for them all)."""
        rows = await self.pool.fetch(
            "SELECT key_hash FROM api_keys WHERE key_hash = ANY($1::text[]) AND revoked_at IS NULL",
            key_hashes,
        )
        return {row["key_hash"] for row in rows}

    async def revoke_api_key(self, key_id: uuid.UUID) -> bool:
        revoked = await self.pool.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id", key_id
        )
        return revoked is not None

    async def api_keys(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT id, owner, name, prefix, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        return [dict(row) for row in rows]

    # -- webhooks --------------------------------------------------------------

    async def webhook_secret(self, owner: str, new_secret: str) -> str:
        """The owner's signing secret, made (as ``new_secret``) on first use."""
        await self.pool.execute(
            "INSERT INTO owner_secrets (owner, webhook_secret) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            owner, new_secret,
        )  # fmt: skip
        secret: str = await self.pool.fetchval(
            "SELECT webhook_secret FROM owner_secrets WHERE owner = $1", owner
        )
        return secret

    async def due_deliveries(self, *, lease_s: float, limit: int, max_attempts: int) -> list[asyncpg.Record]:
        """Deliveries due now, leased to this sender for ``lease_s`` (others skip them).

        The attempt is counted here, before anything is sent, so one that never
        ends (the sender died) still counts. A row whose ``max_attempts`` all
        ended that way comes back failed, not leased.
        """
        rows = await self.pool.fetch(
            """
            WITH due AS (
                SELECT id FROM webhook_deliveries
                WHERE status = 'pending' AND next_attempt_at <= now()
                ORDER BY next_attempt_at LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            UPDATE webhook_deliveries AS d SET
                next_attempt_at = now() + make_interval(secs => $1),
                attempts = d.attempts + CASE WHEN d.attempts < $3 THEN 1 ELSE 0 END,
                status = CASE WHEN d.attempts < $3 THEN 'pending' ELSE 'failed' END,
                last_error = CASE WHEN d.attempts < $3 THEN d.last_error
                    ELSE concat_ws('; ', d.last_error, 'gave up after ' || d.attempts
                                   || ' attempts (the last one ended without an outcome)') END
            FROM due WHERE d.id = due.id
            RETURNING d.*
            """,
            lease_s, limit, max_attempts,
        )  # fmt: skip
        return list(rows)

    async def record_delivery(
        self,
        delivery_id: uuid.UUID,
        *,
        attempt: int,
        status: str,
        retry_in_s: float | None,
        http_status: int | None,
        error: str | None,
    ) -> bool:
        """Record attempt ``attempt``'s outcome; False if the row has moved on (a later lease)."""
        result: str = await self.pool.execute(
            """
            UPDATE webhook_deliveries SET
                status = $2, last_status = $3, last_error = $4,
                next_attempt_at = CASE WHEN $5::float8 IS NULL THEN next_attempt_at
                                       ELSE now() + make_interval(secs => $5::float8) END,
                delivered_at = CASE WHEN $2 = 'delivered' THEN now() END
            WHERE id = $1 AND attempts = $6 AND status = 'pending'
            """,
            delivery_id, status, http_status, error, retry_in_s, attempt,
        )  # fmt: skip
        return result == "UPDATE 1"
