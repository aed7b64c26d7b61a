"""The job operations every interface shares: REST, WebSocket and SSE submit, read and cancel
a job the same way, through one :class:`JobService`."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from server import limits
from server.admission import Admission
from server.metrics import ServerMetrics
from server.positions import EtaEstimator
from stepcast import __version__, credentials, queue
from stepcast.db import Insertion, NewJob, Place
from stepcast.db.counts import CountStore, share_of
from stepcast.db.jobs import JobStore
from stepcast.errors import (
    Conflict,
    IdempotencyKeyReused,
    NotFound,
    Unavailable,
)
from stepcast.events import Canceled
from stepcast.jobs import Job, to_wire
from stepcast.lifecycle import Lifecycle, Speaker
from stepcast.models import queue_of
from stepcast.params import Submission
from stepcast.redis_keys import CANCEL_CHANNEL
from stepcast.round_trips import AnyPipeline, GatheredCommands, Gatherer
from stepcast.settings import ServerSettings
from stepcast.status import Status
from stepcast.storage import Storage

logger = logging.getLogger(__name__)


class JobService:
    def __init__(
        self,
        settings: ServerSettings,
        store: JobStore,
        counts: CountStore,
        redis: ArqRedis,
        lifecycle: Lifecycle,
        eta: EtaEstimator,
        storage: Storage,
        metrics: ServerMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.counts = counts
        self.redis = redis
        self.lifecycle = lifecycle
        self.eta = eta
        self.admission = Admission(settings, eta)
        self.storage = storage
        self.metrics = metrics
        # The submits of one loop pass are inserted in one statement, announced in one round trip.
        self.inserts: Gatherer[NewJob, Insertion] = Gatherer(self._insert)
        self.pipelined = GatheredCommands(redis)

    async def submit(
        self,
        owner: str,
        submission: Submission,
        *,
        idempotency_key: str | None = None,
        address: str | None = None,
        priority_class: str | None = None,
    ) -> tuple[Job, bool]:
        """Insert the job (Postgres first, always), enqueue it, announce its place.

        Returns the job and whether it is new: a repeat of an idempotency key
        returns the owner's first job with that key, and is never refused for
        a full queue. ``address`` is the client's: an anonymous owner's submits
        are limited per address too. ``priority_class``: the caller's; its
        weight is the owner's in the queue's turns.
        """
        if idempotency_key is not None:
            earlier = await self.store.by_idempotency_key(owner, idempotency_key)
            if earlier is not None:
                return self._replay(earlier, submission), False
        anonymous = credentials.is_anonymous(owner)
        if anonymous:
            limit = self.settings.anonymous_submits_per_min_per_address
            await limits.count_per_minute(self.redis, "anonymous submits", address, limit)
        settings, params = self.settings, submission.params
        queue_name = queue_of(settings.queue_name, params.model)
        pace = await self.eta.pace(queue_name)
        admission = self.admission
        cost_ms, budget_s = admission.cost_ms(params, pace), admission.budget_s(anonymous=anonymous)
        admission.check_cost(cost_ms, budget_s, anonymous=anonymous)
        if submission.start_within_s is not None:
            share = share_of(owner, address if anonymous else None)
            await admission.check_start(share, queue_name, params.model, submission.start_within_s)
        insertion = await self.inserts(
            NewJob(
                owner=owner,
                params=params,
                model_name=params.model,
                preview=submission.preview,
                webhook=submission.webhook.to_json() if submission.webhook else None,
                idempotency_key=idempotency_key,
                request_hash=submission.fingerprint if idempotency_key else None,
                anonymous=anonymous,
                address=address,
                cost_ms=cost_ms,
                weight=settings.weight_of(priority_class),
                max_cost_ms=round(budget_s * 1000),
            )
        )
        job = insertion.job
        if job is None:
            admission.refuse(insertion, pace, cost_ms, budget_s, anonymous=anonymous)
        if not insertion.created:  # a concurrent submit with the same key got there first
            return self._replay(job, submission), False
        log = {"job_id": str(job.id), "owner": owner}
        queued = await self.eta.queued(
            job, Place(insertion.ahead + 1, insertion.work_ahead, insertion.running_work)
        )

        # Announce before enqueueing: a worker may start the job at once, and `queued` must
        # come before `started` in the job's log. On the queue's Redis, in one round trip.
        shared = self.lifecycle.events.shares(self.redis)

        def announce(pipe: AnyPipeline) -> None:
            assert isinstance(pipe, Pipeline)  # (the queue's Redis is a plain one)
            if shared:
                self.lifecycle.announce_in(pipe, job, queued)
            ticket = queue.Ticket.of(job)
            queue.enqueue_in(pipe, self.redis, job.id, job.queue, place=queue.place_of(job), ticket=ticket)

        if not shared:
            try:
                await self.lifecycle.announce(job, queued)
            except RedisError:  # its watchers get a snapshot; the job runs all the same
                logger.warning("the event plane is unreachable; job announced without `queued`", extra=log)
        try:
            await self.pipelined(announce)
        except RedisError:
            # The row is the truth; the job stays pending and is enqueued again
            # once Redis is back.
            logger.exception("enqueue failed; job left pending", extra=log)
        logger.info("job accepted", extra=log)
        self.metrics.jobs_submitted.inc()
        return job, True

    async def _insert(self, jobs: list[NewJob]) -> list[Insertion | BaseException]:
        """The submits of one loop pass, one statement per model's queue (almost always one)."""
        settings = self.settings
        by_queue: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_queue.setdefault(queue_of(settings.queue_name, job.model_name), []).append(index)
        insertions: list[Insertion | BaseException] = [RuntimeError("not inserted")] * len(jobs)
        for queue_name, indexes in by_queue.items():
            try:
                inserted = await self.store.insert_many(
                    [jobs[index] for index in indexes],
                    queue=queue_name,
                    version=__version__,
                    queue_ttl_s=settings.queue_ttl_s,
                    max_pending=settings.max_queue_depth,
                    max_unfinished=settings.max_jobs_per_owner,
                    max_anonymous_unfinished=settings.max_jobs_per_anonymous_owner,
                    max_anonymous_per_address=settings.max_anonymous_jobs_per_address,
                    max_queue_cost_ms=round(settings.max_queue_cost_s * 1000),
                )
            except Exception as exc:  # this model's submits fail; another's may be in already
                inserted = [exc] * len(indexes)
            for index, insertion in zip(indexes, inserted, strict=True):
                insertions[index] = insertion
        return insertions

    @staticmethod
    def _replay(job: Job, submission: Submission) -> Job:
        if job.request_hash != submission.fingerprint:
            raise IdempotencyKeyReused(
                f"this idempotency key was used for job {job.id} with different parameters; "
                "use a new key for a different request"
            )
        return job

    async def get(self, owner: str, job_id: uuid.UUID) -> Job:
        job = await self.store.get(job_id, owner)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    async def cancel(self, owner: str, job_id: uuid.UUID) -> Job:
        """Pending jobs are canceled here and never start; processing jobs stop at their next step."""
        job = await self.get(owner, job_id)
        if job.status is Status.PENDING:
            # Without Redis the seq comes from Postgres: watchers learn of it in a snapshot.
            canceled = await self.lifecycle.finish(
                job,
                Status.CANCELED,
                Speaker.waiting(job),
                lambda seq: self.store.finish_pending(job.id, status=Status.CANCELED, seq=seq),
                Canceled(),
            )
            if canceled is not None:
                logger.info("job canceled while pending", extra={"job_id": str(job.id)})
                return canceled
            job = await self.get(owner, job_id)  # claimed meanwhile: cancel it as processing
            if job.status is Status.PENDING:  # Postgres did not answer the write
                raise Unavailable("the cancel could not be recorded just now; send it again")
        if job.status is Status.PROCESSING:
            requested = await self.store.request_cancel(job.id)
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
        if job.status is not Status.PENDING:
            return await to_wire(job, self.storage.url)
        place = await self.counts.place(job)
        start_at = await self.eta.start_at(job, place)
        return await to_wire(
            job, self.storage.url, queue_position=place.position, estimated_start_at=start_at
        )
