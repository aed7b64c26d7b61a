"""Time limits: a job that waits too long in the queue expires, a run that takes
too long is stopped, and images, then rows (finished jobs, webhook deliveries,
unused anonymous owners' secrets) are deleted after their retention periods."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from stepcast import queue
from stepcast.db import Database
from stepcast.events import EventLog
from stepcast.recovery import Recovery
from stepcast.retention import Pruned, Retention
from stepcast.settings import Settings
from stepcast.storage import open_storage
from tests.conftest import Stack, assert_problem, eventually
from tests.test_database import counted, insert, kept
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
            await db.runs.claim(
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


async def test_old_finished_rows_go_in_bounded_batches_recent_and_unfinished_ones_stay(
    settings: Settings,
) -> None:
    """Before: finished jobs, webhook deliveries and anonymous owners' secrets were kept forever."""
    db = await Database.connect(settings.database_url, max_size=2)
    stack_storage = contextlib.AsyncExitStack()
    day = "interval '1 day'"

    async def job(owner: str, status: str, days_ago: float, **columns: Any) -> uuid.UUID:
        job_id: uuid.UUID = (await insert(db, owner)).job.id
        if status != "pending":
            await db.pool.execute(
                f"""UPDATE jobs SET status = $2::job_status, finished_at = now() - $3 * {day},
                        error_code = CASE WHEN $2::job_status = 'failed' THEN 'pipeline_error' END,
                        result = $4, images_expired_at = $5
                    WHERE id = $1""",
                job_id, status, days_ago, columns.get("result"), columns.get("images_expired_at"),
            )  # fmt: skip
        return job_id

    async def delivery(job_id: uuid.UUID, status: str, days_ago: float) -> uuid.UUID:
        delivery_id: uuid.UUID = await db.pool.fetchval(
            f"""INSERT INTO webhook_deliveries (job_id, owner, event, url, status, created_at)
                VALUES ($1, 'o', $2, 'https://example.invalid/', $3, now() - $4 * {day}) RETURNING id""",
            job_id, f"{status}-{days_ago}", status, days_ago,
        )  # fmt: skip
        return delivery_id

    async def secret(owner: str, days_ago: float) -> None:
        await db.pool.execute(
            f"""INSERT INTO owner_secrets (owner, webhook_secret, created_at)
                VALUES ($1, 's', now() - $2 * {day})""",
            owner, days_ago,
        )  # fmt: skip

    async def status_counts() -> tuple[dict[str, int], dict[str, int]]:
        rows = await db.pool.fetch("SELECT key, sum(n) FROM job_counts WHERE kind = 'status' GROUP BY key")
        statuses = await db.pool.fetch("SELECT status::text, count(*) FROM jobs GROUP BY status")
        return {r[0]: r[1] for r in rows if r[1]}, {r[0]: r[1] for r in statuses}

    try:
        old = [
            await job("anon_kept", "failed", 40),
            await job("anon_kept", "canceled", 40),
            await job("bob", "completed", 40, result={"images": []}, images_expired_at=datetime.now(UTC)),
            await job("bob", "completed", 40, result={"images": []}),  # its images expire first, then it
        ]
        old_delivery_of_old_job = await delivery(old[0], "delivered", 40)
        stay = [
            await job("anon_kept", "completed", 1, result={"images": []}),  # recent
            await job("bob", "pending", 0),
            await job("bob", "failed", 29),
        ]
        await db.pool.execute(f"UPDATE jobs SET created_at = now() - 40 * {day} WHERE id = $1", stay[1])
        gone_deliveries = [await delivery(stay[0], "delivered", 8), await delivery(stay[0], "failed", 8)]
        kept_deliveries = [await delivery(stay[0], "pending", 8), await delivery(stay[2], "delivered", 6)]
        for owner, days_ago in (("anon_gone", 31), ("anon_kept", 31), ("anon_new", 29), ("alice", 31)):
            await secret(owner, days_ago)
        assert (await status_counts())[0] == (await status_counts())[1]

        retention = Retention(
            db,
            await stack_storage.enter_async_context(open_storage(settings)),
            retention_s=10 * 86400,
            interval_s=3600,
            job_retention_s=30 * 86400,
            webhook_retention_s=7 * 86400,
            session_s=30 * 86400,
            batch_rows=2,
            pass_rows=3,
        )
        first = await retention.tick()
        assert first == Pruned(images=1, jobs=3, deliveries=2, secrets=1)  # at most 3 of each
        second = await retention.tick()
        assert second == Pruned(jobs=1)  # where the first pass stopped
        assert await retention.tick() == Pruned()

        left = {row["id"] for row in await db.pool.fetch("SELECT id FROM jobs")}
        assert left == set(stay)
        deliveries = {row["id"] for row in await db.pool.fetch("SELECT id FROM webhook_deliveries")}
        assert deliveries == set(kept_deliveries)
        assert not deliveries & {old_delivery_of_old_job, *gone_deliveries}
        owners = {row["owner"] for row in await db.pool.fetch("SELECT owner FROM owner_secrets")}
        assert owners == {"anon_kept", "anon_new", "alice"}
        kept_statuses, counted_statuses = await status_counts()
        assert kept_statuses == counted_statuses == {"completed": 1, "pending": 1, "failed": 1}
        assert await kept(db) == await counted(db)
    finally:
        await stack_storage.aclose()
        await db.close()
