"""What the retention pass (:mod:`stepcast.retention`) deletes: old images, jobs, deliveries, secrets.

Each delete takes a bounded batch, oldest first, skipping rows another
transaction holds, and says how many rows went.
"""

from __future__ import annotations

import uuid
from typing import Any

from stepcast.db.store import Store
from stepcast.jobs import Job


class RetentionStore(Store):
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
