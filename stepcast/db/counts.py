"""What the server tells about queues: jobs kept by status, positions, the pace of recent jobs.

Counts come from ``job_counts`` (kept by the schema) and paces from bounded stretches of partial
indexes, however deep the queue; a job's place counts the pending index up to it (the queue's
order, docs/scheduling.md), and the announcer's pass ranks the whole pending index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stepcast.db.store import Store
from stepcast.jobs import Job
from stepcast.status import Status

# The pending jobs ahead of one in its queue's order (fair_tag, id), and their work: an index
# range (jobs_fair_pending_idx) as long as its position. A job submitted before fair shares (no
# tag) comes after every tagged one.
# The work running: but the job's own, if it has started since its row was read.
_RUNNING = """
    queue_running_work($1) - coalesce((
        SELECT work_left(work, progress_step, progress_total)
        FROM jobs WHERE id = {id} AND status = 'processing'
    ), 0) AS running
"""
_AHEAD = f"""
    SELECT count(*) AS n, coalesce(sum(work), 0) AS work, {_RUNNING.format(id="$3")} FROM jobs
    WHERE queue = $1 AND status = 'pending' AND (fair_tag, id) < ($2, $3)
"""
_AHEAD_UNTAGGED = f"""
    SELECT count(*) AS n, coalesce(sum(work), 0) AS work, {_RUNNING.format(id="$2")} FROM jobs
    WHERE queue = $1 AND status = 'pending' AND (fair_tag IS NOT NULL OR id < $2)
"""


def share_of(owner: str, anonymous_address: str | None) -> str:
    """Whose turns a job takes in its queue: its owner's; a browser session's (an anonymous
    owner, made at will), its address's. As insert_jobs (migration 0007) names a share."""
    return owner if anonymous_address is None else f"address:{anonymous_address}"


@dataclass(frozen=True)
class Place:
    """Where a pending job is in its queue's order."""

    position: int  # 1: the next to start
    work_ahead: float  # the megapixel-steps of the jobs ahead of it
    running_work: float = 0.0  # those left to the jobs its queue runs now


@dataclass(frozen=True)
class Pace:
    """How fast a queue has lately run its jobs."""

    megapixel_step_s: float | None  # a worker's seconds per megapixel-step (None: none measured)
    workers: int  # workers busy on the queue lately (at least 1)

    def seconds(self, work: float) -> float | None:
        """One worker's seconds for ``work`` megapixel-steps (None: never measured)."""
        return None if self.megapixel_step_s is None else work * self.megapixel_step_s

    def start_in_s(self, place: Place) -> float | None:
        """Seconds until a job at ``place`` starts: the work its queue runs now and the work
        waiting before it, shared among the workers (None: some, and never measured)."""
        work = place.running_work + place.work_ahead
        if work <= 0:
            return 0.0
        return (
            None if self.megapixel_step_s is None else round(work * self.megapixel_step_s / self.workers, 3)
        )


@dataclass(frozen=True)
class KeptCounts:
    by_status: dict[str, int]  # every status, 0 included
    pending_by_queue: dict[str, int]  # every queue that ever had a pending job, 0 included


class CountStore(Store):
    async def kept(self) -> KeptCounts:
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

    async def place(self, job: Job) -> Place:
        if job.fair_tag is None:
            row = await self.pool.fetchrow(_AHEAD_UNTAGGED, job.queue, job.id)
        else:
            row = await self.pool.fetchrow(_AHEAD, job.queue, job.fair_tag, job.id)
        return Place(int(row["n"]) + 1, float(row["work"]), float(row["running"]))

    async def place_of_new(self, queue: str, share: str) -> Place:
        """Where a job of ``share`` (:func:`share_of`) submitted to ``queue`` now would wait:
        behind the pending jobs up to the tag it would get (where the share's unfinished jobs
        end, or the queue's clock: insert_jobs, migration 0007)."""
        row = await self.pool.fetchrow(
            """
            SELECT count(*) AS n, coalesce(sum(work), 0) AS work, queue_running_work($1) AS running FROM jobs
            WHERE queue = $1 AND status = 'pending' AND fair_tag <= share_start($1, $2, queue_clock($1))
            """,
            queue,
            share,
        )
        return Place(int(row["n"]) + 1, float(row["work"]), float(row["running"]))

    async def positions_due(self, turn: int, bands: Sequence[int]) -> list[tuple[Job, Place]]:
        """Pending jobs whose place (position 1 = next to start) is to be read at ``turn``.

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
                SELECT id, row_number() OVER queued AS position,
                       coalesce(sum(work) OVER (queued ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                           AS work_ahead
                FROM jobs WHERE status = 'pending'
                WINDOW queued AS (PARTITION BY queue ORDER BY fair_tag, id)
            ), banded AS (
                SELECT id, position, work_ahead,
                       (1::bigint << width_bucket(position, $2::bigint[])) - 1 AS mask
                FROM ranked
            ), due AS (
                SELECT id, position, work_ahead FROM banded
                WHERE (hashtext(id::text)::bigint & mask) = ($1::bigint & mask)
            ), due_jobs AS (
                SELECT jobs.*, due.position, due.work_ahead FROM due JOIN jobs USING (id)
            ), running AS (
                SELECT queue, queue_running_work(queue) AS running_work
                FROM (SELECT DISTINCT queue FROM due_jobs) queues
            )
            SELECT due_jobs.*, running.running_work FROM due_jobs JOIN running USING (queue)
            """,
            turn,
            list(bands),
        )
        return [
            (
                Job.from_record(row),
                Place(int(row["position"]), float(row["work_ahead"]), float(row["running_work"])),
            )
            for row in rows
        ]

    async def pace(self, queue: str) -> Pace:
        """How fast the queue has lately run its jobs: a worker's seconds per megapixel-step over
        its last 50 completions (a batch's jobs share their run), and the workers busy on it
        (running a job now, or behind one of its last 100 completions of the last minute). Each
        reads a bounded stretch of a partial index (jobs_completed_finished_idx,
        jobs_processing_idx), however deep the queue."""
        row = await self.pool.fetchrow(
            """
            SELECT (
                SELECT avg(run_s / greatest(coalesce(batch_size, 1), 1) / work) FROM (
                    SELECT run_s, batch_size, params_work(params) AS work
                    FROM jobs
                    WHERE queue = $1 AND status = 'completed' AND run_s IS NOT NULL
                    ORDER BY finished_at DESC LIMIT 50
                ) latest
                WHERE work > 0
            ) AS rate, (
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
            queue,
        )  # fmt: skip
        rate = row["rate"]
        return Pace(None if rate is None else float(rate), max(1, int(row["workers"])))
