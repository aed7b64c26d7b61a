"""The arq worker: one process per GPU, the model loaded once in ``on_startup``.

arq is only the dispatcher here: results live in Postgres (arq keeps none, so a
re-enqueue with the same ``_job_id`` is never refused), one job runs at a time
(``max_jobs=1``: one pipeline, one GPU), and cancels travel through Postgres
and a Redis channel rather than arq's abort.

    python -m gpu_worker.worker          # or: arq gpu_worker.worker.WorkerSettings
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import uuid
from typing import Any

from arq import func
from arq.connections import RedisSettings
from arq.worker import Worker
from redis.exceptions import RedisError

from gpu_worker.metrics import WorkerMetrics
from gpu_worker.pipeline import DiffusersPipeline, Pipeline, SimulatedPipeline
from gpu_worker.runner import JobRunner
from stepcast import liveness, logs
from stepcast import settings as settings_module
from stepcast.db import Database
from stepcast.events import CANCEL_CHANNEL, EventLog
from stepcast.queue import TASK_NAME
from stepcast.recovery import Recovery
from stepcast.retention import Retention
from stepcast.settings import Settings
from stepcast.storage import open_storage
from stepcast.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


ARQ_TRIES = 1_000_000
REDIS_DOWN_PAUSE_S = 1.0


class ResilientWorker(Worker):
    """arq's worker, made to outlive a Redis restart.

    arq lets a Redis error in its poll loop end the process; here the loop
    logs it and polls again once Redis answers. The running job goes on
    meanwhile (its results go to Postgres), and the recovery pass enqueues
    again whatever a wiped Redis forgot.
    """

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            logger.warning("queue unreachable (%s); polling again in %.0f s", exc, REDIS_DOWN_PAUSE_S)
            await asyncio.sleep(REDIS_DOWN_PAUSE_S)


async def run_job(ctx: dict[str, Any], job_id: str) -> None:
    runner: JobRunner = ctx["runner"]
    await runner.run(uuid.UUID(job_id))


async def _listen_for_cancels(runner: JobRunner, ctx: dict[str, Any]) -> None:
    """Cancel requests arrive here at once; the heartbeat re-reads Postgres as a fallback."""
    pubsub = ctx["redis"].pubsub(ignore_subscribe_messages=True)
    while True:
        try:
            await pubsub.subscribe(CANCEL_CHANNEL)
            async for message in pubsub.listen():
                with contextlib.suppress(ValueError):
                    runner.request_cancel(uuid.UUID(message["data"].decode()))
        except asyncio.CancelledError:
            await pubsub.aclose()
            raise
        except Exception:
            logger.exception("cancel listener lost Redis; retrying")
            await asyncio.sleep(1)


def load_pipeline(settings: Settings) -> Pipeline:
    if settings.backend == "simulated":
        return SimulatedPipeline(settings.simulated_step_s, settings.model_name)
    if settings.model_name == "tiny":
        from gpu_worker.tiny_model import ensure

        ensure(settings.model_dir)
    return DiffusersPipeline.load(
        settings.model_dir, name=settings.model_name, device=settings.device, dtype=settings.dtype
    )


def create_worker(
    settings: Settings, *, pipeline: Pipeline | None = None, handle_signals: bool = True
) -> Worker:
    """An arq Worker wired to stepcast; pass ``pipeline`` to reuse one already loaded."""
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    async def startup(ctx: dict[str, Any]) -> None:
        stack = contextlib.AsyncExitStack()
        ctx["stack"] = stack
        db = await Database.connect(settings.database_url, max_size=4)
        stack.push_async_callback(db.close)
        await db.migrate()
        storage = await stack.enter_async_context(open_storage(settings))
        loaded = pipeline if pipeline is not None else await asyncio.to_thread(load_pipeline, settings)
        events = EventLog(ctx["redis"], stream_max=settings.event_stream_max, ttl_s=settings.event_ttl_s)
        metrics = WorkerMetrics()
        runner = JobRunner(settings, db, events, storage, loaded, worker_id, metrics)
        stack.callback(metrics.serve(settings))
        stack.callback(runner.close)
        ctx["runner"] = runner
        background_tasks = [
            _listen_for_cancels(runner, ctx),
            Recovery.from_settings(settings, db, events, ctx["redis"]).run(),
            Retention.from_settings(settings, db, storage).run(),
        ]
        if settings.worker_alive_file is not None:
            background_tasks.append(liveness.keep_alive(settings.worker_alive_file, settings.heartbeat_s))
        for background in background_tasks:
            stack.push_async_callback(cancel_and_wait, asyncio.create_task(background))
        logger.info("worker ready", extra={"worker": worker_id, "queue": settings.queue_name})

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "stack" in ctx:
            await ctx["stack"].aclose()

    return ResilientWorker(
        functions=[
            # Postgres counts attempts (and fences them); arq may offer a job as
            # often as it likes: a claim that is not due matches no row.
            func(
                run_job,
                name=TASK_NAME,
                keep_result=0,
                timeout=settings.job_timeout_s + 60,
                max_tries=ARQ_TRIES,
            )
        ],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=settings.queue_name,
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=1,
        keep_result=0,
        # SIGTERM: stop taking jobs, let the running one finish for the grace
        # period, then cancel it: the runner stops it at the next step and
        # hands it back, and arq leaves it queued for the next worker.
        job_completion_wait=math.ceil(settings.shutdown_grace_s),
        poll_delay=settings.poll_delay_s,
        handle_signals=handle_signals,
        log_results=False,
    )


def main() -> None:
    settings = settings_module.load_or_exit()
    logs.configure(settings.log_level)
    create_worker(settings).run()


if __name__ == "__main__":
    main()
