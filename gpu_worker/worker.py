"""The arq worker: one process per GPU, the model loaded once in ``on_startup``.

arq only dispatches: results and cancels go through Postgres. :class:`GpuWorker` changes arq's
loop: a submit wakes it, it takes only the jobs its runner can use, it holds each job for one
lease at a time, and a Redis restart does not end it. Why: docs/design.md, "Inside the worker".

    python -m gpu_worker.worker          # or: stepcast worker
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import queue
import socket
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from signal import Signals
from typing import Any

import uvloop
from arq import func
from arq.connections import RedisSettings
from redis.exceptions import RedisError

from gpu_worker import allocator, devices, model_source
from gpu_worker.main_thread import MainThreadExecutor, forward_signals
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.pipeline import DiffusersPipeline, Pipeline, SimulatedPipeline
from gpu_worker.registration import Registration, card_of
from gpu_worker.runner import JobRunner, Released
from stepcast import event_plane, liveness, logs, schema
from stepcast import settings as settings_module
from stepcast.arq_bridge import ArqWorker, deserialize, serialize
from stepcast.background import cancel_and_wait, stop_if_cancelled
from stepcast.db import Database
from stepcast.db.presence import Presence
from stepcast.events import EventLog
from stepcast.models import queue_of
from stepcast.queue import TASK_NAME, Consumer, Taken, Ticket
from stepcast.recovery import Recovery
from stepcast.redis_keys import CANCEL_CHANNEL, wake_channel
from stepcast.retention import Retention
from stepcast.settings import WorkerSettings
from stepcast.storage import open_storage

logger = logging.getLogger(__name__)


REDIS_DOWN_PAUSE_S = 1.0


class GpuWorker(ArqWorker):
    """arq's worker, made to keep a GPU fed and to outlive a Redis restart."""

    def __init__(self, *args: Any, idle_poll_s: float, renew_s: float, **kwargs: Any) -> None:
        self.signal_handlers: dict[int, Callable[[], None]] = {}  # for the main thread to forward
        # arq's own poll loop does not pause; poll_once waits for a wake-up instead.
        super().__init__(*args, poll_delay=0, **kwargs)
        self.idle_poll_s = idle_poll_s
        self.renew_s = renew_s
        self.runner: JobRunner | None = None
        self.consumer: Consumer | None = None  # set on startup, once the pool exists
        self.presence: Presence | None = None  # set on startup: without its session, no job is taken
        self._wake = asyncio.Event()
        self.ready = asyncio.Event()  # started up: its model announced, its jobs to be taken
        self._letting_go: set[asyncio.Task[None]] = set()  # close waits for them before the pool

    def install_signal_handler(self, signum: Signals, handler: Callable[[Signals], None]) -> None:
        # Off the main thread (the pipeline has it) a loop cannot take signals:
        # the main thread forwards them (main_thread.forward_signals).
        if threading.current_thread() is threading.main_thread():
            super().install_signal_handler(signum, handler)
        else:
            self.signal_handlers[signum] = functools.partial(handler, signum)

    def wake(self) -> None:
        """Poll now (a submit's wake-up, a finished job, room in the runner)."""
        self._wake.set()

    async def poll_once(self) -> None:
        """arq's poll, but one round trip takes what the runner can use (:meth:`Consumer.take`)."""
        self._wake.clear()
        try:
            if self.taking_jobs:
                await self._take_jobs()
            await self.end_poll()
        except (RedisError, OSError) as exc:
            # arq would let this end the process. The running jobs go on (their
            # results go to Postgres); recovery enqueues what a wiped Redis forgot.
            logger.warning("queue unreachable (%s); polling again in %.0f s", exc, REDIS_DOWN_PAUSE_S)
            await asyncio.sleep(REDIS_DOWN_PAUSE_S)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.idle_poll_s):
                await self._wake.wait()

    def _room(self) -> int:
        """How many more jobs to take: the runner's wants, less the jobs taken and not yet through
        the pipeline (arq's tasks not yet in the runner included), within arq's ``max_jobs``."""
        in_hand = self.jobs_in_hand
        room = self.max_jobs - in_hand
        if self.runner is not None:
            runner = self.runner
            room = min(room, runner.wants() - (in_hand - runner.entered() + runner.held()))
        return room

    async def _take_jobs(self) -> None:
        room = self._room()
        if room <= 0 or self.consumer is None or (self.presence is not None and not self.presence.held):
            return
        for taken in await self.consumer.take(room):
            await self.start_job_task(taken.job_id, self.run_taken(taken))

    def job_task_ended(self) -> None:
        self.wake()

    async def renew_holds(self) -> None:
        """Keep the holds (arq's in-progress keys) on the jobs this worker has alive for one more lease."""
        while True:
            await asyncio.sleep(self.renew_s)
            held = self.held_job_ids()
            if not held or self.consumer is None:
                continue
            try:
                await self.consumer.renew(held)
            except (RedisError, OSError) as exc:
                logger.warning("could not renew the hold on queued jobs: %s", exc)

    async def run_taken(self, taken: Taken) -> None:
        """arq's run_job, lean: the job is its id and ticket (Postgres has the rest, and
        counts the attempts), so arq's transaction that reads and counts it is not needed;
        the job leaves the queue with its batch-mates (:meth:`Consumer.done`), or stays in
        its place for the next worker when this one lets it go (shutdown)."""
        assert self.consumer is not None
        job_id = taken.job_id
        try:
            await self.call_function(TASK_NAME, job_id, ticket=taken.ticket)
        except (Released, asyncio.CancelledError) as exc:
            # Shutting down: the runner never claimed it, or handed it back (with a ticket
            # that says where it resumes).
            self.count("retried")
            ticket = self.runner.ticket_back(job_id) if self.runner is not None else None
            await self._let_go(functools.partial(self.consumer.release, ticket=ticket), job_id)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        except Exception:
            logger.exception("job %s failed in the worker; Postgres decides what becomes of it", job_id)
            self.count("failed")
        else:
            self.count("complete")
        await self._let_go(self.consumer.done, job_id)

    async def _let_go(self, how: Callable[[str], Awaitable[None]], job_id: str) -> None:
        """``how(job_id)`` in a task of its own: a job task cancelled meanwhile (shutdown) does
        not stop it, and :meth:`close` waits for it before it closes the pool."""
        task = asyncio.create_task(self._letting(how, job_id))
        self._letting_go.add(task)
        task.add_done_callback(self._letting_go.discard)
        await asyncio.shield(task)

    @staticmethod
    async def _letting(how: Callable[[str], Awaitable[None]], job_id: str) -> None:
        try:
            await how(job_id)
        except (RedisError, OSError) as exc:
            # The hold lapses within a lease; a worker that takes the job then finds it
            # finished in Postgres and lets it go.
            logger.warning("could not let job %s go in the queue: %s", job_id, exc)

    async def before_pool_closes(self) -> None:
        """A job task cancelled before its function started leaves its job queued; its hold
        lapses within a lease and another worker takes it. The jobs being let go (a cancelled
        task may leave its release in flight) are let go before the pool closes."""
        await asyncio.gather(*self._letting_go, return_exceptions=True)

    def stopping(self) -> None:
        if self.runner is not None:
            self.runner.release_waiting()


