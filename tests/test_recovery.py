"""Recovery with real processes: a SIGKILLed worker's job runs again, a job the
queue lost is enqueued again, and the attempt fence keeps one outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from stepcast.db import Database
from stepcast.events import EventLog
from stepcast.settings import Settings
from tests.conftest import StepcastProcess

FAST_RECOVERY = {"lease_s": 1.0, "heartbeat_s": 0.2, "recovery_interval_s": 0.2, "enqueue_grace_s": 0.3}
LONG_JOB = {"prompt": "a long night", "steps": 150, "width": 256, "height": 256}  # ~7 s here


async def events_of(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    redis = Redis.from_url(settings.redis_url)
    try:
        return await EventLog(redis, stream_max=1000, ttl_s=60).read(job_id)
    finally:
        await redis.aclose()


async def job_row(settings: Settings, job_id: str) -> Any:
    """The job's final row in Postgres, where the truth is."""
    db = await Database.connect(settings.database_url, max_size=1)
    try:
        return await db.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    finally:
        await db.close()


async def wait_for(
    client: httpx.AsyncClient, job_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 100  # a 7 s job, twice, on a loaded 2-core machine
    while time.monotonic() < deadline:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if done(job):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {job}")


async def kill_worker_mid_job(
    settings: Settings,
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    client: httpx.AsyncClient,
) -> str:
    worker = await spawn("gpu_worker.worker", settings)
    job_id: str = (await client.post("/v1/jobs", json=LONG_JOB)).json()["id"]
    await wait_for(client, job_id, lambda job: job["progress"]["step"] >= 5)
    worker.kill()  # SIGKILL: no goodbye, the lease just stops being renewed
    return job_id


@pytest.mark.parametrize("settings", [FAST_RECOVERY], indirect=True)
async def test_a_killed_workers_job_completes_on_another_exactly_once(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        job_id = await kill_worker_mid_job(settings, spawn, client)
        await run_worker(settings)  # the replacement
        job = await wait_for(client, job_id, lambda job: job["status"] in {"completed", "failed"})
    assert job["status"] == "completed" and job["attempt"] == 2, job
    assert sorted(p.name for p in (settings.storage_dir / job_id).iterdir()) == ["0.png"]  # one result
    events = await events_of(settings, job_id)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))  # continuous across the two attempts
    kinds = [e["type"] for e in events]
    assert kinds.count("requeued") == 1 and kinds[-1] == "completed"
    requeued = next(e for e in events if e["type"] == "requeued")
    assert requeued["attempt"] == 2 and requeued["reason"] == "lease_expired"
    assert [e["attempt"] for e in events if e["type"] == "started"] == [1, 2]
    assert job["last_seq"] == seqs[-1]
    row = await job_row(settings, job_id)
    assert (row["status"], row["attempt"], row["handoffs"], row["last_seq"]) == ("completed", 2, 0, seqs[-1])
    assert row["lease_expires_at"] is None and len(row["result"]["images"]) == 1


@pytest.mark.parametrize("settings", [{**FAST_RECOVERY, "max_attempts": 1}], indirect=True)
async def test_after_max_attempts_the_job_fails_saying_why(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        job_id = await kill_worker_mid_job(settings, spawn, client)
        job = await wait_for(client, job_id, lambda job: job["status"] != "processing")
    assert job["status"] == "failed" and job["attempt"] == 1
    assert job["error"]["code"] == "worker_lost" and "1 attempts" in job["error"]["message"]
    last = (await events_of(settings, job_id))[-1]
    assert last["type"] == "failed" and last["seq"] == job["last_seq"] and last["error"] == job["error"]
    row = await job_row(settings, job_id)
    assert (row["status"], row["error_code"], row["attempt"]) == ("failed", "worker_lost", 1)


@pytest.mark.parametrize("settings", [FAST_RECOVERY], indirect=True)
async def test_a_job_the_queue_lost_is_enqueued_again(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        job_id = (await client.post("/v1/jobs", json={"prompt": "p", "steps": 3})).json()["id"]
        redis = Redis.from_url(settings.redis_url)
        await redis.flushall()  # Redis restarted empty: the queue and the events are gone
        await redis.aclose()
        await run_worker(settings)
        job = await wait_for(client, job_id, lambda job: job["status"] == "completed")
    assert job["attempt"] == 1 and job["result"]["images"]
    row = await job_row(settings, job_id)
    assert (row["status"], row["attempt"]) == ("completed", 1)
