"""The worker's job runner: every job arq hands over goes through :meth:`JobRunner.run`.

It looks for the job's checkpoint (a retried job resumes from it), joins the dispatcher's
line (:mod:`gpu_worker.dispatch`), and once claimed runs to its terminal state
(:mod:`gpu_worker.execution`). The runner counts the jobs it holds, so that the
worker takes more from the queue only when there is room.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import Executor

from redis.exceptions import RedisError

from gpu_worker import checkpoints
from gpu_worker.checkpoints import Snapshot
from gpu_worker.claimed import Claimed, Step
from gpu_worker.dispatch import Dispatcher, Released
from gpu_worker.execution import Execution
from gpu_worker.mailbox import Mailbox
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.pipeline import Pipeline
from gpu_worker.progress import StepPublisher
from stepcast.checkpoints import Checkpoints
from stepcast.db import Database
from stepcast.db.presence import Presence
from stepcast.events import EventLog
from stepcast.lifecycle import Lifecycle
from stepcast.queue import Ticket
from stepcast.settings import WorkerSettings
from stepcast.storage import Storage

__all__ = ["JobRunner", "Released"]

logger = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self,
        settings: WorkerSettings,
        db: Database,
        events: EventLog,
        storage: Storage,
        pipeline: Pipeline,
        worker_id: str,
        metrics: WorkerMetrics | None = None,
        *,
        executor: Executor,
        on_room: Callable[[], None] = lambda: None,
        presence: Presence | None = None,
    ) -> None:
        self.settings = settings
        self.on_room = on_room
        self.revision = pipeline.revision
        self.resumable = pipeline.resumable
        metrics = metrics or WorkerMetrics()
        lifecycle = Lifecycle(db, events, db_retry_s=settings.db_retry_s)
        self.checkpoints = Checkpoints(events.redis, ttl_s=settings.event_ttl_s)

        def session() -> int | None:
            return presence.session if presence is not None else None

        self.dispatcher = Dispatcher(
            settings, db, pipeline, worker_id, metrics, executor=executor, on_room=on_room, session=session
        )
        self.execution = Execution(
            settings,
            db,
            lifecycle,
            storage,
            worker_id,
            metrics,
            steps=StepPublisher(lifecycle, self.checkpoints, pipeline.revision, metrics),
            session=session,
        )
        # By job and attempt: a job whose lease ran out here (Postgres away) may come back to
        # this worker as its next attempt while the old one is still stopping.
        self._active: dict[tuple[uuid.UUID, int], Claimed] = {}
        self._tickets_back: dict[str, Ticket] = {}  # jobs handed back: the ticket to queue them with
        self._entered = 0  # jobs inside run()
        self._holding = 0  # of those, jobs not yet past the pipeline

    def start(self) -> None:
        self.dispatcher.start()

    async def aclose(self) -> None:
        for active in self._active.values():
            active.halt("shutdown")
        await self.dispatcher.aclose()  # releases the waiting jobs first

    def request_cancel(self, job_id: uuid.UUID) -> None:
        running = [active for (job, _), active in self._active.items() if job == job_id]
        for active in running:
            active.halt("canceled")
        if not running:
            self.dispatcher.cancel_early(job_id)

    def release_waiting(self) -> None:
        """Shutting down: jobs that have not got the pipeline go back to the queue unclaimed."""
        self.dispatcher.release_waiting()

    def ticket_back(self, job_id: str) -> Ticket | None:
        """The ticket a job handed back on shutdown goes back to the queue with (it says the
        step its checkpoint holds); None for any other job."""
        return self._tickets_back.pop(job_id, None)

    def held(self) -> int:
        """Jobs this runner has and has not finished with the pipeline; arq counts the rest."""
        return self._holding

    def entered(self) -> int:
        return self._entered

    def wants(self) -> int:
        """How many jobs it should hold: one batch for the pipeline, and the next while it runs."""
        return self.settings.batch_size * (2 if self.dispatcher.busy else 1)

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
            steps: Mailbox[Step] = Mailbox(asyncio.get_running_loop(), self.settings.progress_interval_s)
            # Only a job an earlier attempt ran may have a checkpoint (its ticket says so; one
            # without a ticket is looked for): no round trip for the others.
            resume = None
            if ticket is None or ticket.resume_from:
                resume = await self._resume_point(job_id)
            waiting = self.dispatcher.wait_in_line(job_id, steps)
            waiting.resume = resume
            if ticket is not None:  # (one that could not be read is None: the claim reads the row)
                waiting.params, waiting.preview = ticket.params, ticket.preview
            try:
                active = await waiting.claimed
            except asyncio.CancelledError:  # arq gave up on it (shutdown): it never started
                self.dispatcher.leave(waiting)
                raise
            if active is None:
                return
            key = (active.job.id, active.job.attempt)
            self._active[key] = active
            try:
                await self.execution.execute(active, let_go)
            finally:
                del self._active[key]
                if active.handed_back is not None:
                    self._tickets_back[str(job_id)] = Ticket.of(active.handed_back)
        finally:
            let_go()
            self._entered -= 1

    async def _resume_point(self, job_id: uuid.UUID) -> Snapshot | None:
        """The job's newest checkpoint, if an earlier attempt left one this model can use."""
        log = {"job_id": str(job_id)}
        if not self.resumable:
            return None
        try:
            found = await self.checkpoints.load(str(job_id))  # (jobs taken together: one round trip)
        except RedisError as exc:
            logger.warning("could not read the checkpoint (%s): from the start", exc, extra=log)
            return None
        if found is None:
            return None
        if found.revision != self.revision:
            logger.warning("checkpoint of model revision %s: from the start", found.revision, extra=log)
            return None
        try:
            return await asyncio.to_thread(checkpoints.decode, found.data)
        except ValueError as exc:
            logger.warning("checkpoint unreadable (%s): from the start", exc, extra=log)
            return None