async def run_job(ctx: dict[str, Any], job_id: str, *, ticket: Ticket | None = None) -> None:
    """Raises :class:`Released` if the worker shuts down before the job got the pipeline."""
    runner: JobRunner = ctx["runner"]
    await runner.run(uuid.UUID(job_id), ticket)


async def _listen(worker: GpuWorker, runner: JobRunner, ctx: dict[str, Any], queue_name: str) -> None:
    """Cancel requests and wake-ups arrive here at once; polls and heartbeats are the fallback."""
    wake = wake_channel(queue_name)
    pubsub = ctx["redis"].pubsub(ignore_subscribe_messages=True)
    while True:
        try:
            await pubsub.subscribe(CANCEL_CHANNEL, wake)
            async for message in pubsub.listen():
                if message["channel"].decode() == wake:
                    worker.wake()
                    continue
                with contextlib.suppress(ValueError):
                    runner.request_cancel(uuid.UUID(message["data"].decode()))
        except asyncio.CancelledError:
            await pubsub.aclose()
            raise
        except Exception as exc:
            stop_if_cancelled(exc)
            logger.exception("listener lost Redis; retrying")
            await asyncio.sleep(1)


def load_pipeline(settings: WorkerSettings) -> Pipeline:
    if settings.backend == "simulated":
        return SimulatedPipeline(settings.simulated_step_s, settings.model_name)
    placement = devices.choose(settings.device, settings.dtype)
    # One sentence for a person; a JSON reader finds the same in its "msg".
    logger.info("the model runs on %s in %s (%s)", placement.device, placement.dtype, placement.reason)
    source = model_source.parse(settings.model_dir)
    revision = None
    if isinstance(source, model_source.ModelId):
        snapshot = model_source.fetch(source)
        source, revision = snapshot.path, snapshot.revision
    else:
        from gpu_worker.tiny_model import TINY, ensure

        if settings.model_name in TINY:  # built here on first use: no weights to download
            ensure(source, shape=settings.model_name)
    pipeline = DiffusersPipeline.load(
        source,
        name=settings.model_name,
        device=placement.device,
        dtype=placement.dtype,
        channels_last=settings.channels_last,
        compile_unet=settings.torch_compile,
        revision=revision,
        preview_decoder=settings.preview_decoder,
    )
    allocator.release_free_memory()  # what loading staged (a GPU model's CPU copies) goes back
    return pipeline


