"""Dispatch: the jobs arq hands over wait for the pipeline, are batched with compatible jobs,
claimed in Postgres, and run on the pipeline thread, one batch at a time.

A batch is claimed in one statement before it starts; a job alone starts at once with its
ticket's params while its claim is in flight, and stops at the next step if the claim does not
return it. On shutdown, waiting jobs are released unclaimed (:class:`Released`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gpu_worker import batching
from gpu_worker.checkpoints import Snapshot
from gpu_worker.claimed import Claimed, Outcome, Step
from gpu_worker.mailbox import Mailbox
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.pipeline import Generation, Pipeline, Request, StepCallback
from stepcast.background import cancel_and_wait, stop_if_cancelled
from stepcast.db import Database, retrying
from stepcast.jobs import Job
from stepcast.params import JobParams, Preview
from stepcast.settings import WorkerSettings

logger = logging.getLogger(__name__)

EARLY_CANCEL_S = 60.0  # how long a cancel for a job not (yet) running here is remembered

T = TypeVar("T")


class Released(Exception):
    """The worker is shutting down before the job got the pipeline: it was never claimed."""


@dataclass
class Waiting:
    """A job arq handed over, not yet claimed: it waits for a place in a batch.

    Its params and preview settings come with it (its ticket). A job queued
    without a ticket has its params read only when it may share a batch (others
    wait beside it); alone, it goes straight to its claim, which returns its row.
    Its stop flag and steps go with it to the pipeline, which starts a job alone
    before its claim returns, and then to its :class:`~gpu_worker.execution.Claimed`.
    """

    job_id: uuid.UUID
    claimed: asyncio.Future[Claimed | None]
    steps: Mailbox[Step]  # from the pipeline thread
    params: JobParams | None = None
    preview: Preview | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # read by the pipeline thread
    resume: Snapshot | None = None  # its newest checkpoint, from an earlier attempt


def _params(waiting: Waiting) -> JobParams | None:
    return waiting.params


def _batchable(waiting: Waiting) -> JobParams | None:
    """Its params, if it may join another job's batch: a resumed job runs alone."""
    return None if waiting.resume is not None else waiting.params


