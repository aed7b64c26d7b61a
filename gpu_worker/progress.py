"""A running job's steps, as they reach the event loop: its ``progress`` events (with previews)
and its checkpoints, and every event it emits while it runs.

Steps that came close together arrive together (the mailbox) and go out in one send. A refused
event or checkpoint (a newer attempt exists) stops the job at once (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

from gpu_worker import checkpoints
from gpu_worker.checkpoints import Snapshot
from gpu_worker.claimed import Claimed, Step
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.previews import encode_previews
from stepcast.checkpoints import Checkpoints
from stepcast.events import FENCED, Progress, Started
from stepcast.lifecycle import Lifecycle, Speaker, last_published

logger = logging.getLogger(__name__)


class StepPublisher:
    def __init__(
        self, lifecycle: Lifecycle, checkpoints: Checkpoints, revision: str, metrics: WorkerMetrics
    ) -> None:
        self.lifecycle = lifecycle
        self.checkpoints = checkpoints
        self.revision = revision  # the model's: a checkpoint is valid for it only
        self.metrics = metrics

    async def publish(self, active: Claimed) -> None:
        """Until its mailbox closes: each new step's ``progress``, the newest checkpoint due."""
        params = active.params
        preview_px = (
            min(active.job.preview.max_px, max(params.width, params.height)) if active.job.preview else 0
        )
        while (bunch := await active.steps.get()) is not None:
            new = []
            for item in bunch:
                if item.step > active.step and not item.quiet:  # (a failed batch re-runs its jobs alone)
                    active.step = item.step
                    new.append(item)
            if new:
                await self._report(active, new, preview_px)
            if bunch[-1].step >= params.steps:
                continue  # denoised: nothing left to resume (and batch-mates finish together)
            newest = next((item for item in reversed(bunch) if item.snapshot is not None), None)
            if newest is None or newest.snapshot is None or newest.step <= active.checkpoint_step:
                continue
            if newest.quiet and active.stop_reason != "shutdown":
                continue  # canceled, timed out or lost: nothing will resume it
            await self._save(active, newest.snapshot)

    async def emit(self, active: Claimed, *events: Started | Progress) -> None:
        """The job's events, in order and one send; refused ones mean the job is no longer its."""
        job = active.job
        answers = await self.lifecycle.emit_all(job.id, job.owner, events, Speaker.running(job))
        if (published := last_published(answers)) is not None:
            active.last_seq = published
        if FENCED in answers:  # a newer attempt exists: this one stops now, not at its heartbeat
            active.halt("lost")

    async def _report(self, active: Claimed, new: list[Step], preview_px: int) -> None:
        """The steps' ``progress`` events, in one send; the ETA from this attempt's own pace."""
        params = active.params
        self.metrics.steps.inc(len(new))
        previews: list[str | None] = [None] * len(new)
        if any(item.pixels is not None for item in new):
            pixels = [await self._pixels(active, item.pixels) for item in new]
            previews = await asyncio.to_thread(encode_previews, pixels, preview_px, str(active.job.id))
        events = []
        for item, preview in zip(new, previews, strict=True):
            seconds_a_step = (item.done_at - active.pipeline_started) / (item.step - active.resumed_from)
            eta_s = round(seconds_a_step * (params.steps - item.step), 3)
            events.append(Progress(step=item.step, total=params.steps, eta_s=eta_s, preview=preview))
        await self.emit(active, *events)

    @staticmethod
    async def _pixels(active: Claimed, pixels: Any) -> Any:
        """A step's pixels; those a preview decoder makes beside the pipeline, once it has."""
        if not isinstance(pixels, concurrent.futures.Future):
            return pixels
        try:
            return await asyncio.wrap_future(pixels)
        except Exception as exc:  # a preview is a nicety
            logger.warning("no preview: %s", exc, extra={"job_id": str(active.job.id)})
            return None

    async def _save(self, active: Claimed, snapshot: Snapshot) -> None:
        """Keep the job's state at this step (encoded off the pipeline thread), fenced by attempt."""
        job = active.job
        started = time.perf_counter()
        try:
            data = await asyncio.to_thread(checkpoints.encode, snapshot)
            kept = await self.checkpoints.save(
                str(job.id), attempt=job.attempt, step=snapshot.step, revision=self.revision, data=data
            )
        except Exception as exc:  # the job goes on; a retry resumes from an older one, or the start
            logger.warning("checkpoint not saved: %s", exc, extra={"job_id": str(job.id)})
            return
        if not kept:
            active.halt("lost")  # a newer attempt exists, or the job ended
            return
        active.checkpoint_step = snapshot.step
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        self.metrics.checkpoint_bytes.observe(len(data))
