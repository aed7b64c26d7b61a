"""What a server process holds (pools, storage) and the job operations every
interface shares: REST and WebSocket submit, read and cancel the same way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from server.hub import Hub
from server.positions import EtaEstimator, QueueAnnouncer
from stepcast import __version__, queue
from stepcast.db import Database
from stepcast.errors import Conflict, NotFound
from stepcast.events import CANCEL_CHANNEL, EventLog
from stepcast.jobs import Job, Status, to_wire
from stepcast.params import Submission
from stepcast.recovery import Recovery
from stepcast.settings import Settings
from stepcast.storage import Storage, open_storage
from stepcast.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    redis: ArqRedis
    events: EventLog
    storage: Storage
    hub: Hub

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Services]:
        async with contextlib.AsyncExitStack() as stack:
            db = await Database.connect(settings.database_url, max_size=settings.database_pool_max)
            stack.push_async_callback(db.close)
            await db.migrate()
            redis = queue.connect(settings.redis_url)
            stack.push_async_callback(redis.aclose, close_connection_pool=True)
            storage = await stack.enter_async_context(open_storage(settings))
            events = EventLog(redis, stream_max=settings.event_stream_max, ttl_s=settings.event_ttl_s)
            hub = Hub(redis)
            await hub.start()
            stack.push_async_callback(hub.stop)
            services = cls(settings, db, redis, events, storage, hub)
            for background in (
                QueueAnnouncer(services, interval_s=settings.queue_update_s).run(),
                Recovery.from_settings(settings, db, events, redis).run(),
            ):
                stack.push_async_callback(cancel_and_wait, asyncio.create_task(background))
            yield services

    async def submit(self, owner: str, submission: Submission) -> Job:
        """Insert the job (Postgres first, always), enqueue it, announce its place."""
        preview = None
        if submission.preview is not None:
            preview = {"every": submission.preview.every, "max_px": submission.preview.max_px}
        job = await self.db.insert_job(
            owner=owner,
            params=submission.params.to_json(),
            preview=preview,
            queue=self.settings.queue_name,
            model_name=submission.params.model,
            version=__version__,
        )
        log = {"job_id": str(job.id), "owner": owner}
        try:
            # Announce before enqueueing: a worker may start the job at once, and
            # `queued` must come before `started` in the job's log.
            position, eta_s = await self.place(job)
            fields = {"position": position, "eta_s": eta_s}
            await self.events.emit(str(job.id), owner, "queued", fields, floor=job.last_seq)
            await queue.enqueue(self.redis, job.id, job.queue)
        except RedisError:
            # The row is the truth; the job stays pending and is enqueued again
            # once Redis is back.
            logger.exception("enqueue failed; job left pending", extra=log)
        logger.info("job accepted", extra=log)
        return job

    async def place(self, job: Job) -> tuple[int, float | None]:
        """Queue position (1 = next to start) and the seconds until it should be done."""
        position = await self.db.queue_position(job)
        return position, await EtaEstimator(self.db).eta_s(job, position)

    async def get(self, owner: str, job_id: uuid.UUID) -> Job:
        job = await self.db.get_job(job_id, owner)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    async def cancel(self, owner: str, job_id: uuid.UUID) -> Job:
        """Pending jobs are canceled here and never start; processing jobs stop at their next step."""
        job = await self.get(owner, job_id)
        if job.status is Status.PENDING:
            try:
                seq = await self.events.reserve(str(job.id), floor=job.last_seq)
            except RedisError:
                seq = job.last_seq + 1  # Postgres decides, with or without Redis
            canceled = await self.db.cancel_pending(job.id, seq)
            if canceled is not None:
                with contextlib.suppress(RedisError):
                    await self.events.emit(str(job.id), owner, "canceled", floor=seq, seq=seq)
                logger.info("job canceled while pending", extra={"job_id": str(job.id)})
                return canceled
            job = await self.get(owner, job_id)  # claimed meanwhile: cancel it as processing
        if job.status is Status.PROCESSING:
            requested = await self.db.request_cancel(job.id)
            if requested is not None:
                # The worker hears at once; without Redis its next heartbeat reads the flag.
                with contextlib.suppress(RedisError):
                    await self.redis.publish(CANCEL_CHANNEL, str(job.id))
                logger.info("cancel requested", extra={"job_id": str(job.id)})
                return requested
            job = await self.get(owner, job_id)
        if job.status is Status.CANCELED:
            return job
        raise Conflict(f"job {job_id} is already {job.status.value}")

    async def render(self, job: Job) -> dict[str, Any]:
        position = None
        if job.status is Status.PENDING:
            position = await self.db.queue_position(job)
        return await to_wire(job, self.storage.url, queue_position=position)
