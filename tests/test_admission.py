"""Admission of new work: idempotency keys (REST header and WS field) and
backpressure (a full queue answers 429 with Retry-After)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from server.app import open_services
from server.metrics import ServerMetrics
from stepcast.db import Database, NewJob
from stepcast.events import EventLog
from stepcast.params import parse_submission
from stepcast.settings import Settings
from tests.conftest import assert_problem, model_queue
from tests.test_auth import SESSION_SECRET, bearer, make_key

FOX = {"prompt": "a red fox", "steps": 5}


async def job_count(settings: Settings) -> int:
    db = await Database.connect(settings.database_url, max_size=1)
    try:
        return int(await db.pool.fetchval("SELECT count(*) FROM jobs"))
    finally:
        await db.close()


def ws_url(client: httpx.AsyncClient) -> str:
    return str(client.base_url).replace("http://", "ws://") + "/v1/ws"


async def ws_submit(client: httpx.AsyncClient, message: dict[str, Any]) -> dict[str, Any]:
    """Send one submit over a fresh socket; the first frame that answers it."""
    async with websockets.connect(ws_url(client)) as ws:
        await ws.send(json.dumps({"type": "submit", "request_id": "r", **message}))
        while True:
            frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] in {"accepted", "error"}:
                return frame


async def test_a_repeated_key_returns_the_first_job(client: httpx.AsyncClient, settings: Settings) -> None:
    headers = {"Idempotency-Key": "order-1234"}
    first = await client.post("/v1/jobs", json=FOX, headers=headers)
    again = await client.post("/v1/jobs", json=FOX, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
    # The random seed was drawn once: the replay is the same job, seed included.
    assert again.json()["params"]["seed"] == first.json()["params"]["seed"]
    other = await client.post("/v1/jobs", json=FOX, headers={"Idempotency-Key": "order-1235"})
    assert other.json()["id"] != first.json()["id"]
    assert await job_count(settings) == 2
    redis = Redis.from_url(settings.redis_url)
    events = (await EventLog(redis, stream_max=100, ttl_s=60).read(first.json()["id"])).events
    await redis.aclose()
    assert [e["type"] for e in events] == ["queued"]  # announced and enqueued once


async def test_concurrent_duplicates_make_one_job(client: httpx.AsyncClient, settings: Settings) -> None:
    headers = {"Idempotency-Key": "burst"}
    responses = await asyncio.gather(*(client.post("/v1/jobs", json=FOX, headers=headers) for _ in range(12)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert await job_count(settings) == 1


async def test_a_key_reused_with_other_params_is_refused(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "k1"}
    assert (await client.post("/v1/jobs", json=FOX, headers=headers)).status_code == 202
    changed = await client.post("/v1/jobs", json={**FOX, "steps": 6}, headers=headers)
    body = assert_problem(changed, 409)
    assert body["type"].endswith("idempotency_key_reused") and "different parameters" in body["detail"]
    # Defaults filled in count as asked: steps 20 spelled out is the same request as no steps.
    headers = {"Idempotency-Key": "k2"}
    plain = await client.post("/v1/jobs", json={"prompt": "p"}, headers=headers)
    spelled = await client.post("/v1/jobs", json={"prompt": "p", "steps": 20}, headers=headers)
    assert spelled.json()["id"] == plain.json()["id"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\there"])
async def test_a_malformed_key_is_named(client: httpx.AsyncClient, key: str) -> None:
    response = await client.post("/v1/jobs", json=FOX, headers={"Idempotency-Key": key})
    message = "Idempotency-Key must be 1 to 255 visible characters without spaces"
    assert_problem(response, 422, {"Idempotency-Key": message})


async def test_websocket_idempotency_shares_keys_with_rest(client: httpx.AsyncClient) -> None:
    message = {"params": FOX, "idempotency_key": "ws-1"}
    first = await ws_submit(client, message)
    again = await ws_submit(client, message)
    assert first["type"] == again["type"] == "accepted"
    assert again["job_id"] == first["job_id"] and again["replayed"] is True and "replayed" not in first
    rest = await client.post("/v1/jobs", json=FOX, headers={"Idempotency-Key": "ws-1"})
    assert rest.json()["id"] == first["job_id"]
    refused = await ws_submit(client, {"params": {**FOX, "prompt": "a blue fox"}, "idempotency_key": "ws-1"})
    assert refused["type"] == "error" and refused["code"] == "idempotency_key_reused"
    bad = await ws_submit(client, {"params": FOX, "idempotency_key": 7})
    assert bad["code"] == "invalid_params" and bad["field"] == "idempotency_key"


@pytest.mark.parametrize("settings", [{"max_jobs_per_owner": 2}], indirect=True)
async def test_a_full_queue_answers_429_with_retry_after(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    accepted = [
        await client.post("/v1/jobs", json=FOX, headers={"Idempotency-Key": f"k{i}"}) for i in range(2)
    ]
    assert [r.status_code for r in accepted] == [202, 202]
    refused = await client.post("/v1/jobs", json=FOX)
    body = assert_problem(refused, 429)
    assert body["type"].endswith("queue_full") and "2 unfinished jobs" in body["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    # A repeat of accepted work is not new work: it is answered, not refused.
    replay = await client.post("/v1/jobs", json=FOX, headers={"Idempotency-Key": "k0"})
    assert replay.status_code == 202 and replay.json()["id"] == accepted[0].json()["id"]
    frame = await ws_submit(client, {"params": FOX})
    assert frame["type"] == "error" and frame["code"] == "queue_full" and frame["retry_after_s"] >= 1
    assert await job_count(settings) == 2
    # Room again once a job leaves the queue.
    await client.post(f"/v1/jobs/{accepted[0].json()['id']}/cancel")
    assert (await client.post("/v1/jobs", json=FOX)).status_code == 202


@pytest.mark.parametrize("settings", [{"max_queue_depth": 3}], indirect=True)
async def test_the_global_queue_depth_is_enforced(client: httpx.AsyncClient) -> None:
    statuses = [(await client.post("/v1/jobs", json=FOX)).status_code for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
    refused = await client.post("/v1/jobs", json=FOX)
    assert "the queue holds 3 jobs" in refused.json()["detail"]


async def test_submits_of_one_loop_pass_are_inserted_in_one_statement_and_each_announced(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_services(settings, ServerMetrics()) as services:
        statements = []
        insert_jobs = services.db.jobs.insert_many

        async def counted(jobs: list[NewJob], **limits: Any) -> Any:
            statements.append([job.owner for job in jobs])
            return await insert_jobs(jobs, **limits)

        monkeypatch.setattr(services.db.jobs, "insert_many", counted)
        submission = parse_submission(FOX, None, settings, await services.models.current())
        owners = ["ann", "bob", "cy"]
        submitted = await asyncio.gather(*(services.jobs.submit(owner, submission) for owner in owners))
        assert statements == [owners]
        jobs = [job for job, created in submitted if created]
        assert [job.owner for job in jobs] == owners
        # Three owners' first jobs: each at the queue's clock, so placed by id (docs/scheduling.md).
        for place, job in enumerate(sorted(jobs, key=lambda job: (job.fair_tag, job.id)), start=1):
            events = (await services.events.read(str(job.id))).events
            assert [(e["type"], e["position"]) for e in events] == [("queued", place)]
        queued = await services.redis.zrange(model_queue(settings), 0, -1)
        assert sorted(queued) == sorted(str(job.id).encode() for job in jobs)
        job, created = await services.jobs.submit("dee", submission)  # alone: a list of one
        assert created and statements[-1] == ["dee"]
        place = sorted([*jobs, job], key=lambda job: (job.fair_tag, job.id)).index(job) + 1
        assert [e["position"] for e in (await services.events.read(str(job.id))).events] == [place]


ANONYMOUS_QUOTA = {
    "auth": "keys",
    "session_secret": SESSION_SECRET,
    "max_jobs_per_anonymous_owner": 2,
    "max_anonymous_jobs_per_address": 3,
}


async def browser(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """A new browser: loads the page, keeps its session cookie."""
    tab = httpx.AsyncClient(base_url=client.base_url)
    assert (await tab.get("/")).status_code == 200
    return tab


@pytest.mark.parametrize("settings", [ANONYMOUS_QUOTA], indirect=True)
async def test_anonymous_sessions_of_one_address_share_one_quota(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    first, second, third = [await browser(client) for _ in range(3)]
    try:
        mine = [await first.post("/v1/jobs", json=FOX) for _ in range(3)]
        assert [r.status_code for r in mine] == [202, 202, 429]
        assert "you have 2 unfinished jobs (a browser session's limit" in mine[2].json()["detail"]
        assert (await second.post("/v1/jobs", json=FOX)).status_code == 202
        # The address holds 3: another session, a new cookie, gets nothing more.
        for tab in (second, third):
            refused = await tab.post("/v1/jobs", json=FOX)
            body = assert_problem(refused, 429)
            assert "browser sessions from your address have 3 unfinished jobs" in body["detail"]
            assert int(refused.headers["retry-after"]) >= 1
        # Many new sessions at once cannot get past it either.
        tabs = [await browser(client) for _ in range(6)]
        await first.post(f"/v1/jobs/{mine[0].json()['id']}/cancel")
        burst = await asyncio.gather(*(tab.post("/v1/jobs", json=FOX) for tab in tabs))
        assert sorted(r.status_code for r in burst) == [202] + [429] * 5
        for tab in tabs:
            await tab.aclose()
        # A key holder keeps the owner limit of key holders.
        _, key = await make_key(settings, "alice")
        keyed = [await client.post("/v1/jobs", json=FOX, headers=bearer(key)) for _ in range(5)]
        assert [r.status_code for r in keyed] == [202] * 5
        unfinished = "SELECT count(*) FROM jobs WHERE status = 'pending' AND anonymous_address IS NOT NULL"
        db = await Database.connect(settings.database_url, max_size=1)
        try:
            assert await db.pool.fetchval(unfinished) == 3
        finally:
            await db.close()
    finally:
        for tab in (first, second, third):
            await tab.aclose()


@pytest.mark.parametrize(
    "settings", [{**ANONYMOUS_QUOTA, "anonymous_submits_per_min_per_address": 2}], indirect=True
)
async def test_anonymous_submits_are_rate_limited_per_address(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    tabs = [await browser(client) for _ in range(3)]
    answers = [await tab.post("/v1/jobs", json=FOX) for tab in tabs]
    assert [r.status_code for r in answers] == [202, 202, 429]
    assert "more than 2 anonymous submits a minute" in assert_problem(answers[2], 429)["detail"]
    _, key = await make_key(settings, "alice")
    assert (await client.post("/v1/jobs", json=FOX, headers=bearer(key))).status_code == 202
    for tab in tabs:
        await tab.aclose()
