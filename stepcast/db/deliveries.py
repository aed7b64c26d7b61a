"""Webhook deliveries: leased to a sender when due, their outcome recorded under that lease.

The rows are made in the job's own terminal write (the schema's trigger); the
sender is :mod:`stepcast.webhooks`.
"""

from __future__ import annotations

import uuid

import asyncpg

from stepcast.db.store import Store


class DeliveryStore(Store):
    async def due(self, *, lease_s: float, limit: int, max_attempts: int) -> list[asyncpg.Record]:
        """Deliveries due now, leased to this sender for ``lease_s`` (others skip them).

        The attempt is counted here, before anything is sent, so one that never
        ends (the sender died) still counts. A row whose ``max_attempts`` all
        ended that way comes back failed, not leased.
        """
        rows = await self.pool.fetch(
            """
            WITH due AS (
                SELECT id, coalesce(attempt_limit, $3) AS most FROM webhook_deliveries
                WHERE status = 'pending' AND next_attempt_at <= now()
                ORDER BY next_attempt_at LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            UPDATE webhook_deliveries AS d SET
                next_attempt_at = now() + make_interval(secs => $1),
                attempts = d.attempts + CASE WHEN d.attempts < due.most THEN 1 ELSE 0 END,
                status = CASE WHEN d.attempts < due.most THEN 'pending' ELSE 'failed' END,
                last_error = CASE WHEN d.attempts < due.most THEN d.last_error
                    ELSE concat_ws('; ', d.last_error, 'gave up after ' || d.attempts
                                   || ' attempts (the last one ended without an outcome)') END
            FROM due WHERE d.id = due.id
            RETURNING d.*
            """,
            lease_s, limit, max_attempts,
        )  # fmt: skip
        return list(rows)

    async def record(
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

    async def of_job(self, job_id: uuid.UUID, owner: str) -> list[asyncpg.Record]:
        """The job's deliveries, oldest first, if the job is ``owner``'s (none otherwise)."""
        rows = await self.pool.fetch(
            "SELECT * FROM webhook_deliveries WHERE job_id = $1 AND owner = $2 ORDER BY created_at, event",
            job_id,
            owner,
        )
        return list(rows)

    async def redeliver(self, job_id: uuid.UUID, delivery_id: uuid.UUID, owner: str) -> asyncpg.Record | None:
        """One more attempt of a delivery, due now (whatever became of the others); None if the
        owner has no such delivery. The id stays: it is the ``webhook-id`` receivers dedupe on."""
        row: asyncpg.Record | None = await self.pool.fetchrow(
            """
            UPDATE webhook_deliveries SET
                status = 'pending', next_attempt_at = now(), attempt_limit = attempts + 1, delivered_at = NULL
            WHERE id = $1 AND job_id = $2 AND owner = $3
            RETURNING *
            """,
            delivery_id, job_id, owner,
        )  # fmt: skip
        return row
