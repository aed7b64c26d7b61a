"""Fault injection with real processes: Redis restarted with its data wiped, and
Postgres restarted, while jobs wait and run. Every job must still reach its
terminal state exactly once; each test checks the final row of every job.

The server and the worker are child processes, Redis and Postgres private
servers of the test so they can be killed. The worker runs the `simulated`
backend: these tests are about the control plane surviving its stores, and a
predictable 2 s job makes the timing of the fault certain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from stepcast.cli.processes import LocalPostgres, LocalRedis
from stepcast.db import Database
from stepcast.settings import Settings
from tests.conftest import StepcastProcess

JOB = {"prompt": "a fox under stress", "steps": 20}
SIMULATED = {"backend": "simulated", "simulated_step_s": 0.1}  # 2 s a job
JOBS = 4

Spawn = Callable[[str, Settings], Awaitable[StepcastProcess]]


async def get(client: httpx.AsyncClient, job_id: str) -> dict[str, Any] | None:
    """The job, or None while the server answers 503 (a store is restarting)."""
    try:
        response = await client.get(f"/v1/jobs/{job_id}")
    except httpx.TransportError:
        return None
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def until(client: httpx.AsyncClient, job_id: str, done: Callable[[dict[str, Any]], bool]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        job = await get(client, job_id)
        if job is not None and done(job):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {await get(client, job_id)}")


async def final_rows(database_url: str) -> list[Any]:
    db = await Database.connect(database_url, max_size=1)
    try:
        return list(await db.pool.fetch("SELECT * FROM jobs ORDER BY created_at"))
    finally:
        await db.close()


async def run_through_fault(
    settings: Settings, spawn: Spawn, fault: Callable[[], Awaitable[None]]
) -> list[str]:
    """Server and worker up, JOBS jobs submitted, the fault injected while the
    first one runs; returns the job ids once every job is terminal."""
    server = await spawn("server.app", settings)
    await spawn("gpu_worker.worker", settings)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        ids = [(await client.post("/v1/jobs", json=JOB)).json()["id"] for _ in range(JOBS)]
        await until(client, ids[0], lambda job: job["progress"]["step"] >= 3)
        await fault()
        for job_id in ids:
            await until(client, job_id, lambda job: job["status"] in {"completed", "failed", "canceled"})
    return ids


async def test_redis_restarted_empty_loses_no_job(
    make_settings: Callable[..., Settings], own_redis: LocalRedis, spawn: Spawn
) -> None:
    settings = make_settings(
        redis_url=own_redis.url(), recovery_interval_s=0.3, enqueue_grace_s=0.5, **SIMULATED
    )

    async def wipe_redis() -> None:
        assert own_redis.process is not None
        own_redis.process.kill()  # SIGKILL, no persistence: it comes back empty
        await asyncio.to_thread(own_redis.process.wait)
        # Longer than redis-py and arq retry a command: the idle worker polls
        # into a dead Redis, and must live through it.
        await asyncio.sleep(8)
        await asyncio.to_thread(own_redis.start)

    ids = await run_through_fault(settings, spawn, wipe_redis)
    rows = await final_rows(settings.database_url)
    assert [str(row["id"]) for row in rows] == ids
    for row in rows:
        # The running job finished on its worker; the queue's forgotten jobs
        # were enqueued again from Postgres; none ran twice.
        assert (row["status"], row["attempt"], row["handoffs"]) == ("completed", 1, 0), dict(row)
        assert len(row["result"]["images"]) == 1 and row["lease_expires_at"] is None
        assert (settings.storage_dir / f"{row['id']}/1/0.png").exists()


async def test_postgres_restart_while_jobs_run_loses_nothing(
    make_settings: Callable[..., Settings], own_postgres: tuple[LocalPostgres, str], spawn: Spawn
) -> None:
    postgres, database_url = own_postgres
    settings = make_settings(database_url=database_url, **SIMULATED)

    async def restart_postgres() -> None:
        await asyncio.to_thread(postgres.stop)  # fast shutdown: every connection is cut
        await asyncio.sleep(2)  # the running job ends while Postgres is down
        await asyncio.to_thread(postgres.start)

    ids = await run_through_fault(settings, spawn, restart_postgres)
    rows = await final_rows(database_url)
    assert [str(row["id"]) for row in rows] == ids
    for row in rows:
        # The worker retried its writes: every job completed on its first attempt.
        assert (row["status"], row["attempt"]) == ("completed", 1), dict(row)
        assert row["progress_step"] == 20 and len(row["result"]["images"]) == 1
        assert row["last_seq"] >= 23  # queued, started, 20 progress, completed
