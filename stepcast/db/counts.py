"""What the server tells about queues: jobs kept by status, positions, the pace of recent jobs.

Every read here costs a few index rows however deep the queue: counts come from
``job_counts`` (kept by the schema), positions and paces from partial indexes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stepcast.db.store import Store
from stepcast.jobs import Job
from stepcast.status import Status

# Pending jobs ahead of one in its queue.
_AHEAD = """
    SELECT count(*) FROM jobs
    WHERE queue = {queue} AND status = 'pending' AND (created_at, id) < ({created_at}, {id})
"""


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

    async def position(self, job: Job) -> int:
        ahead = await self.pool.fetchval(
            _AHEAD.format(queue="$1", created_at="$2", id="$3"), job.queue, job.created_at, job.id
        )
        return int(ahead) + 1

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
