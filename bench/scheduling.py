"""Scheduling people can feel, measured: fair shares, priority classes, honest start times.

Everything on loopback: one Postgres, one Redis, one server, ``--workers`` worker processes on
the ``simulated`` backend (``--step-s`` a step, ``--steps`` steps: a job-time of their product),
``auth: keys`` with one key per owner. Four phases on one stack:

1. fair share: owner A (class batch) submits ``--backlog`` jobs; once its first has started,
   owner B (class batch) submits one. Reported: B's wait from submit to start, in job-times
   (goal: about one; first in, first out would be A's backlog over the workers), and how
   long the workers sat idle between A's jobs while only A had work (goal: none waits);
2. priority: with A's backlog still waiting, owner C (class interactive) submits ``--burst``
   jobs at once: each one's wait in job-times (goal: each starts at the next free worker);
3. honest start times: owner D submits ``--eta-jobs`` jobs at once after A's backlog is gone:
   each job's ``estimated_start_at`` (its submit's answer) against its ``started_at``;
4. batching: the run again with ``--batch-size`` 4 (phase 1 only): how many pipeline calls
   held jobs of two owners (goal: some: fairness leaves batching be).

    python -m bench.scheduling --backlog 500 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

import asyncpg
import httpx

from bench import stack

JOB = {"width": 64, "height": 64}


def make_key(database_url: str, owner: str, priority_class: str) -> dict[str, str]:
    """Bearer headers of a key `stepcast keys create` makes for ``owner``."""
    env = {**os.environ, "STEPCAST_DATABASE_URL": database_url}
    command = [
        sys.executable,
        "-m",
        "stepcast.cli",
        "keys",
        "create",
        "--owner",
        owner,
        "--class",
        priority_class,
    ]
    made = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=stack.ROOT)
    fields = dict(line.split(maxsplit=1) for line in made.stdout.splitlines() if line.strip())
    key = fields["key"]  # (not "key id")
    return {"Authorization": f"Bearer {key}"}


async def submit(
    client: httpx.AsyncClient, headers: dict[str, str], count: int, steps: int
) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for start in range(0, count, 50):
        posts = [
            client.post("/v1/jobs", json={"prompt": f"fox {i}", "steps": steps, **JOB}, headers=headers)
            for i in range(start, min(count, start + 50))
        ]
        for response in await asyncio.gather(*posts):
            response.raise_for_status()
            jobs.append(response.json())
    return jobs


async def rows(pool: asyncpg.Pool, owner: str) -> list[asyncpg.Record]:
    found: list[asyncpg.Record] = await pool.fetch(
        "SELECT id::text, owner, worker, created_at, started_at, finished_at, batch_size FROM jobs"
        " WHERE owner = $1 ORDER BY started_at NULLS LAST",
        owner,
    )
    return found


async def _pending(pool: asyncpg.Pool, owner: str) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM jobs WHERE owner = $1 AND status = 'pending'", owner)
    )


async def wait_until(probe: Any, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise TimeoutError("the stack did not get there in time")
        await asyncio.sleep(0.05)


def idle_gaps(jobs: list[asyncpg.Record], until: datetime) -> list[float]:
    """Per worker, the seconds between a job's finish and its next start (up to ``until``)."""
    by_worker: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for job in jobs:
        if job["started_at"] is not None and job["finished_at"] is not None and job["started_at"] < until:
            by_worker[job["worker"]].append(job)
    gaps = []
    for done in by_worker.values():
        done.sort(key=lambda job: job["started_at"])
        batches = sorted({(job["started_at"], job["finished_at"]) for job in done})
        gaps += [(after[0] - before[1]).total_seconds() for before, after in itertools.pairwise(batches)]
    return [max(0.0, gap) for gap in gaps]


