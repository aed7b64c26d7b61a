"""Recovery with real processes: a SIGKILLed worker's job runs again, a job the
queue lost is enqueued again, the attempt fence keeps one outcome, and no seq
is given twice when Redis loses its data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from stepcast import arq_bridge, queue
from stepcast.db import Database
from stepcast.events import EventLog
from stepcast.recovery import Recovery
from stepcast.redis_keys import checkpoint_key
from stepcast.settings import Settings
from tests.conftest import StepcastProcess, model_queue
from tests.test_realtime import recv, send, until

FAST_RECOVERY = {"lease_s": 1.0, "heartbeat_s": 0.2, "recovery_interval_s": 0.2, "enqueue_grace_s": 0.3}
# The lease as it is by default (30 s): only the worker's session can tell it died.
SESSION_RECOVERY = {**FAST_RECOVERY, "lease_s": 30.0, "checkpoint_every_s": 0.05}
LONG_JOB = {"prompt": "a long night", "steps": 150, "width": 256, "height": 256}  # ~7 s here


async def events_of(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    redis = Redis.from_url(settings.redis_url)
    try:
        return (await EventLog(redis, stream_max=1000, ttl_s=60).read(job_id)).events
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
    *,
    job: dict[str, Any] = LONG_JOB,
    at_step: int = 5,
) -> str:
    worker = await spawn("gpu_worker.worker", settings)
    job_id: str = (await client.post("/v1/jobs", json=job)).json()["id"]
    await wait_for(client, job_id, lambda job: job["progress"]["step"] >= at_step)
    worker.kill()  # SIGKILL: no goodbye; its session ends, its lease is not renewed
    return job_id


@pytest.mark.parametrize("settings", [SESSION_RECOVERY], indirect=True)
async def test_a_killed_workers_job_completes_on_another_exactly_once(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        job_id = await kill_worker_mid_job(settings, spawn, client, at_step=20)
        await run_worker(settings)  # the replacement
        job = await wait_for(client, job_id, lambda job: job["status"] in {"completed", "failed"})
        assert job["status"] == "completed" and job["attempt"] == 2, job
        # Its twin, never interrupted: the same seed paints the same PNG, bit for bit.
        twin_id = (await client.post("/v1/jobs", json={**LONG_JOB, "seed": job["params"]["seed"]})).json()[
            "id"
        ]
        twin = await wait_for(client, twin_id, lambda job: job["status"] in {"completed", "failed"})
        pngs = [(await client.get(j["result"]["images"][0]["url"])).content for j in (job, twin)]
    assert twin["attempt"] == 1 and pngs[0] == pngs[1]
    stored = settings.storage_dir / job_id
    assert [str(p.relative_to(stored)) for p in stored.rglob("*.png")] == ["2/0.png"]  # the second attempt's
    events = await events_of(settings, job_id)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))  # continuous across the two attempts
    kinds = [e["type"] for e in events]
    assert kinds.count("requeued") == 1 and kinds[-1] == "completed"
    requeued = next(e for e in events if e["type"] == "requeued")
    # Its session ended with it: taken back long before the 30 s lease, resumed where it was.
    assert requeued["attempt"] == 2 and requeued["reason"] == "worker_lost"
    resumed = requeued["resumed_from_step"]
    assert resumed >= 10
    started = [e for e in events if e["type"] == "started"]
    assert [(e["attempt"], e.get("resumed_from_step")) for e in started] == [(1, None), (2, resumed)]
    again = [e["step"] for e in events[events.index(started[1]) :] if e["type"] == "progress"]
    assert again == list(range(resumed + 1, LONG_JOB["steps"] + 1))
    assert job["last_seq"] == seqs[-1]
    row = await job_row(settings, job_id)
    assert (row["status"], row["attempt"], row["handoffs"], row["last_seq"]) == ("completed", 2, 0, seqs[-1])
    assert row["lease_expires_at"] is None and len(row["result"]["images"]) == 1
    assert (row["resumed_from_step"], job["resumed_from_step"]) == (resumed, resumed)
    async with Redis.from_url(settings.redis_url) as redis:
        assert not await redis.exists(checkpoint_key(job_id))  # gone with the terminal event


# The session says nothing (confirmed only after an hour): the lease is the fallback.
@pytest.mark.parametrize("settings", [{**FAST_RECOVERY, "session_confirm_s": 3600}], indirect=True)
async def test_without_the_session_the_lease_takes_the_job_back(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        job_id = await kill_worker_mid_job(settings, spawn, client)
        await run_worker(settings)
        job = await wait_for(client, job_id, lambda job: job["status"] in {"completed", "failed"})
    assert (job["status"], job["attempt"]) == ("completed", 2)
    requeued = [e for e in await events_of(settings, job_id) if e["type"] == "requeued"]
    assert [(e["attempt"], e["reason"]) for e in requeued] == [(2, "lease_expired")]


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


# Recovery runs once at start-up, then not again during the test (interval 1 h).
@pytest.mark.parametrize("settings", [{"recovery_interval_s": 3600, "enqueue_grace_s": 0}], indirect=True)
async def test_a_job_is_judged_lost_by_the_queues_own_membership(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    job_id = (await client.post("/v1/jobs", json={"prompt": "p", "steps": 3})).json()["id"]
    arq = queue.connect(settings.redis_url)
    db = await Database.connect(settings.database_url, max_size=2)
    try:
        await arq.zrem(model_queue(settings), job_id)  # the queue lost it; arq's job key is still there
        assert await arq.exists(arq_bridge.job_key(job_id))
        events = EventLog(arq, stream_max=100, ttl_s=60)
        assert await Recovery.from_settings(settings, db, events, arq).tick()
        assert await arq.zscore(model_queue(settings), job_id) is not None  # queued again
    finally:
        await db.close()
        await arq.aclose(close_connection_pool=True)


@pytest.mark.parametrize("settings", [{"recovery_interval_s": 3600, "enqueue_grace_s": 0}], indirect=True)
async def test_a_deep_queue_is_checked_a_page_a_pass_to_its_end_and_again(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Recovery, "HEAD_ROWS", 2)
    monkeypatch.setattr(Recovery, "SWEEP_ROWS", 3)
    ids = [(await client.post("/v1/jobs", json={"prompt": "p", "steps": 3})).json()["id"] for _ in range(7)]
    arq = queue.connect(settings.redis_url)
    db = await Database.connect(settings.database_url, max_size=2)
    try:
        await arq.zrem(model_queue(settings), *ids)  # the queue lost them all
        recovery = Recovery.from_settings(settings, db, EventLog(arq, stream_max=100, ttl_s=60), arq)
        held = []
        for lost in ([], ids[:2], ids[5:6], []):  # each pass, the queue loses some again
            if lost:
                await arq.zrem(model_queue(settings), *lost)
            assert await recovery.tick()
            scores = [await arq.zscore(model_queue(settings), job_id) for job_id in ids]
            held.append([score is not None for score in scores])
        # The head (2) every pass, and a page of the sweep (3) after it, from the head again
        # once past the last.
        assert held == [
            [True] * 5 + [False] * 2,
            [True] * 7,
            [True] * 5 + [False] + [True],  # lost again, behind the sweep: found next time round
            [True] * 7,
        ]
    finally:
        await db.close()
        await arq.aclose(close_connection_pool=True)


async def test_a_job_a_server_of_before_fair_shares_queued_gets_its_place(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    first, old = [
        (await client.post("/v1/jobs", json={"prompt": "p", "steps": 3})).json()["id"] for _ in range(2)
    ]
    arq = queue.connect(settings.redis_url)
    db = await Database.connect(settings.database_url, max_size=2)
    try:
        # As an older server inserts (no tag, no work) and enqueues (its time in ms, here late).
        await db.pool.execute(
            "UPDATE jobs SET fair_tag = NULL, fair_finish = NULL, fair_share = NULL, work = NULL,"
            " created_at = created_at - interval '1 minute' WHERE id = $1::uuid",  # (past the grace)
            old,
        )
        await arq.zadd(model_queue(settings), {old: 9e12}, xx=True)
        recovery = Recovery.from_settings(settings, db, EventLog(arq, stream_max=100, ttl_s=60), arq)
        assert await recovery.tick()
        row = await db.pool.fetchrow("SELECT fair_tag, fair_share, work FROM jobs WHERE id = $1::uuid", old)
        ahead = await db.pool.fetchval("SELECT fair_finish FROM jobs WHERE id = $1::uuid", first)
        # Behind its owner's unfinished job (the one ahead), in Postgres and in Redis alike.
        assert (row["fair_tag"], row["fair_share"], row["work"]) == (ahead, "anonymous", 64 * 64 * 3 / 1e6)
        assert await arq.zscore(model_queue(settings), old) == ahead
    finally:
        await db.close()
        await arq.aclose(close_connection_pool=True)


@pytest.mark.parametrize("settings", [FAST_RECOVERY], indirect=True)
async def test_a_seq_a_watcher_saw_is_never_reused_after_redis_lost_its_data(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    base_url = await serve(settings)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        job_id = (await client.post("/v1/jobs", json={"prompt": "p", "steps": 3})).json()["id"]
    [queued] = await events_of(settings, job_id)  # no worker yet: it waits, told its place
    redis = Redis.from_url(settings.redis_url)
    await redis.flushall()  # Redis restarted empty: the counter, the stream and the queue are gone
    await redis.aclose()
    async with websockets.connect(base_url.replace("http://", "ws://") + "/v1/ws") as ws:
        await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": queued["seq"]})
        snapshot = await recv(ws)  # a seq the server no longer knows: a snapshot, not silence
        assert snapshot["type"] == "snapshot" and snapshot["job"]["status"] == "pending"
        await run_worker(settings)
        rest = await until(ws, lambda message: message["type"] == "completed")
    # The first event of the new block is a jump: the feed re-syncs and may send a snapshot
    # again, which then stands for what it shows (started, say).
    events = [e for e in rest if e["type"] != "snapshot"]
    kinds = ["started", "progress", "progress", "progress", "completed"]
    assert [e["type"] for e in events] == kinds[-len(events) :] and events[-1]["type"] == "completed"
    if events[0]["type"] != "started":
        assert [m["job"]["attempt"] for m in rest if m["type"] == "snapshot"][-1] == 1
    assert all(e["seq"] > queued["seq"] for e in events)  # before: started took seq 1 again
    assert (await job_row(settings, job_id))["last_seq"] == events[-1]["seq"]
