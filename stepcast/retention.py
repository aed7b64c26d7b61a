"""Retention: what finished long ago is deleted, so that storage and tables do not grow forever.

A periodic pass, in one process at a time (an advisory lock), deletes old jobs' images (setting
``images_expired_at``: the row stays, its image URLs answer 410), then old finished jobs' rows,
old webhook deliveries and the webhook secrets of expired browser sessions' owners, in bounded
batches (``retention_batch_rows``, ``retention_pass_rows``). docs/reliability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stepcast.background import every
from stepcast.db import Database
from stepcast.settings import SharedSettings
from stepcast.storage import Storage

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class Pruned:
    """What one pass deleted."""

    images: int = 0  # jobs whose images went
    jobs: int = 0
    deliveries: int = 0
    secrets: int = 0
    workers: int = 0  # registrations of workers gone a day or more (their models' cards stay)


class Retention:
    def __init__(
        self,
        db: Database,
        storage: Storage,
        *,
        retention_s: float,
        interval_s: float,
        job_retention_s: float = 0,
        webhook_retention_s: float = 0,
        session_s: float = 0,
        batch_rows: int = 1000,
        pass_rows: int = 20000,
    ) -> None:
        self.db = db
        self.storage = storage
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.job_retention_s = job_retention_s
        self.webhook_retention_s = webhook_retention_s
        self.session_s = session_s
        self.batch_rows = batch_rows
        self.pass_rows = pass_rows

    @classmethod
    def from_settings(cls, settings: SharedSettings, db: Database, storage: Storage) -> Retention:
        return cls(
            db,
            storage,
            retention_s=settings.retention_days * SECONDS_PER_DAY,
            interval_s=settings.retention_interval_s,
            job_retention_s=settings.job_retention_days * SECONDS_PER_DAY,
            webhook_retention_s=settings.webhook_retention_days * SECONDS_PER_DAY,
            session_s=settings.session_max_age_s,
            batch_rows=settings.retention_batch_rows,
            pass_rows=settings.retention_pass_rows,
        )

    async def run(self) -> None:
        await every(self.interval_s, self.tick, "retention")

    async def tick(self) -> Pruned | None:
        """One pass: what it deleted (None if another process runs it)."""
        async with self.db.singleton("retention") as held:
            if not held:
                return None
            pruned = Pruned(
                images=await self._expire_images() if self.retention_s else 0,
                jobs=await self._batches(self.db.retention.delete_finished_jobs, self.job_retention_s),
                deliveries=await self._batches(
                    self.db.retention.delete_finished_deliveries, self.webhook_retention_s
                ),
                secrets=await self._batches(
                    self.db.retention.delete_unused_anonymous_secrets, self.session_s
                ),
                workers=await self.db.models.forget_lapsed(SECONDS_PER_DAY),
            )
            if pruned != Pruned():
                logger.info(
                    "retention deleted the images of %d jobs, %d jobs, %d webhook deliveries, %d secrets, "
                    "%d workers' registrations",
                    pruned.images, pruned.jobs, pruned.deliveries, pruned.secrets, pruned.workers,
                )  # fmt: skip
            return pruned

    async def _expire_images(self) -> int:
        expired = 0
        while expired < self.pass_rows:
            limit = min(self.batch_rows, self.pass_rows - expired)
            jobs = await self.db.retention.images_to_expire(self.retention_s, limit=limit)
            if not jobs:
                break
            for job in jobs:
                for key in job.image_keys:
                    await self.storage.delete(key)
                # Only once every image is gone: a failed delete is tried again next pass.
                await self.db.retention.mark_images_expired(job.id)
                expired += 1
        return expired

    async def _batches(self, delete: Callable[..., Awaitable[int]], older_than_s: float) -> int:
        """``delete`` in batches until nothing is left or the pass has deleted its most; 0
        (keep forever) deletes nothing."""
        if not older_than_s:
            return 0
        deleted = 0
        while deleted < self.pass_rows:
            batch = await delete(older_than_s, limit=min(self.batch_rows, self.pass_rows - deleted))
            deleted += batch
            if batch < self.batch_rows:
                break
        return deleted
