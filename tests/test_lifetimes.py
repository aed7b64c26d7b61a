"""Time limits: a job that waits too long in the queue expires, a run that takes
too long is stopped, and images are deleted after the retention period."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from stepcast import queue
from stepcast.db import Database
from stepcast.events import EventLog
from stepcast.recovery import Recovery
from stepcast.settings import Settings
from tests.conftest import Stack, assert_problem, eventually
from tests.test_recovery import LONG_JOB, events_of


# Recovery runs once at start-up, then not again during the test (interval 1 h).
@pytest.mark.parametrize("settings", [{"queue_ttl_s": 0.5, "recovery_interval_s": 3600}], indirect=True)
async def test_a_job_past_its_queue_ttl_never_starts_and_fails_expired(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    job_id = (await client.post("/v1/jobs", json={"prompt": "p", "steps": 3})).json()["id"]
    await asyncio.sleep(0.8)
    db = await Database.connect(settings.database_url, max_size=2)
    redis = queue.connect(settings.redis_url)
    events = EventLog(redis, stream_max=100, ttl_s=60)
    try:
        # A worker offered the job now refuses it: too late.
        assert (
            await db.claim(
                [uuid.UUID(job_id)], worker="w", lease_s=30, model_revision="r", token=uuid.uuid4()
            )
            == {}
        )
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "pending"
        assert await Recovery.from_settings(settings, db, events, redis).tick()
        row = await db.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    finally:
        await redis.aclose(close_connection_pool=True)
        await db.close()
    assert row["status"] == "failed" and row["attempt"] == 0 and row["started_at"] is None
    assert row["error_code"] == "expired" and "0.5 s" in row["error_message"]
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["error"] == {
        "code": "expired",
        "message": "the job waited in the queue longer than its 0.5 s limit",
    }
    assert job["timings"]["queue_s"] >= 0.5 and job["finished_at"]
    log = await events_of(settings, job_id)
    assert [e["type"] for e in log] == ["queued", "failed"]
    assert log[-1]["error"] == job["error"] and log[-1]["seq"] == job["last_seq"]


@pytest.mark.parametrize("settings", [{"job_timeout_s": 1.0}], indirect=True)
async def test_a_run_past_its_time_out_stops_and_fails(stack: Stack) -> None:
    slow = (await stack.submit(**LONG_JOB))["id"]
    quick = (await stack.submit(prompt="next", steps=3))["id"]
    job = await stack.wait(slow)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert "1 s time-out" in job["error"]["message"]
    assert job["timings"]["run_s"] < 5  # stopped at the next step, not run to the end
    steps = [e["step"] for e in await events_of(stack.settings, slow) if e["type"] == "progress"]
    assert 0 < steps[-1] < 150
    # The pipeline thread is free again: the next job runs at once.
    after = time.monotonic()
    assert (await stack.wait(quick, timeout_s=10))["status"] == "completed"
    assert time.monotonic() - after < 5


@pytest.mark.parametrize(
    "settings", [{"retention_days": 1 / 86400, "retention_interval_s": 0.2}], indirect=True
)
async def test_images_are_deleted_after_retention_and_answer_410(stack: Stack) -> None:
    job = await stack.wait((await stack.submit(steps=2))["id"])
    url = job["result"]["images"][0]["url"]
    path = stack.settings.storage_dir / f"{job['id']}/1/0.png"
    assert job["images_expired_at"] is None and path.exists()
    assert (await stack.client.get(url)).status_code == 200

    async def expired() -> dict[str, Any] | None:
        current: dict[str, Any] = (await stack.client.get(f"/v1/jobs/{job['id']}")).json()
        return current if current["images_expired_at"] else None

    later = await eventually(expired)
    assert not path.exists()
    assert later["status"] == "completed" and later["result"]["images"][0]["seed"] == job["params"]["seed"]
    gone = assert_problem(await stack.client.get(url), 410)
    assert "retention" in gone["detail"]
    row = await stack.db.pool.fetchrow("SELECT images_expired_at, finished_at FROM jobs")
    assert (row["images_expired_at"] - row["finished_at"]).total_seconds() >= 1


@pytest.mark.parametrize("settings", [{"retention_days": 0, "retention_interval_s": 0.1}], indirect=True)
async def test_retention_zero_keeps_images(stack: Stack) -> None:
    job = await stack.wait((await stack.submit(steps=2))["id"])
    await asyncio.sleep(0.5)
    current = (await stack.client.get(f"/v1/jobs/{job['id']}")).json()
    assert current["images_expired_at"] is None
    assert (await stack.client.get(job["result"]["images"][0]["url"])).status_code == 200
