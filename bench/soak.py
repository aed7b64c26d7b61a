"""Soak: many jobs through two workers while a worker is SIGKILLed every few seconds.

Runs its own Postgres, Redis, one server and 2 workers on the ``simulated``
backend (loopback only); submits the jobs over REST, kills a worker (in turn)
every ``--kill-every`` seconds and starts a new one, and waits until every job
is terminal or the deadline passes. Reports, from Postgres and the event log:

- completed / failed / lost (not terminal at the deadline: must be 0);
- re-runs (claims beyond the first: the price of the kills) and duplicate
  outcomes (jobs with more than one terminal event: must be 0);
- the extra latency recovery added to a re-run job: from its first `started`
  to the `started` of the attempt that finished (what the job would have saved
  had its first worker lived), p50/p99, stamped by a Redis subscriber here;
- submit -> finished latency p50/p99 of all jobs.

    python -m bench.soak --jobs 1000 --kill-every 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter, defaultdict
from typing import Any

import asyncpg
from redis.asyncio import Redis

from bench import stack
from stepcast.redis_keys import ALL_JOB_CHANNELS

STEPS = 20
STEP_S = 0.005  # 0.1 s of "GPU" per job
TERMINAL = ("completed", "failed", "canceled")


class Stamps:
    """Receive times of every published event, from a reference Redis subscriber."""

    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.started: dict[str, list[float]] = defaultdict(list)
        self.terminal: Counter[str] = Counter()

    async def run(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.psubscribe(ALL_JOB_CHANNELS)
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue
            event = json.loads(message["data"])
            if event["type"] == "started":
                self.started[event["job_id"]].append(time.monotonic())
            elif event["type"] in TERMINAL:
                self.terminal[event["job_id"]] += 1


async def kill_workers(running: stack.Running, every_s: float, stop: asyncio.Event) -> int:
    kills = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            await asyncio.to_thread(running.replace_worker, kills % len(running.workers))
            kills += 1
    return kills


async def soak(running: stack.Running, jobs: int, kill_every_s: float, deadline_s: float) -> dict[str, Any]:
    stamps = Stamps(running.redis_url)
    listener = asyncio.create_task(stamps.run())
    await asyncio.sleep(0.2)
    began = time.monotonic()
    ids = [job["id"] for job in await stack.submit_jobs(running.http_url, jobs, {"steps": STEPS}, "soak")]
    stop = asyncio.Event()
    killer = asyncio.create_task(kill_workers(running, kill_every_s, stop))
    db = await asyncpg.connect(running.database_url)
    try:
        while time.monotonic() - began < deadline_s:
            unfinished = await db.fetchval(
                "SELECT count(*) FROM jobs WHERE status IN ('pending', 'processing')"
            )
            if unfinished == 0:
                break
            await asyncio.sleep(0.5)
        wall_s = time.monotonic() - began
        stop.set()
        kills = await killer
        await asyncio.sleep(0.5)  # the last terminal events reach the subscriber
        rows = await db.fetch(
            "SELECT id::text, status, attempt, handoffs, error_code,"
            " extract(epoch FROM finished_at - created_at)::float8 AS e2e_s"
            " FROM jobs WHERE id = ANY($1::uuid[])",
            ids,
        )
    finally:
        await db.close()
        listener.cancel()
        await stamps.redis.aclose()
    by_id = {row["id"]: row for row in rows}
    statuses = Counter(row["status"] for row in rows)
    rerun = [row for row in rows if row["attempt"] > 1]
    extra_ms = [
        (stamps.started[job_id][-1] - stamps.started[job_id][0]) * 1000
        for job_id in (row["id"] for row in rerun)
        if len(stamps.started[job_id]) > 1
    ]
    e2e_ms = [row["e2e_s"] * 1000 for row in rows if row["e2e_s"] is not None]

    return {
        "jobs": jobs,
        "workers": len(running.workers),
        "kill_every_s": kill_every_s,
        "workers_killed": kills,
        "wall_s": round(wall_s, 1),
        "completed": statuses["completed"],
        "failed": dict(Counter(row["error_code"] for row in rows if row["status"] == "failed")),
        "lost": sum(1 for job_id in ids if by_id[job_id]["status"] not in TERMINAL),
        "jobs_rerun": len(rerun),
        "extra_runs": sum(row["attempt"] - 1 for row in rows if row["attempt"] > 1),
        "duplicate_outcomes": sum(1 for count in stamps.terminal.values() if count > 1),
        "terminal_events_seen": sum(stamps.terminal.values()),
        "recovery_extra_latency_ms": stack.summary(extra_ms, 1),
        "submit_to_finished_ms": stack.summary(e2e_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()
    env = {
        "STEPCAST_BACKEND": "simulated",
        "STEPCAST_SIMULATED_STEP_S": str(STEP_S),
        **stack.FAST_RECOVERY,
        "STEPCAST_MAX_QUEUE_DEPTH": str(args.jobs),
        "STEPCAST_MAX_JOBS_PER_OWNER": str(args.jobs),
    }
    with (
        stack.services("soak") as (postgres, redis),
        stack.stepcast("soak", postgres, redis, workers=2, env=env) as running,
    ):
        stack.warm_up(running.http_url, 4, {"steps": STEPS})
        result = asyncio.run(soak(running, args.jobs, args.kill_every, args.deadline))
    stack.write_result("soak", result)


if __name__ == "__main__":
    main()
