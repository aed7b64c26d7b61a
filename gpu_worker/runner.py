"""Runs one job: claim, generate on the pipeline thread, stream events, store, finish.

The pipeline thread does nothing but denoise: each step hands the step number
(and, when a preview is due, a copy of the latents) to the event loop, which
publishes events, renews the lease, encodes previews and images and writes
Postgres. A cancel, a lost lease, a time-out or a shutdown sets one flag that
the step callback reads, so the GPU stops at the next step.

Postgres writes are retried through a restart or failover (``db_retry_s``);
past that, the lease and the recovery pass take over. A worker shutting down
hands its job back to the queue: the next worker runs it again, and the
attempt does not count against ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from redis.exceptions import RedisError

from gpu_worker.metrics import WorkerMetrics
from gpu_worker.pipeline import Generation, Pipeline, preview_image
from stepcast.db import Database, retrying
from stepcast.events import EventLog
from stepcast.jobs import Job
from stepcast.params import JobParams
from stepcast.settings import Settings
from stepcast.storage import Storage, image_key
from stepcast.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

PNG = "image/png"
TERMINAL_EMIT_ATTEMPTS = 6  # about 6 s of back-off for a Redis blip at the end of a job


@dataclass
class _Active:
    """A job this worker is running; shared with the heartbeat and cancel listener."""

    job: Job
    last_seq: int
    step: int = 0
    stop_reason: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def halt(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_preview(latents: Any, max_px: int) -> str:
    buffer = io.BytesIO()
    preview_image(latents, max_px).save(buffer, format="WEBP", quality=60, method=0)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        events: EventLog,
        storage: Storage,
        pipeline: Pipeline,
        worker_id: str,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.storage = storage
        self.pipeline = pipeline
        self.worker_id = worker_id
        self.metrics = metrics or WorkerMetrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._active: dict[uuid.UUID, _Active] = {}

    def close(self) -> None:
        for active in self._active.values():
            active.halt("shutdown")
        self._executor.shutdown(wait=True)

    def request_cancel(self, job_id: uuid.UUID) -> None:
        active = self._active.get(job_id)
        if active is not None:
            active.halt("canceled")

    async def _write(self, what: str, operation: Callable[[], Awaitable[Job | None]]) -> Job | None:
        return await retrying(operation, what=what, deadline_s=self.settings.db_retry_s)

    async def run(self, job_id: uuid.UUID) -> None:
        job = await self._write(
            "claim",
            lambda: self.db.claim(
                job_id,
                worker=self.worker_id,
                lease_s=self.settings.lease_s,
                model_revision=self.pipeline.revision,
            ),
        )
        if job is None:
            logger.info(
                "job not claimable: finished, canceled or held elsewhere", extra={"job_id": str(job_id)}
            )
            return
        active = _Active(job, last_seq=job.last_seq)
        self._active[job.id] = active
        self.metrics.busy.set(1)
        try:
            await self._execute(active)
        finally:
            self.metrics.busy.set(0)
            del self._active[job.id]

    async def _execute(self, active: _Active) -> None:
        job = active.job
        log = {"job_id": str(job.id), "attempt": job.attempt}
        logger.info("job started", extra=log)
        await self._emit(active, "started", {"attempt": job.attempt, "worker": self.worker_id})
        params = JobParams.from_json(job.params)
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, Any] | None] = asyncio.Queue()
        every = int(job.preview["every"]) if job.preview else 0

        def on_step(step: int, total: int, latents: Any) -> None:
            # Pipeline thread: copy what a preview needs, hand over, return at once.
            wanted = latents is not None and every and (step % every == 0 or step == total)
            snapshot = latents.detach().to("cpu", copy=True) if wanted else None
            loop.call_soon_threadsafe(steps.put_nowait, (step, snapshot))

        publisher = asyncio.create_task(self._publish_progress(active, steps, params))
        heartbeat = asyncio.create_task(self._heartbeat(active))
        generation: Generation | None = None
        error: BaseException | None = None
        shutting_down = False
        pipeline_started = time.perf_counter()
        try:
            future = loop.run_in_executor(
                self._executor, self.pipeline.generate, params, on_step, active.stop.is_set
            )
            try:
                generation = await asyncio.wait_for(asyncio.shield(future), self.settings.job_timeout_s)
            except TimeoutError:
                active.halt("timeout")
                generation = await future
            except asyncio.CancelledError:
                # The worker is stopping (its grace period is over): stop at the
                # next step, hand the job back below, then let arq put it back.
                shutting_down = True
                active.halt("shutdown")
                generation = await future
        except Exception as exc:
            error = exc
            logger.exception("pipeline failed", extra=log)
        finally:
            self.metrics.pipeline_seconds.inc(time.perf_counter() - pipeline_started)
            steps.put_nowait(None)
            try:
                await publisher
            finally:
                await cancel_and_wait(heartbeat)

        reason = active.stop_reason
        if reason == "lost":
            logger.warning("job lost to another attempt; dropping this result", extra=log)
        elif error is not None:
            await self._fail(active, "pipeline_error", f"{type(error).__name__}: {error}")
        elif reason == "timeout":
            limit = self.settings.job_timeout_s
            await self._fail(active, "timeout", f"the job ran longer than its {limit:g} s time-out")
        elif generation is not None and not generation.interrupted and reason in {None, "shutdown"}:
            await self._complete(active, params, generation)  # finished before the stop took effect
        elif reason == "shutdown":
            await self._hand_back(active)
        else:
            await self._cancel(active)
        if shutting_down:
            raise asyncio.CancelledError

    async def _publish_progress(
        self, active: _Active, steps: asyncio.Queue[tuple[int, Any] | None], params: JobParams
    ) -> None:
        started = time.monotonic()
        preview_px = (
            min(int(active.job.preview["max_px"]), max(params.width, params.height))
            if active.job.preview
            else 0
        )
        while (item := await steps.get()) is not None:
            step, latents = item
            active.step = step
            self.metrics.steps.inc()
            elapsed = time.monotonic() - started
            fields: dict[str, Any] = {
                "step": step,
                "total": params.steps,
                "eta_s": round(elapsed / step * (params.steps - step), 3),
            }
            if latents is not None:
                try:
                    fields["preview"] = await asyncio.to_thread(encode_preview, latents, preview_px)
                except Exception as exc:  # a preview is a nicety: never let it stop the events
                    logger.warning("no preview: %s", exc, extra={"job_id": str(active.job.id)})
            await self._emit(active, "progress", fields)

    async def _heartbeat(self, active: _Active) -> None:
        job = active.job
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                cancel = await self.db.heartbeat(
                    job.id,
                    job.attempt,
                    lease_s=self.settings.lease_s,
                    step=active.step,
                    last_seq=active.last_seq,
                )
            except Exception:
                logger.exception("heartbeat failed", extra={"job_id": str(job.id)})
                continue
            if cancel is None:
                active.halt("lost")
            elif cancel:
                active.halt("canceled")

    async def _complete(self, active: _Active, params: JobParams, generation: Generation) -> None:
        job = active.job
        records: list[dict[str, Any]] = []
        try:
            pngs = await asyncio.to_thread(lambda: [encode_png(image) for image in generation.images])
            for index, (png, image, seed) in enumerate(
                zip(pngs, generation.images, params.image_seeds(), strict=True)
            ):
                key = image_key(str(job.id), index)
                await self.storage.put(key, png, PNG)
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
            await self._fail(active, "storage_error", f"could not store the images: {exc}")
            return
        result = {"images": records}

        async def write(seq: int) -> Job | None:
            return await self.db.complete(job.id, job.attempt, result=result, seq=seq)

        async def fields(done: Job) -> dict[str, Any]:
            images = [
                {"url": await self.storage.url(r["key"]), **{k: v for k, v in r.items() if k != "key"}}
                for r in records
            ]
            return {"images": images, "timings": {"queue_s": done.queue_s, "run_s": done.run_s}}

        await self._finish(active, "completed", write, fields)

    async def _fail(self, active: _Active, code: str, message: str) -> None:
        job = active.job

        async def write(seq: int) -> Job | None:
            return await self.db.fail(job.id, job.attempt, code=code, message=message, seq=seq)

        async def fields(done: Job) -> dict[str, Any]:
            return {"error": {"code": code, "message": message}}

        await self._finish(active, "failed", write, fields)

    async def _hand_back(self, active: _Active) -> None:
        job = active.job
        log = {"job_id": str(job.id), "attempt": job.attempt}
        back = await self._write(
            "hand back", lambda: self.db.hand_back(job.id, job.attempt, last_seq=active.last_seq)
        )
        if back is None:  # a cancel is pending (or the job moved on): finish it as canceled
            await self._cancel(active)
            return
        logger.info("job handed back to the queue (shutdown)", extra=log)
        self.metrics.jobs.labels("handed_back").inc()
        await self._emit(active, "requeued", {"attempt": job.attempt + 1, "reason": "worker_shutdown"})

    async def _cancel(self, active: _Active) -> None:
        job = active.job

        async def write(seq: int) -> Job | None:
            return await self.db.cancel_running(job.id, job.attempt, step=active.step, seq=seq)

        async def fields(done: Job) -> dict[str, Any]:
            return {}

        await self._finish(active, "canceled", write, fields)

    async def _finish(
        self,
        active: _Active,
        event_type: str,
        write: Callable[[int], Awaitable[Job | None]],
        fields: Callable[[Job], Awaitable[dict[str, Any]]],
    ) -> None:
        """Record the terminal state in Postgres (fenced), then publish it with the same seq."""
        job = active.job
        try:
            seq = await self.events.reserve(str(job.id), floor=active.last_seq)
        except RedisError:
            logger.exception(
                "could not reserve a seq; continuing from Postgres", extra={"job_id": str(job.id)}
            )
            seq = active.last_seq + 1
        done = await self._write(event_type, lambda: write(seq))
        if done is None:
            # A retried write may have committed the first time (the reply was lost).
            current = await self._write("read back", lambda: self.db.get_job(job.id))
            ours = current is not None and (current.attempt, current.last_seq) == (job.attempt, seq)
            if not ours or current is None or current.status.value != event_type:
                logger.warning("terminal write fenced off: job moved on", extra={"job_id": str(job.id)})
                return
            done = current
        logger.info("job %s", event_type, extra={"job_id": str(job.id), "attempt": job.attempt})
        self.metrics.jobs.labels(event_type).inc()
        if done.run_s is not None:
            self.metrics.run_seconds.observe(done.run_s)
        if done.queue_s is not None:
            self.metrics.queue_seconds.observe(done.queue_s)
        # The outcome is recorded; retry its publication so live watchers hear of it.
        await self._emit(active, event_type, await fields(done), seq=seq, attempts=TERMINAL_EMIT_ATTEMPTS)

    async def _emit(
        self, active: _Active, event_type: str, fields: dict[str, Any], *, seq: int = 0, attempts: int = 1
    ) -> None:
        job = active.job
        for attempt in range(attempts):
            try:
                published = await self.events.emit(
                    str(job.id), job.owner, event_type, fields, floor=active.last_seq, seq=seq
                )
            except RedisError:
                # Postgres holds the truth; a subscriber that missed this gets a snapshot.
                logger.warning(
                    "could not publish %s", event_type, extra={"job_id": str(job.id)}, exc_info=True
                )
                await asyncio.sleep(0.1 * 2**attempt)
                continue
            if published < 0:
                logger.warning(
                    "%s not appended: the log is past seq %s", event_type, seq, extra={"job_id": str(job.id)}
                )
            else:
                active.last_seq = published
            return
