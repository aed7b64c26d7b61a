"""The database layer on the real Postgres: a submit's one statement (admit,
insert, place) and the pool's connections, handed back without a reset."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from stepcast.db import Database

PARAMS = {"prompt": "a red fox", "steps": 20, "width": 64, "height": 64, "seed": 7,
          "num_images": 1, "guidance_scale": 7.5, "model": "tiny"}  # fmt: skip


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    db = await Database.connect(database_url, max_size=2)
    await db.migrate()
    yield db
    await db.close()


async def insert(db: Database, owner: str = "ann", **limits: Any) -> Any:
    return await db.insert_job(
        owner=owner, params=PARAMS, preview=None, queue="q", model_name="tiny", version="test",
        queue_ttl_s=0, **limits,
    )  # fmt: skip


async def test_a_submit_is_admitted_inserted_and_placed_at_once(db: Database) -> None:
    first, second = await insert(db, max_pending=2), await insert(db, owner="bob", max_pending=2)
    assert first.created and first.pending == 0 and first.unfinished == 0  # place 1
    assert second.created and second.pending == 1 and second.unfinished == 0  # place 2: bob's first
    assert first.mean_run_s is None and first.workers == 1  # nothing measured yet
    full = await insert(db, max_pending=2)
    assert full.job is None and not full.created and full.pending == 2 and full.unfinished == 1
    # The owner's limit counts processing jobs too; another owner is not held back by it.
    await db.pool.execute("UPDATE jobs SET status = 'processing' WHERE id = $1", first.job.id)
    assert (await insert(db, max_unfinished=1)).job is None
    assert (await insert(db, owner="cy", max_unfinished=1)).created
    assert await db.pool.fetchval("SELECT count(*) FROM jobs") == 3
    # What the ETA needs comes from recent completed jobs of the same shape.
    await db.pool.execute(
        "UPDATE jobs SET status = 'completed', worker = 'w1', run_s = 4.0, finished_at = now() WHERE id = $1",
        first.job.id,
    )
    placed = await insert(db)
    assert placed.mean_run_s == pytest.approx(4.0) and placed.workers == 1


async def test_a_key_used_before_gives_the_earlier_job(db: Database) -> None:
    first = await insert(db, idempotency_key="k", request_hash="h")
    again = await insert(db, idempotency_key="k", request_hash="h")
    assert first.created and not again.created and again.job.id == first.job.id
    assert (
        await insert(db, owner="bob", idempotency_key="k", request_hash="h")
    ).created  # keys are per owner


async def locks_held(db: Database) -> int:
    return int(
        await db.pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    )


async def test_a_singleton_lock_is_one_process_at_a_time_and_never_left_on_a_pooled_connection(
    db: Database, database_url: str
) -> None:
    other = await Database.connect(database_url, max_size=1)
    try:
        async with db.singleton("recovery") as held:
            assert held
            async with other.singleton("recovery") as also:
                assert not also
            assert await locks_held(other) == 1
        assert await locks_held(other) == 0
        with pytest.raises(RuntimeError):
            async with db.singleton("recovery") as held:
                assert held
                raise RuntimeError("the task failed")
        assert await locks_held(other) == 0
        async with other.singleton("recovery") as held:
            assert held
    finally:
        await other.close()
