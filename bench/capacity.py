"""What one Postgres and one Redis carry: the inputs of the capacity model (docs/scaling.md).

Runs its own Postgres and Redis (loopback) and drives them with stepcast's own
queries and scripts, as many at once as ``--concurrency``:

- Postgres: submits/s (the one statement a submit makes: admission counts,
  the INSERT, what its queue position and ETA need) while the queue fills to
  its default limit, one job per statement, then in lists of 8, as a server
  sends the submits that reach it together (8 sockets at once in
  bench.controlplane); and whole job lifecycles/s (submit, claim, one
  heartbeat, complete: every write a job costs the database);
- Redis: step events/s through the event log (one script call: stream append
  with its cap and expiry, plus the pub/sub publish), Redis CPU per event, the
  server-side cost per call from ``INFO commandstats``, and the memory a job's
  stream of 22 events holds.

    python -m bench.capacity --seconds 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psutil  # type: ignore[import-untyped]
from redis.asyncio import Redis

from bench import stack
from stepcast import schema
from stepcast import settings as settings_module
from stepcast.db import Completion, Database, NewJob
from stepcast.events import Block, EventLog, Progress
from stepcast.params import JobParams
from stepcast.settings import Settings

PARAMS = JobParams(
    prompt="a red fox", negative_prompt=None, model="tiny", steps=20, width=64, height=64,
    guidance_scale=7.5, seed=1, num_images=1, scheduler=None,
)  # fmt: skip
PROGRESS = Progress(step=7, total=20, eta_s=0.123)
# A bench job has no row in Postgres: its counter gets one block big enough for any run.
BLOCK = Block(1, 2**40)
QUEUE_DEPTH = Settings.model_fields["max_queue_depth"].default
TOGETHER = 8  # submits a server sends in one statement when 8 sockets submit at once


async def flat_out(
    operation: Callable[[], Awaitable[Any]],
    concurrency: int,
    *,
    seconds: float = math.inf,
    count: float = math.inf,
) -> float:
    """Operations per second with ``concurrency`` loops running it back to back, for
    ``seconds`` or ``count`` operations, whichever ends first."""
    begun = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal begun
        while time.perf_counter() < stop and begun < count:
            begun += 1
            await operation()

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return begun / (time.perf_counter() - started)


async def postgres_figures(
    database_url: str, concurrency: int, seconds: float, owners: int
) -> dict[str, Any]:
    await schema.migrate(settings_module.load(database_url=database_url))
    db = await Database.connect(database_url, max_size=concurrency)
    turn = itertools.count()

    def owner() -> str:
        """The submits' owners take turns (one: every submit is one owner's, whose turns in the
        queue one at a time: docs/scheduling.md)."""
        return f"bench{next(turn) % owners}"

    async def submit() -> Any:
        insertion = await db.jobs.insert(
            owner=owner(), params=PARAMS, preview=None, queue="q", model_name="tiny", version="bench",
            queue_ttl_s=3600,
        )  # fmt: skip
        return insertion.job

    async def submit_together() -> None:
        jobs = [NewJob(owner(), PARAMS, "tiny") for _ in range(TOGETHER)]
        await db.jobs.insert_many(jobs, queue="q", version="bench", queue_ttl_s=3600)

    async def lifecycle() -> None:
        job = await submit()
        claimed = (
            await db.runs.claim([job.id], worker="bench", lease_s=30, model_revision="r", token=uuid.uuid4())
        )[job.id]
        await db.runs.heartbeat(job.id, claimed.attempt, lease_s=30, step=10, last_seq=12)
        await db.runs.complete([Completion(job.id, claimed.attempt, "bench", {"images": []}, 22, 0.1, 1)])

    try:
        # A submit reads the admission counts and the queue position (kept in
        # job_counts, so its cost should not grow with the queue): measured while
        # the queue fills from empty to the default limit (STEPCAST_MAX_QUEUE_DEPTH),
        # every connection open first; then the lifecycles, on an empty queue.
        await asyncio.gather(
            *(db.pool.fetchval("SELECT pg_sleep(0.1)") for _ in range(concurrency))
        )  # open them
        submits = await flat_out(submit, concurrency, seconds=seconds, count=QUEUE_DEPTH)
        await db.pool.execute("DELETE FROM jobs")
        lists = await flat_out(submit_together, concurrency, seconds=seconds, count=QUEUE_DEPTH / TOGETHER)
        await db.pool.execute("DELETE FROM jobs")
        lifecycles = await flat_out(lifecycle, concurrency, seconds=seconds)
    finally:
        await db.close()
    return {
        "submits_per_s": round(submits),
        f"submits_per_s_{TOGETHER}_per_statement": round(lists * TOGETHER),
        "submits_queue_depth": f"0 -> {QUEUE_DEPTH}",
        "job_lifecycles_per_s": round(lifecycles),
    }


async def redis_figures(redis_url: str, redis_pid: int, concurrency: int, seconds: float) -> dict[str, Any]:
    redis = Redis.from_url(redis_url)
    events = EventLog(redis, stream_max=1000, ttl_s=3600)
    jobs = [str(uuid.uuid4()) for _ in range(concurrency * 4)]
    turn = 0

    async def emit() -> None:
        nonlocal turn
        turn += 1
        job_id = jobs[turn % len(jobs)]
        await events.emit(job_id, "bench", PROGRESS, attempt=1, block=BLOCK)

    await emit()
    await redis.config_resetstat()
    server = psutil.Process(redis_pid)
    cpu_before = sum(server.cpu_times()[:2])
    rate = await flat_out(emit, concurrency, seconds=seconds)
    cpu_s = sum(server.cpu_times()[:2]) - cpu_before
    stats = await redis.info("commandstats")
    emitted = sum(v["calls"] for k, v in stats.items() if k in {"cmdstat_evalsha", "cmdstat_eval"})
    per_call = {
        k.removeprefix("cmdstat_"): v["usec_per_call"] for k, v in stats.items() if v["calls"] >= emitted
    }
    # Memory of one job's log: 22 events (queued, started, 20 progress) in its stream.
    job_id = str(uuid.uuid4())
    for _ in range(22):
        await events.emit(job_id, "bench", PROGRESS, attempt=1, block=BLOCK)
    memory = sum([await redis.memory_usage(key) or 0 for key in await redis.keys(f"*{job_id}*")])
    await redis.aclose()
    return {
        "step_events_per_s": round(rate),
        "redis_cpu_us_per_event": round(cpu_s / max(emitted, 1) * 1e6, 1),
        "redis_usec_per_call": per_call,
        "bytes_per_job_log_of_22_events": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--owners", type=int, default=1, help="the owners the submits take turns at")
    args = parser.parse_args()
    with stack.services("capacity") as (postgres, redis):
        postgres.create_database("capacity")
        assert redis.process is not None
        result = {
            "concurrency": args.concurrency,
            "owners": args.owners,
            "postgres": asyncio.run(
                postgres_figures(postgres.dsn("capacity"), args.concurrency, args.seconds, args.owners)
            ),
            "redis": asyncio.run(
                redis_figures(redis.url(), redis.process.pid, args.concurrency, args.seconds)
            ),
        }
    stack.write_result("capacity", result)


if __name__ == "__main__":
    main()