def create_worker(
    settings: WorkerSettings,
    *,
    pipeline: Pipeline | None = None,
    executor: Executor | None = None,
    handle_signals: bool = True,
) -> GpuWorker:
    """An arq Worker wired to stepcast; pass ``pipeline`` to reuse one already loaded, and
    ``executor`` for the thread that runs it (default: a thread of the runner's own)."""
    if executor is None:
        executor = pipeline_thread()
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    queue_name = queue_of(settings.queue_name, settings.model_name)

    async def startup(ctx: dict[str, Any]) -> None:
        stack = contextlib.AsyncExitStack()
        ctx["stack"] = stack
        # Claims of a batch, each job's heartbeat and the finishing writes run at once.
        db = await Database.connect(settings.database_url, max_size=4 + 2 * settings.batch_size)
        stack.push_async_callback(db.close)
        await schema.wait_until_current(db.pool, settings.schema_wait_s)
        # Held while the worker lives: its end tells recovery at once (let go after the runner).
        presence = Presence(settings.database_url, worker_id, check_s=settings.session_check_s)
        await presence.hold()
        stack.push_async_callback(presence.close)
        worker.presence = presence
        storage = await stack.enter_async_context(open_storage(settings))
        if pipeline is not None:
            loaded = pipeline
        else:  # on the thread that will run it
            loaded = await asyncio.get_running_loop().run_in_executor(executor, load_pipeline, settings)
        event_redis = event_plane.connect(settings, ctx["redis"])
        stack.push_async_callback(event_plane.close, event_redis, ctx["redis"])
        events = EventLog(
            event_redis,
            stream_max=settings.event_stream_max,
            ttl_s=settings.event_ttl_s,
            finished_ttl_s=settings.event_finished_ttl_s,
            channels=event_plane.channels(settings),
        )
        metrics = WorkerMetrics()
        runner = JobRunner(
            settings,
            db,
            events,
            storage,
            loaded,
            worker_id,
            metrics,
            executor=executor,
            on_room=worker.wake,
            presence=presence,
        )
        stack.callback(metrics.serve(settings))
        stack.push_async_callback(runner.aclose)
        runner.start()
        ctx["runner"] = worker.runner = runner
        worker.consumer = Consumer(ctx["redis"], queue_name, lease_s=settings.lease_s)
        registration = Registration(
            db, worker_id, card_of(settings, loaded), presence, lease_s=settings.lease_s
        )
        await registration.announce()
        stack.push_async_callback(registration.withdraw)  # (after the renewals stop, below)
        background_tasks = [
            _listen(worker, runner, ctx, queue_name),
            registration.keep(),
            worker.renew_holds(),
            presence.keep(),
            Recovery.from_settings(settings, db, events, ctx["redis"]).run(),
            Retention.from_settings(settings, db, storage).run(),
        ]
        if settings.worker_alive_file is not None:
            background_tasks.append(liveness.keep_alive(settings.worker_alive_file, settings.heartbeat_s))
        for background in background_tasks:
            stack.push_async_callback(cancel_and_wait, asyncio.create_task(background))
        worker.ready.set()
        logger.info("worker ready", extra={"worker": worker_id, "queue": queue_name})

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "stack" in ctx:
            await ctx["stack"].aclose()

    worker = GpuWorker(
        functions=[
            # Postgres counts attempts (and fences them); a job may be offered
            # as often as it likes: a claim that is not due matches no row. A
            # job may wait for the batch before it, then run: twice the time-out.
            func(run_job, name=TASK_NAME, keep_result=0, timeout=2 * settings.job_timeout_s + 60)
        ],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=queue_name,
        on_startup=startup,
        on_shutdown=shutdown,
        # The runner decides how many it takes (_room); this bounds the
        # jobs still finishing (upload, terminal write) behind the pipeline.
        max_jobs=4 * settings.batch_size,
        keep_result=0,
        # SIGTERM: stop taking jobs, release the ones waiting for the pipeline,
        # let the running ones finish for the grace period, then cancel them:
        # the runner stops them at the next step and hands them back, and arq
        # leaves them queued for the next worker.
        job_completion_wait=math.ceil(settings.shutdown_grace_s),
        idle_poll_s=settings.poll_delay_s,
        renew_s=settings.heartbeat_s,
        handle_signals=handle_signals,
        log_results=False,
        # JSON, not arq's default pickle: Redis holds data, never code (stepcast.arq_bridge).
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    return worker


def pipeline_thread() -> Executor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")


def main() -> None:
    """The worker process: the pipeline on the main thread, the event loop on another."""
    allocator.keep_freed_memory()  # before the model allocates anything
    settings = settings_module.load_or_exit(WorkerSettings)
    logs.configure(settings.log_level, settings.log_format)
    logs.quiet_libraries()
    on_main = MainThreadExecutor()
    created: queue.SimpleQueue[GpuWorker | None] = queue.SimpleQueue()
    failed = threading.Event()

    def event_loop() -> None:
        try:
            # The event loop handles every step's events while the pipeline runs: the
            # faster it is, the less CPU the control plane takes from a CPU model.
            asyncio.set_event_loop(uvloop.new_event_loop())
            worker = create_worker(settings, executor=on_main)
            created.put(worker)
            worker.run()
        except BaseException:
            logger.exception("the worker stopped on an error")
            failed.set()
        finally:
            created.put(None)  # (if the worker never was)
            on_main.shutdown(wait=False)

    loop_thread = threading.Thread(target=event_loop, name="event-loop")
    loop_thread.start()
    if (worker := created.get()) is not None:
        forward_signals(worker.loop, worker.signal_handlers)
    on_main.serve()
    loop_thread.join()
    if failed.is_set():
        sys.exit(1)


if __name__ == "__main__":
    main()
