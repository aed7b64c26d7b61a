"""Queue positions pushed as the queue moves: ``queued {position, eta_s}``.

One server at a time does it (a Postgres advisory lock elects it; another
takes over when it dies), once a second, and only for jobs whose position
changed. ETAs scale measured seconds per step for the job's size by the
number of workers recently busy on its queue.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.services import Services

logger = logging.getLogger(__name__)

_LEADER_LOCK = 0x5EC0_9051


class QueueAnnouncer:
    def __init__(self, services: Services, *, interval_s: float) -> None:
        self.services = services
        self.interval_s = interval_s
        self._announced: dict[uuid.UUID, int] = {}

    async def run(self) -> None:
        while True:
            try:
                async with self.services.db.pool.acquire() as conn:
                    # Another server holds the lock; poll for it (it frees on that server's exit).
                    while not await conn.fetchval(  # noqa: ASYNC110
                        "SELECT pg_try_advisory_lock($1)", _LEADER_LOCK
                    ):
                        await asyncio.sleep(self.interval_s * 2)
                    try:
                        while True:
                            await self.tick()
                            await asyncio.sleep(self.interval_s)
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock($1)", _LEADER_LOCK)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("queue announcer failed; retrying")
                self._announced.clear()
                await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        db, events = self.services.db, self.services.events
        pending = await db.pending_positions()
        per_job: dict[tuple[str, int, int, int], float | None] = {}
        workers: dict[str, int] = {}
        for job, position in pending:
            if self._announced.get(job.id) == position:
                continue
            shape = (job.queue, job.params["width"], job.params["height"], job.params["steps"])
            if shape not in per_job:
                per_job[shape] = await db.mean_run_s(*shape)
            if job.queue not in workers:
                workers[job.queue] = await db.active_workers(job.queue)
            mean = per_job[shape]
            eta_s = None if mean is None else round(position * mean / workers[job.queue], 3)
            fields = {"position": position, "eta_s": eta_s}
            await events.emit(
                str(job.id), job.owner, "queued", fields, floor=job.last_seq, only_while_queued=True
            )
            self._announced[job.id] = position
        live = {job.id for job, _ in pending}
        for job_id in [j for j in self._announced if j not in live]:
            del self._announced[job_id]
