"""Scheduling (docs/scheduling.md): owners take turns in a queue, weighted by their key's
priority class; jobs are admitted by cost against budgets; a submit can ask to start within a
time, and the estimated start times hold, on the real stack and the tiny model."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
import websockets

from stepcast import credentials, queue
from stepcast.db import Database
from stepcast.settings import Settings
from tests.conftest import assert_problem, eventually, model_queue
from tests.test_realtime import sse_events

KEYS = [{"auth": "keys"}]


async def make_key(db: Database, owner: str, priority_class: str | None = None) -> dict[str, str]:
    """Bearer headers of a new key of ``owner`` (of ``priority_class``)."""
    key = credentials.new_key()
    await db.owners.create_api_key(
        owner=owner,
        name="test",
        key_hash=credentials.hash_key(key),
        prefix=key[:8],
        priority_class=priority_class,
    )
    return {"Authorization": f"Bearer {key}"}


async def submit(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/jobs", json={"prompt": "a red fox", "steps": 2, **body}, headers=headers
    )
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def queue_order(db: Database, settings: Settings) -> tuple[list[str], list[str]]:
    """The pending jobs in Postgres's order, and in Redis's (the order a take follows, where a
    job stays until it is done): the same order, if scheduling is one order."""
    rows = await db.pool.fetch(
        "SELECT id FROM jobs WHERE queue = $1 AND status = 'pending' ORDER BY fair_tag, id",
        model_queue(settings),
    )
    arq = queue.connect(settings.redis_url)
    try:
        members = await arq.zrange(model_queue(settings), 0, -1)
    finally:
        await arq.aclose(close_connection_pool=True)
    pending = [str(row["id"]) for row in rows]
    return pending, [member.decode() for member in members if member.decode() in pending]


@pytest.fixture
async def db(settings: Settings) -> Any:
    db = await Database.connect(settings.database_url, max_size=2)
    yield db
    await db.close()


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_owners_take_turns_and_a_backlog_moves_back_for_a_newcomer(
    settings: Settings, client: httpx.AsyncClient, db: Database
) -> None:
    ann = await make_key(db, "ann", "batch")
    bob = await make_key(db, "bob", "interactive")
    cy = await make_key(db, "cy", "batch")
    ann_jobs = [await submit(client, ann) for _ in range(5)]
    assert [job["queue_position"] for job in ann_jobs] == [1, 2, 3, 4, 5]  # alone: first in, first out
    # A worker starts ann's first job (its claim, as a worker's): the queue's clock is its tag.
    claimed = await db.runs.claim(
        [uuid.UUID(ann_jobs[0]["id"])], worker="w", lease_s=60, model_revision="r", token=uuid.uuid4()
    )
    assert len(claimed) == 1
    watched = ann_jobs[1]["id"]  # next to start, until bob and cy come
    async with client.stream("GET", f"/v1/jobs/{watched}/events", headers=ann) as events:
        bob_first, bob_second = await submit(client, bob), await submit(client, bob)
        cy_first = await submit(client, cy)
        # Newcomers start at the clock, ahead of ann's backlog; bob's second comes a tenth of
        # a job later (his weight is 10, ann's 1), still ahead of ann's next.
        assert (bob_first["queue_position"], bob_second["queue_position"]) == (1, 2)
        assert cy_first["queue_position"] in {1, 2}  # (at the clock, as bob's first: by id)
        # ann's next was told it moved back, as the queue announcer saw it.
        await asyncio.wait_for(
            sse_events(events, lambda event: event["type"] == "queued" and event["position"] == 4), 15
        )
    postgres, redis = await queue_order(db, settings)
    assert postgres == redis  # one order: the positions told are the order jobs are taken in
    ann_ids = [job["id"] for job in ann_jobs[1:]]
    assert postgres[3:] == ann_ids  # ann's own keep their order, behind the newcomers
    assert set(postgres[:3]) == {bob_first["id"], bob_second["id"], cy_first["id"]}
    keys = {job["id"]: ann for job in ann_jobs} | {job["id"]: bob for job in (bob_first, bob_second)}
    keys[cy_first["id"]] = cy
    for index, job_id in enumerate(postgres):
        shown = (await client.get(f"/v1/jobs/{job_id}", headers=keys[job_id])).json()
        assert (shown["status"], shown["queue_position"]) == ("pending", index + 1)
        assert shown["estimated_start_at"] is None  # no worker of its model runs


@pytest.mark.parametrize("settings", [{"auth": "keys", "batch_size": 1}], indirect=True)
async def test_a_newcomer_starts_at_the_next_free_worker_behind_a_backlog(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    base_url = await serve(settings)
    await run_worker(settings)
    db = await Database.connect(settings.database_url, max_size=2)
    try:
        ann, bob = await make_key(db, "ann", "batch"), await make_key(db, "bob", "batch")
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            ann_jobs = [await submit(client, ann, steps=6) for _ in range(10)]
            first = ann_jobs[0]["id"]
            await eventually(lambda: _started(db, first))
            bob_job = await submit(client, bob, steps=6)
            await eventually(lambda: _started(db, bob_job["id"]))
            started = await db.pool.fetch(
                "SELECT id::text, started_at FROM jobs WHERE owner = 'ann' AND started_at IS NOT NULL"
            )
            bob_started = await _started(db, bob_job["id"])
            before_bob = [row for row in started if row["started_at"] < bob_started]
            # One worker, which holds the job it runs and the next: it ran those of ann's it held
            # when bob came (one, or two), and then bob's, not the eight of ann's that waited.
            assert len(before_bob) <= 3, before_bob
            assert await db.pool.fetchval(
                "SELECT count(*) FROM jobs WHERE owner = 'ann' AND status = 'pending'"
            )
    finally:
        await db.close()


async def _started(db: Database, job_id: str) -> datetime | None:
    started: datetime | None = await db.pool.fetchval(
        "SELECT started_at FROM jobs WHERE id = $1::uuid", job_id
    )
    return started


@pytest.mark.parametrize(
    "settings",
    [{"auth": "keys", "default_megapixel_step_s": 1.0, "max_cost_per_owner_s": 0.1}],
    indirect=True,
)
async def test_an_owner_over_its_budget_of_gpu_seconds_is_told_which_and_when(
    settings: Settings, client: httpx.AsyncClient, db: Database
) -> None:
    ann, bob = await make_key(db, "ann"), await make_key(db, "bob")
    # 64 × 64 × 10 steps = 0.041 megapixel-steps: 41 ms of a GPU at 1 s per megapixel-step.
    await submit(client, ann, steps=10)
    await submit(client, ann, steps=10)
    response = await client.post("/v1/jobs", json={"prompt": "a fox", "steps": 10}, headers=ann)
    body = assert_problem(response, 429)
    assert body["type"].endswith("over_budget") and (body["budget"], body["budget_s"]) == ("owner", 0.1)
    # 41 ms each: two in, the third 23 ms over, gone at a worker's pace in under a second.
    assert "your budget of 0.1" in body["detail"] and "try again in 1 s" in body["detail"]
    assert response.headers["Retry-After"] == "1"
    await submit(client, bob, steps=10)  # another owner's budget is its own
    # A job larger than the whole budget could never go in: invalid, not "later".
    too_big = await client.post("/v1/jobs", json={"prompt": "a fox", "steps": 40}, headers=bob)
    problem = assert_problem(too_big, 422)
    assert "more than your budget of 0.1" in problem["detail"] and "errors" not in problem
    assert await db.pool.fetchval("SELECT count(*) FROM jobs") == 3


@pytest.mark.parametrize(
    "settings", [{"auth": "keys", "default_megapixel_step_s": 1.0, "max_queue_cost_s": 0.1}], indirect=True
)
async def test_a_queue_over_its_budget_refuses_every_owner_saying_so(
    settings: Settings, client: httpx.AsyncClient, db: Database
) -> None:
    ann, bob = await make_key(db, "ann"), await make_key(db, "bob")
    await submit(client, ann, steps=10)
    await submit(client, bob, steps=10)
    response = await client.post("/v1/jobs", json={"prompt": "a fox", "steps": 10}, headers=bob)
    body = assert_problem(response, 429)
    assert (body["budget"], body["type"].rsplit(":", 1)[1]) == ("queue", "over_budget")
    assert "the queue's waiting work" in body["detail"]


@pytest.mark.parametrize("settings", [{"auth": "keys", "catalog_cache_s": 0}], indirect=True)
async def test_start_within_refuses_what_would_start_later_and_queues_nothing(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    base_url = await serve(settings)
    db = await Database.connect(settings.database_url, max_size=2)
    try:
        ann = await make_key(db, "ann")
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            # No worker of the model runs: no start can be promised.
            response = await client.post(
                "/v1/jobs", json={"prompt": "a fox", "start_within_s": 60}, headers=ann
            )
            body = assert_problem(response, 429)
            assert body["type"].endswith("start_too_late") and "no worker of tiny runs" in body["detail"]
            assert await db.pool.fetchval("SELECT count(*) FROM jobs") == 0

            await run_worker(settings)
            first = await submit(client, ann, steps=4, start_within_s=60)  # an idle worker: now
            await eventually(lambda: _status(db, first["id"], "completed"))  # the pace is measured:
            await asyncio.sleep(settings.queue_update_s)  # the server reads it afresh after this
            backlog = [await submit(client, ann, steps=30) for _ in range(4)]
            response = await client.post(
                "/v1/jobs", json={"prompt": "a fox", "steps": 30, "start_within_s": 0.01}, headers=ann
            )
            body = assert_problem(response, 429)
            assert body["estimated_start_s"] > 0.01 and body["estimated_start_at"].endswith("Z")
            assert "nothing was queued" in body["detail"]
            assert await db.pool.fetchval("SELECT count(*) FROM jobs") == 1 + len(backlog)

            # The same over the WebSocket: an error frame with the estimate.
            url = base_url.replace("http://", "ws://") + "/v1/ws"
            async with websockets.connect(url, additional_headers=ann) as ws:
                frame = {"type": "submit", "request_id": "r1", "params": {"prompt": "a fox", "steps": 30},
                         "start_within_s": 0.01}  # fmt: skip
                await ws.send(json.dumps(frame))
                error = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (error["type"], error["code"], error["request_id"]) == ("error", "start_too_late", "r1")
            assert error["estimated_start_s"] > 0.01 and error["retry_after_s"] >= 1
            assert await db.pool.fetchval("SELECT count(*) FROM jobs") == 1 + len(backlog)
    finally:
        await db.close()


async def _status(db: Database, job_id: str, status: str) -> bool:
    return bool(await db.pool.fetchval("SELECT status = $2 FROM jobs WHERE id = $1::uuid", job_id, status))


# An estimate is right within this much: TOLERANCE_S plus TOLERANCE of the wait it estimates.
TOLERANCE_S, TOLERANCE = 0.5, 0.25
STEPS = 100  # a job of a few tenths of a second on the tiny model


@pytest.mark.parametrize("settings", [{"batch_size": 1}], indirect=True)  # one after another
async def test_estimated_start_times_hold_within_a_stated_tolerance(settings: Settings, stack: Any) -> None:
    for _ in range(2):  # the queue's pace, measured
        await stack.wait((await stack.submit(steps=STEPS))["id"])
    await asyncio.sleep(settings.queue_update_s)  # and read afresh by the server
    jobs = [await stack.submit(steps=STEPS) for _ in range(6)]
    estimates = [datetime.fromisoformat(job["estimated_start_at"]) for job in jobs]
    submitted = [datetime.fromisoformat(job["created_at"]) for job in jobs]
    for job in jobs:
        await stack.wait(job["id"])
    started = [datetime.fromisoformat((await stack.wait(job["id"]))["started_at"]) for job in jobs]
    for estimate, at, start in zip(estimates, submitted, started, strict=True):
        waited_s = (estimate - at).total_seconds()
        error_s = abs((start - estimate).total_seconds())
        print(f"estimated wait {waited_s:.2f} s, off by {error_s:.2f} s")
        assert error_s <= TOLERANCE_S + TOLERANCE * waited_s, (estimates, started)
    # The queue was deep enough that a blind estimate (now, or all at once) would miss.
    assert (started[-1] - submitted[-1]).total_seconds() > TOLERANCE_S * 2


@pytest.mark.parametrize(
    "settings",
    [{"auth": "keys", "max_jobs_per_anonymous_owner": 10, "max_anonymous_jobs_per_address": 10}],
    indirect=True,
)
async def test_the_pages_session_is_interactive_and_a_keys_class_is_its_weight(
    settings: Settings, client: httpx.AsyncClient, db: Database
) -> None:
    page = await client.get("/")
    session = page.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    tab = {"Cookie": f"stepcast_session={session}"}
    batch = await make_key(db, "ann", "batch")
    default = await make_key(db, "bob")  # made without a class: STEPCAST_KEY_PRIORITY_CLASS's
    for headers, weight in ((tab, 10), (batch, 1), (default, 10)):
        first, second = await submit(client, headers), await submit(client, headers)
        rows = await db.pool.fetch(
            "SELECT fair_tag, cost_ms FROM jobs WHERE id = ANY($1::uuid[]) ORDER BY fair_tag",
            [first["id"], second["id"]],
        )
        # The second starts where the first ends: its cost over the class's weight (tags are
        # about 1.7e12 ms: a double holds them to 2.4e-4 ms).
        gap = rows[1]["fair_tag"] - rows[0]["fair_tag"]
        assert gap == pytest.approx(rows[0]["cost_ms"] / weight, abs=1e-3)
