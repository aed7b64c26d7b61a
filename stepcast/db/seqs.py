"""A job's event seqs as Postgres keeps them: blocks reserved ahead, a terminal event's seq moved on.

:mod:`stepcast.lifecycle` numbers every event it appends with these; a worker's
reservation is fenced by its ``attempt``.
"""

from __future__ import annotations

import uuid

from stepcast.db.store import Store


class SeqStore(Store):
    async def reserve(self, job_id: uuid.UUID, count: int, *, attempt: int | None = None) -> int | None:
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
