"""Retention: images of finished jobs are deleted after ``retention_days``.

A periodic pass, in one process at a time (a Postgres advisory lock decides;
it is safe to run in every server and worker), deletes the stored images of
jobs that finished longer ago than the retention and records when in
``jobs.images_expired_at``. The row, its params and its result metadata stay:
history still shows the job, and its image URLs answer 410 Gone.
"""

from __future__ import annotations

import logging

from stepcast.db import Database
from stepcast.settings import Settings
from stepcast.storage import Storage
from stepcast.tasks import every

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400


class Retention:
    def __init__(self, db: Database, storage: Storage, *, retention_s: float, interval_s: float) -> None:
        self.db = db
        self.storage = storage
        self.retention_s = retention_s
        self.interval_s = interval_s

    @classmethod
    def from_settings(cls, settings: Settings, db: Database, storage: Storage) -> Retention:
        return cls(
            db,
            storage,
            retention_s=settings.retention_days * SECONDS_PER_DAY,
            interval_s=settings.retention_interval_s,
        )

    async def run(self) -> None:
        if not self.retention_s:
            return  # images are kept forever
        await every(self.interval_s, self.tick, "retention")

    async def tick(self) -> int | None:
        """One pass: the number of jobs whose images were deleted (None if another process runs it)."""
        async with self.db.singleton("retention") as held:
            if not held:
                return None
            expired = 0
            while jobs := await self.db.images_to_expire(self.retention_s):
                for job in jobs:
                    for key in job.image_keys:
                        await self.storage.delete(key)
                    # Only once every image is gone: a failed delete is tried again next pass.
                    await self.db.mark_images_expired(job.id)
                    expired += 1
            if expired:
                logger.info("retention deleted the images of %d jobs", expired)
            return expired
