"""Runs jobs: claim, generate on the pipeline thread, stream events, store, finish.

arq hands the runner every job it takes; each waits in line until the
dispatcher gives it the pipeline, alone or batched with compatible jobs
(:mod:`gpu_worker.batching`). The dispatcher claims a batch in Postgres and
starts it on the pipeline thread. A job alone (the usual case below
saturation) starts at once, with the params of its ticket from the queue, and
is claimed meanwhile: if the claim does not return it (canceled or expired in
the queue, held elsewhere), it stops at the next step. The next batch starts
the moment the thread is free: everything else a job needs (events, the lease,
previews, PNG encoding, upload, the terminal write) happens on the event loop
while the next batch runs, so the GPU does not wait for the control plane.

The pipeline thread does nothing but denoise: each step hands the step number
(and, when a preview is due, a copy of the latents) to the event loop, through
a :class:`~gpu_worker.mailbox.Mailbox` (steps that come faster than
``progress_interval_s`` go together, in one send). A
cancel, a lost lease, a time-out or a shutdown stops a job at once: it is
recorded and published without waiting for its batch-mates, and the pipeline
stops at the next step when no job in the batch still wants it.

Postgres writes are retried through a restart or failover (``db_retry_s``);
past that, the lease and the recovery pass take over. A worker shutting down
hands its job back to the queue: the next worker runs it again, and the
attempt does not count against ``max_attempts``. Jobs still waiting for the
pipeline are released unclaimed (:class:`Released`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from PIL import Image

from gpu_worker import batching
from gpu_worker.mailbox import Mailbox
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.pipeline import Generation, Pipeline, Request, preview_image, preview_pixels
from stepcast.background import cancel_and_wait
from stepcast.db import Completion, Database, retrying
from stepcast.events import Canceled, Completed, EventLog, Failed, Progress, Started, Terminal
from stepcast.jobs import Job, Status
from stepcast.lifecycle import Lifecycle, Speaker
from stepcast.params import JobParams
from stepcast.queue import Ticket
from stepcast.round_trips import Gatherer
from stepcast.settings import Settings
from stepcast.storage import Put, Storage, image_key

logger = logging.getLogger(__name__)

PNG = "image/png"
EARLY_CANCEL_S = 60.0  # how long a cancel for a job not (yet) running here is remembered

Outcome = Generation | Exception
T = TypeVar("T")


class Released(Exception):
    """The worker is shutting down before the job got the pipeline: it was never claimed."""


class Step(NamedTuple):
    """A step the pipeline thread reports: its preview's pixels if it has one, and when it ended."""

    step: int
    pixels: Any
    done_at: float  # perf_counter