async def phases(running: stack.Running, args: argparse.Namespace, *, batching_only: bool) -> dict[str, Any]:
    job_s = args.steps * args.step_s
    keys = {
        owner: make_key(running.database_url, owner, priority_class)
        for owner, priority_class in [("a", "batch"), ("b", "batch"), ("c", "interactive"), ("d", "batch")]
    }
    pool = await asyncpg.create_pool(running.database_url, min_size=1, max_size=2)
    result: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=60) as client:
            await submit(client, keys["d"], 2 * args.workers, args.steps)  # warm: the pace is measured
            await wait_until(lambda: _all_done(pool, "d"))
            await asyncio.sleep(1.5)  # the server's pace reading (queue_update_s) renews
            backlog = await submit(client, keys["a"], args.backlog, args.steps)
            await wait_until(lambda: _started(pool, backlog[0]["id"]))
            await asyncio.sleep(3 * job_s)  # A alone for a while
            waiting = await _pending(pool, "a")
            [b_job] = await submit(client, keys["b"], 1, args.steps)
            await wait_until(lambda: _started(pool, b_job["id"]))
            b = (await rows(pool, "b"))[0]
            b_wait_s = (b["started_at"] - b["created_at"]).total_seconds()
            a_rows = await rows(pool, "a")
            gaps = idle_gaps(a_rows, b["created_at"])
            result["fair_share"] = {
                "a_waiting_when_b_came": waiting,
                "b_position_at_submit": b_job["queue_position"],
                "b_wait_s": round(b_wait_s, 3),
                "b_wait_job_times": round(b_wait_s / job_s, 2),
                "fifo_wait_job_times": round(waiting / args.workers, 1),
                "a_alone_gaps_measured": len(gaps),
                "a_alone_idle_gap_s": stack.summary(gaps, 3),
                "a_alone_idle_gap_max_s": round(max(gaps), 3) if gaps else None,
            }
            mixed, batches = _mixed_batches([*a_rows, b])
            result["batches"] = {"calls": batches, "with_two_owners": mixed}
            if batching_only:
                return result
            burst = await submit(client, keys["c"], args.burst, args.steps)
            for job in burst:
                await wait_until(lambda job=job: _started(pool, job["id"]))
            c_rows = await rows(pool, "c")
            waits = [(row["started_at"] - row["created_at"]).total_seconds() for row in c_rows]
            result["priority"] = {
                "burst": args.burst,
                "wait_job_times": [round(wait / job_s, 2) for wait in sorted(waits)],
                "a_waiting_meanwhile": await _pending(pool, "a"),
            }
            await wait_until(lambda: _all_done(pool, "a"), timeout_s=args.backlog * job_s * 2 + 120)
            await asyncio.sleep(1.5)
            eta_jobs = await submit(client, keys["d"], args.eta_jobs, args.steps)
            await wait_until(lambda: _all_done(pool, "d"))
            started = {row["id"]: row["started_at"] for row in await rows(pool, "d")}
            errors, relative = [], []
            for job in eta_jobs:
                estimate = datetime.fromisoformat(job["estimated_start_at"])
                wait_s = (estimate - datetime.fromisoformat(job["created_at"])).total_seconds()
                error_s = (started[job["id"]] - estimate).total_seconds()
                errors.append(abs(error_s))
                if wait_s > 5 * job_s:  # (a few jobs ahead: a tenth of a second is not 50 %)
                    relative.append(abs(error_s) / wait_s)
            result["estimates"] = {
                "jobs": args.eta_jobs,
                "last_wait_s": round(
                    (
                        started[eta_jobs[-1]["id"]] - datetime.fromisoformat(eta_jobs[-1]["created_at"])
                    ).total_seconds(),
                    2,
                ),
                "abs_error_s": stack.summary(errors, 3),
                "relative_error_past_5_jobs": stack.summary(relative, 3),
            }
    finally:
        await pool.close()
    return result


async def _started(pool: asyncpg.Pool, job_id: str) -> bool:
    return bool(await pool.fetchval("SELECT started_at IS NOT NULL FROM jobs WHERE id = $1::uuid", job_id))


async def _all_done(pool: asyncpg.Pool, owner: str) -> bool:
    return not await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE owner = $1 AND status IN ('pending', 'processing')", owner
    )


def _mixed_batches(jobs: list[asyncpg.Record]) -> tuple[int, int]:
    """Pipeline calls (a worker's jobs claimed together: one statement, one started_at) that
    held two owners' jobs, of all."""
    calls: dict[tuple[str, datetime], set[str]] = defaultdict(set)
    for job in jobs:
        if job["started_at"] is not None:
            calls[(job["worker"], job["started_at"])].add(job["owner"])
    return sum(1 for owners in calls.values() if len(owners) > 1), len(calls)


def run(args: argparse.Namespace, batch_size: int, *, batching_only: bool) -> dict[str, Any]:
    env = {
        "STEPCAST_AUTH": "keys",
        "STEPCAST_BACKEND": "simulated",
        "STEPCAST_SIMULATED_STEP_S": str(args.step_s),
        "STEPCAST_BATCH_SIZE": str(batch_size),
        "STEPCAST_MAX_JOBS_PER_OWNER": str(args.backlog + 10),
        "STEPCAST_MAX_QUEUE_DEPTH": str(args.backlog * 2),
        "STEPCAST_QUEUE_TTL_S": "0",
    }
    with (
        stack.services("scheduling") as (postgres, redis),
        stack.stepcast("scheduling", postgres, redis, workers=args.workers, env=env) as running,
    ):
        return asyncio.run(phases(running, args, batching_only=batching_only))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-s", type=float, default=0.02)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--eta-jobs", type=int, default=30)
    args = parser.parse_args()
    result = {
        "workers": args.workers,
        "job_s": round(args.steps * args.step_s, 3),
        "batch_size_1": run(args, 1, batching_only=False),
        "batch_size_4": run(args, 4, batching_only=True),
    }
    stack.write_result("scheduling", result)


if __name__ == "__main__":
    main()
