"""Versioned migrations (stepcast.schema): applied once, by `stepcast migrate`, and
only checked when a server or worker starts.

A start reads ``schema_migrations`` and takes no lock on a busy table, so one
during a long read leaves submits alone; a migration that needs a table in use
gives way after ``migrate_lock_timeout_s`` and tries again, rather than queueing
every query behind its lock request.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from gpu_worker.pipeline import Pipeline
from gpu_worker.worker import create_worker
from stepcast import schema
from stepcast import settings as settings_module
from stepcast.cli.main import _database
from stepcast.cli.processes import LocalPostgres, free_port
from stepcast.db import Database
from stepcast.errors import SchemaError
from stepcast.schema import Migration, load
from stepcast.settings import Settings
from tests.conftest import ROOT, StepcastProcess, fox_params, settings_env

BASELINE = "0001_pre_baseline"
SHIPPED = [migration.name for migration in schema.load()]  # the baseline first
# A later version's steps, to apply after the baseline: a column added, then a comment on it.
ADD_NOTE = Migration(9001, "pre", "9001_pre_add_note", "ALTER TABLE jobs ADD COLUMN note text")
PARAMS = fox_params(prompt="x", steps=2)
NOTE_ADDED = Migration(9001, "post", "9001_post_note_added", "COMMENT ON COLUMN jobs.note IS 'a test column'")


@pytest.fixture
async def empty_database_url(postgres: LocalPostgres) -> AsyncIterator[str]:
    """A database with no schema at all (not cloned from the migrated template)."""
    name = f"empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        yield postgres.dsn(name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def shape(database_url: str) -> dict[str, set[tuple[Any, ...]]]:
    """What the schema holds: columns, constraints, indexes, triggers, functions."""
    conn = await asyncpg.connect(database_url)
    try:
        queries = {
            "columns": """SELECT table_name, column_name, data_type, column_default, is_nullable
                          FROM information_schema.columns WHERE table_schema = 'public'""",
            "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                              FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
            "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
            "triggers": "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal",
            "functions": """SELECT proname, md5(prosrc) FROM pg_proc
                            WHERE pronamespace = 'public'::regnamespace""",
        }
        return {what: {tuple(row) for row in await conn.fetch(query)} for what, query in queries.items()}
    finally:
        await conn.close()


async def test_a_start_during_a_long_read_does_not_hold_up_submits(
    settings: Settings,
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
) -> None:
    base_url = await serve(settings)
    reader = await asyncpg.connect(settings.database_url)
    try:
        await reader.execute("BEGIN")
        await reader.fetchval("SELECT count(*) FROM jobs")  # the read holds its lock on jobs until it ends
        starting = asyncio.create_task(spawn("server.app", make_settings(port=free_port())))
        submits = 0
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            while not starting.done() or submits < 3:
                try:
                    response = await asyncio.wait_for(client.post("/v1/jobs", json={"prompt": "x"}), 3)
                except TimeoutError:
                    raise AssertionError(f"submit {submits + 1} waited 3 s while a server started") from None
                assert response.status_code == 202, response.text
                submits += 1
                await asyncio.sleep(0.1)
            started = await starting  # up while the read still runs
            async with httpx.AsyncClient(base_url=started.base_url, timeout=10) as other:
                assert (await other.post("/v1/jobs", json={"prompt": "y"})).status_code == 202
        assert reader.is_in_transaction()
    finally:
        await reader.close()  # its transaction ends with it


async def test_migrate_applies_each_migration_once_records_it_and_then_does_nothing(
    empty_database_url: str,
) -> None:
    settings = settings_module.load(database_url=empty_database_url)
    known = [migration.name for migration in schema.load()]
    assert known[0] == BASELINE
    runs = await asyncio.gather(*(schema.migrate(settings) for _ in range(3)))  # three pods at once
    assert sorted(migration.name for run in runs for migration in run) == known  # each once
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await schema.applied(conn) == known
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 0
        assert await schema.migrate(settings) == []
        assert await schema.applied(conn) == known
    finally:
        await conn.close()


async def test_the_baseline_brings_a_database_of_an_older_schema_to_the_same_state(
    settings: Settings, empty_database_url: str
) -> None:
    await schema.migrate(settings_module.load(database_url=empty_database_url))
    fresh = await shape(empty_database_url)
    # A database made by an older schema.sql: no versions, a column added since then missing.
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("DROP TABLE schema_migrations")
        await conn.execute("ALTER TABLE jobs DROP COLUMN images_expired_at, DROP COLUMN handoffs")
    finally:
        await conn.close()
    await schema.migrate(settings)
    assert await shape(settings.database_url) == fresh


async def test_a_migration_gives_way_to_a_long_read_instead_of_holding_up_submits(settings: Settings) -> None:
    known = [*schema.load(), ADD_NOTE]

    def patient_for(timeout_s: float) -> Settings:
        return settings_module.load(
            database_url=settings.database_url, migrate_lock_timeout_s=0.2, migrate_timeout_s=timeout_s
        )

    db = await Database.connect(settings.database_url, max_size=2)
    reader = await asyncpg.connect(settings.database_url)
    try:
        await reader.execute("BEGIN")
        await reader.fetchval("SELECT count(*) FROM jobs")
        migrating = asyncio.create_task(schema.migrate(patient_for(1), known=known))
        while not migrating.done():
            began = time.monotonic()
            await db.jobs.insert(
                owner="ann", params=PARAMS, preview=None, queue="q", model_name="tiny", version="test",
                queue_ttl_s=0,
            )  # fmt: skip
            assert time.monotonic() - began < 1.5  # at most a lock time-out behind the migration
        with pytest.raises(SchemaError, match=r"9001_pre_add_note: .* in use .*`stepcast migrate` again"):
            await migrating
        assert await schema.applied(db.pool) == SHIPPED  # nothing of it was left behind
        migrating = asyncio.create_task(schema.migrate(patient_for(60), known=known))
        await asyncio.sleep(0.5)
        assert not migrating.done()  # it keeps trying while the read goes on
        await reader.execute("ROLLBACK")
        assert [migration.name for migration in await migrating] == [ADD_NOTE.name]
        assert await db.pool.fetchval("SELECT count(*) FROM jobs WHERE note IS NULL") > 0
    finally:
        await reader.close()
        await db.close()


async def test_pre_steps_suffice_and_a_post_step_of_a_newer_version_is_refused(settings: Settings) -> None:
    known = [*schema.load(), ADD_NOTE, NOTE_ADDED]
    db = await Database.connect(settings.database_url, max_size=1)
    try:
        with pytest.raises(SchemaError, match="lacks migration 9001_pre_add_note: run `stepcast migrate`"):
            await schema.wait_until_current(db.pool, 0, known)
        # Before a rolling update: the pre steps only; the new version runs on them.
        applied = await schema.migrate(settings, pre_only=True, known=known)
        assert [migration.name for migration in applied] == [ADD_NOTE.name]
        await schema.wait_until_current(db.pool, 0, known)
        await schema.wait_until_current(db.pool, 0)  # and so does the old one: a pre step is new to it
        # Once no old version runs: the post steps.
        assert [migration.name for migration in await schema.migrate(settings, known=known)] == [
            NOTE_ADDED.name
        ]
        await schema.wait_until_current(db.pool, 0, known)
        with pytest.raises(SchemaError, match="has migration 9001_post_note_added, which this version"):
            await schema.wait_until_current(db.pool, 60)  # the old version: refused at once
    finally:
        await db.close()


async def test_a_start_against_an_unmigrated_database_waits_for_migrate(
    empty_database_url: str,
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
) -> None:
    settings = make_settings(database_url=empty_database_url, schema_wait_s=30)
    starting = asyncio.create_task(serve(settings))
    await asyncio.sleep(1)
    assert not starting.done()  # it neither migrated nor gave up
    await schema.migrate(settings)
    base_url = await asyncio.wait_for(starting, 10)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        assert (await client.post("/v1/jobs", json={"prompt": "x"})).status_code == 202


async def test_a_server_and_a_worker_refuse_an_unmigrated_database_naming_the_migration(
    empty_database_url: str, make_settings: Callable[..., Settings], pipeline: Pipeline
) -> None:
    settings = make_settings(database_url=empty_database_url, schema_wait_s=0)
    server = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "server.app"], env=settings_env(settings), cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert server.returncode != 0
    assert (
        f"the database lacks migration {BASELINE}" in server.stderr
        and "run `stepcast migrate`" in server.stderr
    )

    worker = create_worker(settings, pipeline=pipeline, handle_signals=False)
    try:
        with pytest.raises(SchemaError, match=f"lacks migration {BASELINE}.*: run `stepcast migrate`"):
            await asyncio.wait_for(worker.async_run(), 60)
    finally:
        await worker.close()


async def test_the_migrate_command_says_what_it_applied_and_keys_want_a_migrated_database(
    empty_database_url: str,
) -> None:
    env = {"PATH": "/usr/bin:/bin", "STEPCAST_DATABASE_URL": empty_database_url}
    command = [sys.executable, "-m", "stepcast.cli", "migrate"]
    first = await asyncio.to_thread(
        subprocess.run, [*command, "--pre"], env=env, capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 0 and f"applied {BASELINE}" in first.stderr, first.stderr
    rest = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )
    posts = [migration.name for migration in load() if migration.step == "post"]
    assert rest.returncode == 0 and all(f"applied {name}" in rest.stderr for name in posts), rest.stderr
    again = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "nothing to apply" in again.stderr, again.stderr

    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("DELETE FROM schema_migrations")
    finally:
        await conn.close()
    settings = settings_module.load(database_url=empty_database_url)
    with pytest.raises(SystemExit, match=f"lacks migration {BASELINE}.*: run `stepcast migrate`"):
        async with _database(settings):
            pass


async def test_a_failing_migration_changes_nothing_and_is_named(settings: Settings) -> None:
    broken = Migration(9001, "pre", "9001_pre_broken", "ALTER TABLE jobs ADD COLUMN note text; SELECT 1 / 0")
    with pytest.raises(SchemaError, match="migration 9001_pre_broken failed, and changed nothing: division"):
        await schema.migrate(settings, known=[*schema.load(), broken])
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await schema.applied(conn) == SHIPPED
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'"
        )
        assert "note" not in {row["column_name"] for row in columns}
    finally:
        await conn.close()