@dataclass
class _Waiting:
    """A job arq handed over, not yet claimed: it waits for a place in a batch.

    Its params and preview settings come with it (its ticket). A job queued
    without a ticket has its params read only when it may share a batch (others
    wait beside it); alone, it goes straight to its claim, which returns its row.
    Its stop flag and steps go with it to the pipeline, which starts a job alone
    before its claim returns, and then to its :class:`_Active`.
    """

    job_id: uuid.UUID
    claimed: asyncio.Future[_Active | None]
    steps: Mailbox[Step]  # from the pipeline thread
    params: JobParams | None = None
    preview: dict[str, Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # read by the pipeline thread


@dataclass
class _Active:
    """A claimed job; shared with the dispatcher, the heartbeat and the cancel listener."""

    job: Job
    params: JobParams
    last_seq: int
    stop: threading.Event  # its _Waiting's
    steps: Mailbox[Step]  # its _Waiting's
    batch: list[_Active] = field(default_factory=list)
    outcome: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    pipeline_s: float | None = None
    # When its pipeline call began (perf_counter), which may be before its claim returned.
    pipeline_started: float = field(default_factory=time.perf_counter)
    step: int = 0
    stop_reason: str | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def halt(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()
        self.stopped.set()

    def batch_stops(self) -> bool:
        """Whether the pipeline stops at the next step: nobody in the batch still wants it."""
        return all(mate.stop.is_set() for mate in self.batch)


def _params(waiting: _Waiting) -> JobParams | None:
    return waiting.params


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_preview(pixels: Any, max_px: int) -> str:
    buffer = io.BytesIO()
    preview_image(pixels, max_px).save(buffer, format="WEBP", quality=60, method=0)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()


def encode_previews(steps: list[Step], max_px: int, job_id: str) -> list[str | None]:
    """The previews of the steps that carry pixels (None for the others, and for one that fails:
    a preview is a nicety, never a reason to stop the events)."""
    previews: list[str | None] = []
    for step in steps:
        preview = None
        if step.pixels is not None:
            try:
                preview = encode_preview(step.pixels, max_px)
            except Exception as exc:
                logger.warning("no preview: %s", exc, extra={"job_id": job_id})
        previews.append(preview)
    return previews


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
        *,
        executor: Executor,
        on_room: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.lifecycle = Lifecycle(db, events, db_retry_s=settings.db_retry_s)
        self.storage = storage
        self.pipeline = pipeline
        self.worker_id = worker_id
        self.metrics = metrics or WorkerMetrics()
        self.on_room = on_room
        self._executor = executor  # the pipeline's one thread; the runner shuts it down
        self._waiting: list[_Waiting] = []
        self._arrived = asyncio.Event()
        # By job and attempt: a job whose lease ran out here (Postgres away) may come back to
        # this worker as its next attempt while the old one is still stopping.
        self._active: dict[tuple[uuid.UUID, int], _Active] = {}
        # Cancels heard for jobs not running here: one whose claim is in flight stops as it returns.
        self._early_cancels: dict[uuid.UUID, float] = {}
        self._entered = 0  # jobs inside run()
        self._holding = 0  # of those, jobs not yet past the pipeline
        self._busy = False
        self._releasing = False
        self._dispatcher: asyncio.Task[None] | None = None
        # A batch's jobs finish at the same moment: one thread hop encodes and stores
        # their images, one statement records them all.
        self._stores: Gatherer[Put, None] = Gatherer(storage.put_all)
        self._completions: Gatherer[Completion, Job | None] = Gatherer(self._record)

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch())

    async def aclose(self) -> None:
        self.release_waiting()
        for active in self._active.values():
            active.halt("shutdown")
        if self._dispatcher is not None:
            await cancel_and_wait(self._dispatcher)
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def request_cancel(self, job_id: uuid.UUID) -> None:
        running = [active for (job, _), active in self._active.items() if job == job_id]
        for active in running:
            active.halt("canceled")
        if running:
            return
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

    def held(self) -> int:
        """Jobs this runner has and has not finished with the pipeline; arq counts the rest."""
        return self._holding

    def entered(self) -> int:
        return self._entered

    def wants(self) -> int:
        """How many jobs it should hold: one batch for the pipeline, and the next while it runs."""
        return self.settings.batch_size * (2 if self._busy else 1)

    async def _write(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await retrying(operation, what=what, deadline_s=self.settings.db_retry_s)

    async def run(self, job_id: uuid.UUID, ticket: Ticket | None = None) -> None:
        """One arq job: wait for the pipeline, run, finish. Raises :class:`Released` on shutdown."""
        self._entered += 1
        self._holding += 1
        holding = True

        def let_go() -> None:
            nonlocal holding
            if holding:
                holding = False
                self._holding -= 1
                self.on_room()

        try:
            if self._releasing:
                raise Released()
            loop = asyncio.get_running_loop()
            steps: Mailbox[Step] = Mailbox(loop, self.settings.progress_interval_s)
            waiting = _Waiting(job_id, loop.create_future(), steps)
            if ticket is not None:
                try:
                    waiting.params, waiting.preview = JobParams.from_json(ticket.params), ticket.preview
                except (TypeError, ValueError) as exc:  # the claim reads the row instead
                    logger.warning("unusable ticket: %s", exc, extra={"job_id": str(job_id)})
            self._waiting.append(waiting)
            self._arrived.set()
            try:
                active = await waiting.claimed
            except asyncio.CancelledError:  # arq gave up on it (shutdown): it never started
                if waiting in self._waiting:
                    self._waiting.remove(waiting)
                raise
            if active is None:
                return
            key = (active.job.id, active.job.attempt)
            self._active[key] = active
            try:
                await self._execute(active, let_go)
            finally:
                del self._active[key]
        finally:
            let_go()
            self._entered -= 1

    # The dispatcher: one batch on the pipeline thread at a time.

    async def _dispatch(self) -> None:
        while True:
            try:
                await self._dispatch_one()
            except asyncio.CancelledError:
                raise
            except Exception:
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
                    or batching.compatible_images(self._waiting, _params) >= size
                    or left <= 0
                ):
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
        elif size > 1 and len(self._waiting) > 1:
            await self._read_params()
        if not self._waiting:
            return
        if self._waiting[0].params is None:  # no ticket, alone or no batching: its claim reads its row
            batch = [self._waiting.pop(0)]
        else:
            batch = batching.take_batch(self._waiting, _params, size)
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
                waiting.params = JobParams.from_json(found[waiting.job_id])
            elif waiting in self._waiting:  # finished, canceled or held elsewhere
                self._waiting.remove(waiting)
                if not waiting.claimed.done():
                    waiting.claimed.set_result(None)

    async def _claim(self, batch: list[_Waiting]) -> list[_Active]:
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
                ),
            )
        except Exception as exc:
            for waiting in batch:
                if not waiting.claimed.done():
                    waiting.claimed.set_exception(exc)
            return []
        actives: list[_Active] = []
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
                params = waiting.params if waiting.params is not None else JobParams.from_json(job.params)
                # Its batch: the jobs of this claim, as the list fills.
                active = _Active(job, params, job.last_seq, waiting.stop, waiting.steps, batch=actives)
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

    async def _run_batch(self, batch: list[_Waiting], actives: list[_Active] | None = None) -> None:
        """Run the batch (its params known) on the pipeline thread: ``actives``, its jobs
        claimed; without them, a job alone, claimed while the pipeline starts (if the claim
        does not return it, it stops at the next step)."""
        loop = asyncio.get_running_loop()
        requests = []
        for waiting in batch:
            assert waiting.params is not None  # from its ticket, its row, or the claim of a job alone
            requests.append(Request(waiting.params, self._step_reporter(waiting), waiting.stop.is_set))
        self._busy = True
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
            self._busy = False
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

    def _step_reporter(self, waiting: _Waiting) -> Callable[[int, int, Any], None]:
        every = int(waiting.preview["every"]) if waiting.preview else 0
        steps = waiting.steps

        def on_step(step: int, total: int, latents: Any) -> None:
            # Pipeline thread: the preview's pixels (torch stays on this thread), then hand over.
            pixels = None
            if latents is not None and every and (step % every == 0 or step == total):
                try:
                    pixels = preview_pixels(latents)
                except Exception as exc:  # a preview is a nicety: never let it stop the job
                    logger.warning("no preview: %s", exc, extra={"job_id": str(waiting.job_id)})
            steps.post(Step(step, pixels, time.perf_counter()))

        return on_step

    # One job, from its claim to its terminal state.

    async def _execute(self, active: _Active, let_go: Callable[[], None]) -> None:
        job = active.job
        log = {"job_id": str(job.id), "attempt": job.attempt}
        logger.info("job started", extra=log)
        await self._emit(active, Started(attempt=job.attempt, worker=self.worker_id))
        publisher = asyncio.create_task(self._publish_progress(active))
        heartbeat = asyncio.create_task(self._heartbeat(active))
        outcome: Outcome | None = None
        shutting_down = False
        try:
            try:
                outcome = await asyncio.wait_for(self._outcome(active), self.settings.job_timeout_s)
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

    async def _outcome(self, active: _Active) -> Outcome | None:
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

    async def _publish_progress(self, active: _Active) -> None:
        params = active.params
        preview_px = (
            min(int(active.job.preview["max_px"]), max(params.width, params.height))
            if active.job.preview
            else 0
        )
        # Steps that came close together arrive together (the mailbox), and go out in one send.
        while (bunch := await active.steps.get()) is not None:
            new = []
            for item in bunch:
                if item.step > active.step:  # (a failed batch re-runs its jobs alone: only new steps)
                    active.step = item.step
                    new.append(item)
            if not new:
                continue
            self.metrics.steps.inc(len(new))
            previews: list[str | None] = [None] * len(new)
            if any(item.pixels is not None for item in new):
                previews = await asyncio.to_thread(encode_previews, new, preview_px, str(active.job.id))
            events = []
            for item, preview in zip(new, previews, strict=True):
                seconds_a_step = (item.done_at - active.pipeline_started) / item.step
                eta_s = round(seconds_a_step * (params.steps - item.step), 3)
                events.append(Progress(step=item.step, total=params.steps, eta_s=eta_s, preview=preview))
            await self._emit(active, *events)

    async def _heartbeat(self, active: _Active) -> None:
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
                )
            except Exception:
                logger.exception("heartbeat failed", extra={"job_id": str(job.id)})
                continue
            if cancel is None:
                active.halt("lost")
            elif cancel:
                active.halt("canceled")

    async def _complete(self, active: _Active, generation: Generation) -> None:
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

    async def _fail(self, active: _Active, code: str, message: str, *, seq: int | None = None) -> None:
        job = active.job

        async def write(seq: int) -> Job | None:
            return await self.db.runs.fail(job.id, job.attempt, code=code, message=message, seq=seq)

        await self._finish(active, Status.FAILED, write, Failed(code=code, message=message), seq=seq)

    async def _hand_back(self, active: _Active) -> None:
        job = active.job
        log = {"job_id": str(job.id), "attempt": job.attempt}
        back = await self.lifecycle.requeue(
            job,
            "worker_shutdown",
            lambda: self.db.runs.hand_back(job.id, job.attempt, last_seq=active.last_seq),
        )
        if back is None:
            # A cancel is pending, or the job moved on (its write is fenced), or Postgres never
            # answered: then the lease runs out and the recovery pass takes it back.
            current = await self._write("read back", lambda: self.db.jobs.get(job.id))
            if current is not None and current.attempt == job.attempt and current.cancel_requested:
                await self._cancel(active)
            return
        logger.info("job handed back to the queue (shutdown)", extra=log)
        self.metrics.jobs.labels("handed_back").inc()

    async def _cancel(self, active: _Active) -> None:
        job = active.job

        async def write(seq: int) -> Job | None:
            return await self.db.runs.cancel(job.id, job.attempt, step=active.step, seq=seq)

        await self._finish(active, Status.CANCELED, write, Canceled())

    async def _finish(
        self,
        active: _Active,
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

    async def _emit(self, active: _Active, *events: Started | Progress) -> None:
        job = active.job
        published = await self.lifecycle.emit_all(job.id, job.owner, events, Speaker.running(job))
        if published is not None:
            active.last_seq = published