class Dispatcher:
    """The line of waiting jobs and the one task that feeds the pipeline thread from it."""

    def __init__(
        self,
        settings: WorkerSettings,
        db: Database,
        pipeline: Pipeline,
        worker_id: str,
        metrics: WorkerMetrics,
        *,
        executor: Executor,
        on_room: Callable[[], None],
        session: Callable[[], int | None],
    ) -> None:
        self.settings = settings
        self.session = session  # the worker's session number, for its claims
        self.db = db
        self.pipeline = pipeline
        self.worker_id = worker_id
        self.metrics = metrics
        self.on_room = on_room
        self._executor = executor  # the pipeline's one thread; the dispatcher shuts it down
        self._waiting: list[Waiting] = []
        self._arrived = asyncio.Event()
        # Cancels heard for jobs not running here: one whose claim is in flight stops as it returns.
        self._early_cancels: dict[uuid.UUID, float] = {}
        self.busy = False  # a batch is on the pipeline thread
        self._releasing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch())

    async def aclose(self) -> None:
        self.release_waiting()
        if self._task is not None:
            await cancel_and_wait(self._task)
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def stopped(self) -> bool:
        return self._task is not None and self._task.done()

    def wait_in_line(self, job_id: uuid.UUID, steps: Mailbox[Step]) -> Waiting:
        """A job arq handed over joins the line; its ``claimed`` future says whether it runs."""
        if self._releasing:
            raise Released()
        waiting = Waiting(job_id, asyncio.get_running_loop().create_future(), steps)
        self._waiting.append(waiting)
        self._arrived.set()
        return waiting

    def leave(self, waiting: Waiting) -> None:
        if waiting in self._waiting:
            self._waiting.remove(waiting)

    def cancel_early(self, job_id: uuid.UUID) -> None:
        """A cancel for a job not running here: remembered a while, in case its claim is in flight."""
        now = time.monotonic()
        if len(self._early_cancels) > 1000:
            self._early_cancels = {
                j: at for j, at in self._early_cancels.items() if now - at < EARLY_CANCEL_S
            }
        self._early_cancels[job_id] = now

    def release_waiting(self) -> None:
        """Shutting down: jobs that have not got the pipeline go back to the queue unclaimed."""
        self._releasing = True
        for waiting in self._waiting:
            if not waiting.claimed.done():
                waiting.claimed.set_exception(Released())
        self._waiting.clear()

    async def _write(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await retrying(operation, what=what, deadline_s=self.settings.db_retry_s)

    async def _dispatch(self) -> None:
        while True:
            try:
                await self._dispatch_one()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stop_if_cancelled(exc)
                logger.exception("dispatcher failed; going on")
                await asyncio.sleep(0.1)

    async def _dispatch_one(self) -> None:
        while not self._waiting or self._releasing:
            self._arrived.clear()
            await self._arrived.wait()
        size, window = self.settings.batch_size, self.settings.batch_wait_s
        if size > 1 and window > 0:
            deadline = time.monotonic() + window
            while True:
                await self._read_params()
                left = deadline - time.monotonic()
                if (
                    not self._waiting
                    or self._waiting[0].resume is not None
                    or batching.compatible_images(self._waiting, _batchable) >= size
                    or left <= 0
                ):
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._arrived.wait()
        elif size > 1 and len(self._waiting) > 1:
            await self._read_params()
        if not self._waiting:
            return
        head = self._waiting[0]
        if head.params is None or head.resume is not None:
            # No ticket, alone or no batching: its claim reads its row. Resumed: alone.
            batch = [self._waiting.pop(0)]
        else:
            batch = batching.take_batch(self._waiting, _batchable, size)
        if len(batch) == 1 and batch[0].params is not None:
            # A job alone, with its ticket: claimed while the pipeline starts. Not a batch: a
            # job canceled or expired in the queue would take a place in it until it ends.
            await self._run_batch(batch)
            return
        actives = await self._claim(batch)
        claimed = {id(active.stop): active for active in actives}  # (its waiting job's flag)
        runs = [waiting for waiting in batch if id(waiting.stop) in claimed]
        for waiting in runs:  # as its row has them (a job without a ticket learns them here)
            active = claimed[id(waiting.stop)]
            waiting.params, waiting.preview = active.params, active.job.preview
        if runs:
            await self._run_batch(runs, actives)

    async def _read_params(self) -> None:
        """Learn the params of the waiting jobs that may share a batch; drop those not pending any more."""
        unknown = [waiting for waiting in self._waiting if waiting.params is None]
        if not unknown:
            return
        found = await self._write(
            "read params", lambda: self.db.jobs.pending_params([w.job_id for w in unknown])
        )
        for waiting in unknown:
            if waiting.job_id in found:
                waiting.params = found[waiting.job_id]
            elif waiting in self._waiting:  # finished, canceled or held elsewhere
                self._waiting.remove(waiting)
                if not waiting.claimed.done():
                    waiting.claimed.set_result(None)

    async def _claim(self, batch: list[Waiting]) -> list[Claimed]:
        """Claim the batch's jobs in one statement; each waiting job learns whether it runs."""
        token = uuid.uuid4()  # the same for a retry: it finds the jobs a lost reply started
        try:
            jobs = await self._write(
                "claim",
                lambda: self.db.runs.claim(
                    [waiting.job_id for waiting in batch],
                    worker=self.worker_id,
                    lease_s=self.settings.lease_s,
                    model_revision=self.pipeline.revision,
                    token=token,
                    session=self.session(),
                ),
            )
        except Exception as exc:
            for waiting in batch:
                if not waiting.claimed.done():
                    waiting.claimed.set_exception(exc)
            return []
        actives: list[Claimed] = []
        for waiting in batch:
            job = jobs.pop(waiting.job_id, None)  # a job that waits here twice runs once
            if job is None:
                logger.info(
                    "job not claimable: finished, canceled or held elsewhere",
                    extra={"job_id": str(waiting.job_id)},
                )
            if waiting.claimed.done():  # its arq task was cancelled (shutdown) meanwhile
                if job is not None:
                    await self._hand_back_unstarted(job)
                continue
            active = None
            if job is not None:
                # The params it runs with: its ticket's (the same as its row's), or its row's.
                params = waiting.params if waiting.params is not None else job.params
                # Its batch: the jobs of this claim, as the list fills.
                resumed = waiting.resume.step if waiting.resume is not None else 0
                active = Claimed(
                    job,
                    params,
                    job.last_seq,
                    waiting.stop,
                    waiting.steps,
                    batch=actives,
                    resumed_from=resumed,
                )
                if self._early_cancels.pop(job.id, None) is not None:
                    active.halt("canceled")  # asked while its claim was in flight
            waiting.claimed.set_result(active)
            if active is not None:
                actives.append(active)
        return actives

    async def _hand_back_unstarted(self, job: Job) -> None:
        hand_back = functools.partial(self.db.runs.hand_back, job.id, job.attempt, last_seq=job.last_seq)
        try:
            await self._write("hand back", hand_back)
        except Exception:  # its lease runs out, and the recovery pass queues it again
            logger.exception("could not hand back a job claimed on stopping", extra={"job_id": str(job.id)})

    async def _run_batch(self, batch: list[Waiting], actives: list[Claimed] | None = None) -> None:
        """Run the batch (its params known) on the pipeline thread: ``actives``, its jobs
        claimed; without them, a job alone, claimed while the pipeline starts (if the claim
        does not return it, it stops at the next step)."""
        loop = asyncio.get_running_loop()
        requests = []
        for waiting in batch:
            assert waiting.params is not None  # from its ticket, its row, or the claim of a job alone
            reporter = self._step_reporter(waiting, waiting.params)
            requests.append(Request(waiting.params, reporter, waiting.stop.is_set, waiting.resume))
        self.busy = True
        self.metrics.busy.set(1)
        started = time.perf_counter()
        try:
            future = loop.run_in_executor(self._executor, batching.generate, self.pipeline, requests)
            self.on_room()  # the next batch may gather while this one runs
            try:
                if actives is None:
                    actives = await self._claim(batch)
                    claimed = {id(active.stop) for active in actives}
                    for waiting in batch:
                        if id(waiting.stop) not in claimed:
                            waiting.stop.set()
                for active in actives:  # (their batch: the list itself, from _claim)
                    active.pipeline_started = started
                outcomes: list[Outcome] = await asyncio.shield(future)
            except asyncio.CancelledError:
                # The runner is closing: its jobs were told to stop; hand them back.
                for waiting in batch:
                    waiting.stop.set()
                for active in actives or []:
                    if not active.outcome.done():
                        active.outcome.set_result(Generation([], interrupted=True))
                raise
            except Exception as exc:  # batching.generate returns errors; this is the executor failing
                outcomes = [exc] * len(requests)
        finally:
            elapsed = time.perf_counter() - started
            self.busy = False
            self.metrics.busy.set(0)
            self.metrics.pipeline_seconds.inc(elapsed)
            self.metrics.batch_images.observe(sum(request.params.num_images for request in requests))
        # Each active shares its waiting job's stop flag: matched by it, not by job id (the
        # same job may wait here twice, its old attempt and its next).
        ran = {id(active.stop): active for active in actives or []}
        for waiting, outcome in zip(batch, outcomes, strict=True):
            if (mine := ran.get(id(waiting.stop))) is not None and not mine.outcome.done():
                mine.pipeline_s = round(elapsed, 4)
                mine.outcome.set_result(outcome)

    def _step_reporter(self, waiting: Waiting, params: JobParams) -> StepCallback:
        every = waiting.preview.every if waiting.preview else 0
        max_px = waiting.preview.max_px if waiting.preview else 0
        checkpoint_s = self.settings.checkpoint_every_s if self.pipeline.resumable else 0  # (none resumes)
        steps = waiting.steps
        saved_at = time.perf_counter()
        stopped = False

        def on_step(step: int, total: int, latents: Any, state: Callable[[], Snapshot]) -> None:
            # Pipeline thread: the preview's pixels and the state (torch stays on this
            # thread), then hand over. The state goes every checkpoint_every_s.
            nonlocal saved_at, stopped
            if stopped:
                return
            now = time.perf_counter()
            if waiting.stop.is_set():
                # Its last step: kept, should it be handed back (shutdown) to resume elsewhere.
                stopped = True
                if checkpoint_s and step < total:
                    steps.post(Step(step, None, now, state(), quiet=True))
                return
            pixels = None
            if latents is not None and every and (step % every == 0 or step == total):
                try:
                    pixels = self.pipeline.preview_pixels(latents, params.width, params.height, max_px)
                except Exception as exc:  # a preview is a nicety: never let it stop the job
                    logger.warning("no preview: %s", exc, extra={"job_id": str(waiting.job_id)})
            snapshot = None
            if checkpoint_s and step < total and now - saved_at >= checkpoint_s:
                snapshot, saved_at = state(), now
            steps.post(Step(step, pixels, now, snapshot))

        return on_step
