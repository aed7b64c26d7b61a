"""A claimed job's run: its start, its lease, its stop flag, its images and its terminal write
(its steps: :mod:`gpu_worker.progress`).

The pipeline thread only denoises; everything here runs on the event loop, while the next batch
runs. A cancel, a lost lease, a time-out or a shutdown stops a job at once; a shutdown hands a
running job back to the queue (docs/design.md, "Inside the worker").
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image

from gpu_worker.claimed import Claimed, Outcome
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.pipeline import Generation
from gpu_worker.progress import StepPublisher
from stepcast.background import cancel_and_wait, stop_if_cancelled
from stepcast.db import Completion, Database, retrying
from stepcast.events import Canceled, Completed, Failed, Started, Terminal
from stepcast.jobs import Job
from stepcast.lifecycle import Lifecycle, Speaker
from stepcast.round_trips import Gatherer
from stepcast.settings import WorkerSettings
from stepcast.status import Status
from stepcast.storage import Put, Storage, image_key

logger = logging.getLogger(__name__)

PNG = "image/png"


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Execution:
    """Runs claimed jobs from their ``started`` event to their terminal state."""

    def __init__(
        self,
        settings: WorkerSettings,
        db: Database,
        lifecycle: Lifecycle,
        storage: Storage,
        worker_id: str,
        metrics: WorkerMetrics,
        *,
        steps: StepPublisher,
        session: Callable[[], int | None],
    ) -> None:
        self.settings = settings
        self.db = db
        self.lifecycle = lifecycle
        self.storage = storage
        self.worker_id = worker_id
        self.metrics = metrics
        self.steps = steps
        self.session = session  # the worker's session number, for the heartbeats
        # A batch's jobs finish at the same moment: one thread hop encodes and stores
        # their images, one statement records them all.
        self._stores: Gatherer[Put, None] = Gatherer(storage.put_all)
        self._completions: Gatherer[Completion, Job | None] = Gatherer(self._record)

    async def execute(self, active: Claimed, let_go: Callable[[], None]) -> None:
        job = active.job
        log = {"job_id": str(job.id), "attempt": job.attempt}
        logger.info("job started", extra=log)
        await self.steps.emit(active, await self._started(active))
        publisher = asyncio.create_task(self.steps.publish(active))
        heartbeat = asyncio.create_task(self._heartbeat(active))
        outcome: Outcome | None = None
        shutting_down = False
        try:
            try:
                async with asyncio.timeout(self.settings.job_timeout_s):
                    outcome = await self._outcome(active)
            except TimeoutError:
                active.halt("timeout")
                outcome = await self._outcome(active)
            except asyncio.CancelledError:
                # The worker is stopping (its grace period is over): stop at the
                # next step, hand the job back below, then let arq put it back.
                shutting_down = True
                active.halt("shutdown")
                outcome = await self._outcome(active)
        finally:
            let_go()
            active.steps.close()
            try:
                await publisher
            finally:
                await cancel_and_wait(heartbeat)

        reason = active.stop_reason
        if reason == "lost":
            logger.warning("job lost to another attempt; dropping this result", extra=log)
        elif isinstance(outcome, Exception):
            logger.error("pipeline failed", exc_info=outcome, extra=log)
            await self._fail(active, "pipeline_error", f"{type(outcome).__name__}: {outcome}")
        elif reason == "timeout":
            limit = self.settings.job_timeout_s
            await self._fail(active, "timeout", f"the job ran longer than its {limit:g} s time-out")
        elif outcome is not None and not outcome.interrupted and reason in {None, "shutdown"}:
            await self._complete(active, outcome)  # finished before the stop took effect
        elif reason == "shutdown":
            await self._hand_back(active)
        else:
            await self._cancel(active)
        if shutting_down:
            raise asyncio.CancelledError

    async def _started(self, active: Claimed) -> Started:
        """Its ``started``; a retried attempt says where it continues, and the row corrects
        what the requeue promised when the checkpoint was gone."""
        job, resumed = active.job, active.resumed_from
        if job.attempt == 1:
            return Started(attempt=job.attempt, worker=self.worker_id)
        promised = job.resumed_from_step or 0
        lost = promised > 0 and resumed < promised
        if resumed != promised:
            log = {"job_id": str(job.id), "attempt": job.attempt}
            if lost:
                logger.warning("checkpoint of step %d gone: from step %d", promised, resumed, extra=log)
            try:
                await self.db.runs.resume_from(job.id, job.attempt, step=resumed)
            except Exception:  # the next heartbeat carries the progress; the row says less
                logger.exception("could not record where the job resumes", extra=log)
        if resumed:
            logger.info("job resumes from step %d", resumed, extra={"job_id": str(job.id)})
            self.metrics.resumed_steps.inc(resumed)
        worker = self.worker_id
        return Started(job.attempt, worker, resumed_from_step=resumed, checkpoint_lost=lost or None)

    async def _outcome(self, active: Claimed) -> Outcome | None:
        """The job's images once its batch is done; None if it stopped while its batch-mates go on."""
        stopped = asyncio.ensure_future(active.stopped.wait())
        waiters: set[asyncio.Future[Any]] = {active.outcome, stopped}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if active.outcome.done():
            return active.outcome.result()
        if not active.batch_stops():
            return None
        return await asyncio.shield(active.outcome)  # the pipeline stops at the next step

    async def _heartbeat(self, active: Claimed) -> None:
        job = active.job
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                cancel = await self.db.runs.heartbeat(
                    job.id,
                    job.attempt,
                    lease_s=self.settings.lease_s,
                    step=active.step,
                    last_seq=active.last_seq,
                    session=self.session(),
                )
            except Exception as exc:
                stop_if_cancelled(exc)
                logger.exception("heartbeat failed", extra={"job_id": str(job.id)})
                continue
            if cancel is None:
                active.halt("lost")
            elif cancel:
                active.halt("canceled")

    async def _complete(self, active: Claimed, generation: Generation) -> None:
        job, params = active.job, active.params
        records: list[dict[str, Any]] = []
        # The terminal event's seq, reserved while the images are encoded and stored.
        seq = asyncio.ensure_future(self.lifecycle.reserve(job.id, Speaker.running(job)))
        try:
            for index, (image, seed) in enumerate(zip(generation.images, params.image_seeds(), strict=True)):
                # Under this attempt's own keys: a stale attempt cannot overwrite the winner's images.
                key = image_key(str(job.id), index, attempt=job.attempt)
                await self._stores((key, functools.partial(encode_png, image), PNG))
                records.append(
                    {
                        "key": key,
                        "width": image.width,
                        "height": image.height,
                        "seed": seed,
                        "content_type": PNG,
                    }
                )
        except Exception as exc:
            logger.exception("storing images failed", extra={"job_id": str(job.id)})
            await self._fail(active, "storage_error", f"could not store the images: {exc}", seq=await seq)
            return
        if await seq is None:
            logger.warning("job moved on while its images were stored", extra={"job_id": str(job.id)})
            return
        result = {"images": records}

        async def write(seq: int) -> Job | None:
            batch = len(active.batch)
            return await self._completions(
                Completion(job.id, job.attempt, job.owner, result, seq, active.pipeline_s, batch)
            )

        async def event(done: Job) -> Terminal:
            images = [
                {"url": await self.storage.url(r["key"]), **{k: v for k, v in r.items() if k != "key"}}
                for r in records
            ]
            return Completed(images=images, timings=done.timings())

        await self._finish(active, Status.COMPLETED, write, event, seq=await seq)

    async def _record(self, completions: list[Completion]) -> list[Job | BaseException | None]:
        return [*await self.db.runs.complete(completions)]

    async def _fail(self, active: Claimed, code: str, message: str, *, seq: int | None = None) -> None:
        job = active.job

        async def write(seq: int) -> Job | None:
            return await self.db.runs.fail(job.id, job.attempt, code=code, message=message, seq=seq)

        await self._finish(active, Status.FAILED, write, Failed(code=code, message=message), seq=seq)

    async def _hand_back(self, active: Claimed) -> None:
        job = active.job
        log = {"job_id": str(job.id), "attempt": job.attempt}
        back = await self.lifecycle.requeue(
            job,
            "worker_shutdown",
            lambda: self.db.runs.hand_back(
                job.id, job.attempt, last_seq=active.last_seq, resume_step=active.checkpoint_step
            ),
            resume_step=active.checkpoint_step,
        )
        if back is None:
            # A cancel is pending, or the job moved on (its write is fenced), or Postgres never
            # answered: then the lease runs out and the recovery pass takes it back.
            read_back = functools.partial(self.db.jobs.get, job.id)
            current = await retrying(read_back, what="read back", deadline_s=self.settings.db_retry_s)
            if current is not None and current.attempt == job.attempt and current.cancel_requested:
                await self._cancel(active)
            return
        active.handed_back = back
        logger.info("job handed back to the queue (shutdown)", extra=log)
        self.metrics.jobs.labels("handed_back").inc()

    async def _cancel(self, active: Claimed) -> None:
        job = active.job

        async def write(seq: int) -> Job | None:
            return await self.db.runs.cancel(job.id, job.attempt, step=active.step, seq=seq)

        await self._finish(active, Status.CANCELED, write, Canceled())

    async def _finish(
        self,
        active: Claimed,
        status: Status,
        write: Callable[[int], Awaitable[Job | None]],
        event: Terminal | Callable[[Job], Awaitable[Terminal]],
        *,
        seq: int | None = None,
    ) -> None:
        """Record the terminal state in Postgres (fenced), then publish it with the same seq."""
        job = active.job
        done = await self.lifecycle.finish(job, status, Speaker.running(job), write, event, seq=seq)
        if done is None:
            return
        logger.info("job %s", status.value, extra={"job_id": str(job.id), "attempt": job.attempt})
        self.metrics.jobs.labels(status.value).inc()
        if done.run_s is not None:
            self.metrics.run_seconds.observe(done.run_s)
        if done.queue_s is not None:
            self.metrics.queue_seconds.observe(done.queue_s)
