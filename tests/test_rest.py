"""REST against a real server on real Postgres and Redis (no worker unless needed)."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from redis.asyncio import Redis

from stepcast.events import EventLog
from stepcast.settings import Settings
from tests.conftest import Stack, assert_problem


async def test_submit_returns_202_location_and_the_pending_job(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"prompt": "a red fox", "steps": 5, "seed": 7})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    uuid.UUID(job["id"])
    assert job["status"] == "pending" and job["attempt"] == 0 and job["queue_position"] == 1
    assert job["params"] == {
        "prompt": "a red fox", "negative_prompt": None, "model": "tiny", "steps": 5, "width": 64,
        "height": 64, "guidance_scale": 7.5, "seed": 7, "num_images": 1, "scheduler": None,
    }  # fmt: skip
    assert job["progress"] == {"step": 0, "total": 5}
    assert job["created_at"].endswith("Z") and job["started_at"] is None

    again = await client.get(job["id"].join(["/v1/jobs/", ""]))
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    assert again.headers["retry-after"] == "2"


async def test_queue_position_counts_jobs_ahead(client: httpx.AsyncClient) -> None:
    ids = [(await client.post("/v1/jobs", json={"prompt": f"p{i}"})).json()["id"] for i in range(3)]
    positions = [(await client.get(f"/v1/jobs/{i}")).json()["queue_position"] for i in ids]
    assert positions == [1, 2, 3]


async def test_invalid_params_name_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"prompt": "p", "steps": 500, "width": 100, "foo": 1})
    body = assert_problem(
        response,
        422,
        {
            "steps": "steps must be between 1 and 150",
            "width": "width must be a multiple of 8",
            "foo": "unknown field 'foo'",
        },
    )
    assert body["type"].endswith("invalid_params")
    listed = (await client.get("/v1/jobs")).json()
    assert listed["items"] == []  # nothing was created


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", {"content-type": "application/json"}, 400),
        (b"prompt=fox", {"content-type": "application/x-www-form-urlencoded"}, 415),
        (b'{"prompt": "' + b"x" * 70_000 + b'"}', {"content-type": "application/json"}, 413),
        (b"\xff\xfe", {"content-type": "application/json"}, 400),
    ],
)
async def test_malformed_bodies_get_problems(
    client: httpx.AsyncClient, content: bytes, headers: dict[str, str], status: int
) -> None:
    assert_problem(await client.post("/v1/jobs", content=content, headers=headers), status)


async def test_unknown_jobs_are_404_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"/v1/jobs/{uuid.uuid4()}"), 404)
    assert_problem(await client.get("/v1/jobs/not-a-uuid"), 404)
    assert_problem(await client.post(f"/v1/jobs/{uuid.uuid4()}/cancel"), 404)
    assert_problem(await client.get(f"/v1/images/{uuid.uuid4()}/0.png"), 404)
    assert_problem(await client.get("/v1/images/../../etc/passwd"), 404)
    assert_problem(await client.delete("/v1/jobs"), 405)


async def test_history_is_paginated_newest_first(client: httpx.AsyncClient) -> None:
    ids = [(await client.post("/v1/jobs", json={"prompt": f"p{i}"})).json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/jobs", params=params)).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]

    canceled = (await client.post(f"/v1/jobs/{ids[0]}/cancel")).json()
    assert canceled["status"] == "canceled"
    only = (await client.get("/v1/jobs", params={"status": "canceled"})).json()
    assert [job["id"] for job in only["items"]] == [ids[0]]


async def test_history_query_errors_name_the_parameter(client: httpx.AsyncClient) -> None:
    assert_problem(
        await client.get("/v1/jobs", params={"status": "done"}),
        422,
        {"status": "status must be one of: pending, processing, completed, failed, canceled"},
    )
    for limit in ("0", "\u00b2", "9" * 5000):  # "²" passes str.isdigit; int() refuses 5000 digits
        assert_problem(
            await client.get("/v1/jobs", params={"limit": limit}),
            422,
            {"limit": "limit must be an integer between 1 and 100"},
        )
    assert (await client.get("/v1/jobs", params={"limit": "007"})).status_code == 200
    assert_problem(
        await client.get("/v1/jobs", params={"cursor": "!!"}), 422, {"cursor": "cursor is not valid"}
    )
    assert_problem(
        await client.get("/v1/jobs", params={"sort": "asc"}), 422, {"sort": "unknown query parameter 'sort'"}
    )


@pytest.mark.parametrize(
    "created",
    [
        "9999-12-31T23:59:59-05:00",  # past year 9999 once in UTC
        "0001-01-01T00:00:00+05:00",  # before year 1 once in UTC
        "2026-01-01T00:00:00",  # no time zone: asyncpg would read it in the server's own
    ],
)
async def test_a_tampered_cursor_is_a_422(client: httpx.AsyncClient, created: str) -> None:
    cursor = base64.urlsafe_b64encode(f"{created}|{uuid.uuid4()}".encode()).decode()
    response = await client.get("/v1/jobs", params={"cursor": cursor})
    assert_problem(response, 422, {"cursor": "cursor is not valid"})


async def test_the_last_possible_cursor_is_a_page(client: httpx.AsyncClient) -> None:
    job = (await client.post("/v1/jobs", json={"prompt": "p"})).json()
    cursor = base64.urlsafe_b64encode(f"9999-12-31T23:59:59.999999+00:00|{uuid.uuid4()}".encode()).decode()
    page = (await client.get("/v1/jobs", params={"cursor": cursor})).json()
    assert [item["id"] for item in page["items"]] == [job["id"]]


# JSON's \u escapes spell text no UTF-8 holds (a lone surrogate) and a NUL: Postgres stores neither.
LONE = "must be valid Unicode: \\ud800 is half of a surrogate pair"


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        (b'{"prompt": "a \\ud800 fox"}', {"prompt": f"prompt {LONE}"}),
        (b'{"prompt": "p", "negative_prompt": "\\ud800"}', {"negative_prompt": f"negative_prompt {LONE}"}),
        (b'{"prompt": "p", "\\ud800": 1}', {"\\ud800": f"the field name \\ud800 {LONE}"}),
        (
            b'{"prompt": "p", "webhook": {"url": "https://example.com/\\ud800"}}',
            {"webhook.url": f"webhook.url {LONE}"},
        ),
        (
            b'{"prompt": "p", "webhook": {"url": "https://example.com/\\u0000"}}',
            {"webhook.url": "webhook.url must not contain NUL characters"},
        ),
    ],
)
async def test_text_postgres_cannot_store_is_a_422_naming_the_field(
    client: httpx.AsyncClient, body: bytes, errors: dict[str, str]
) -> None:
    response = await client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert_problem(response, 422, errors)
    assert (await client.get("/v1/jobs")).json()["items"] == []  # nothing was stored


async def test_cancel_pending_job_is_final(client: httpx.AsyncClient, settings: Settings) -> None:
    job = (await client.post("/v1/jobs", json={"prompt": "p"})).json()
    response = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    canceled = response.json()
    assert canceled["status"] == "canceled" and canceled["finished_at"] is not None
    redis = Redis.from_url(settings.redis_url)
    events = (await EventLog(redis, stream_max=10, ttl_s=60).read(job["id"])).events
    await redis.aclose()
    assert events[0]["type"] == "queued" and events[-1]["type"] == "canceled"
    assert canceled["last_seq"] == events[-1]["seq"]  # recorded in Postgres, then published
    # Cancel is idempotent on a canceled job.
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).json()["status"] == "canceled"
    assert "retry-after" not in (await client.get(f"/v1/jobs/{job['id']}")).headers


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"postgres": "ok", "redis": "ok"}}


async def test_readiness_fails_when_redis_is_unreachable(
    make_settings: Callable[..., Settings], serve: Callable[[Settings], Awaitable[str]]
) -> None:
    from stepcast.cli.processes import free_port

    # Nothing listens on this loopback port: Redis is "down" for this server.
    base_url = await serve(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    async with httpx.AsyncClient(base_url=base_url) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["postgres"] == "ok"
    assert ready.json()["checks"]["redis"].startswith("error")


async def test_the_page_is_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and "<title>stepcast</title>" in page.text


async def test_prefer_wait_answers_201_with_the_finished_job(stack: Stack) -> None:
    response = await stack.client.post(
        "/v1/jobs", json={"prompt": "a quick fox", "steps": 3}, headers={"Prefer": "respond-async, wait=20"}
    )
    assert response.status_code == 201, response.text
    assert response.headers["preference-applied"] == "wait=20"
    job = response.json()
    assert job["status"] == "completed" and job["result"]["images"]
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"


async def test_prefer_wait_gives_up_with_the_usual_202(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await client.post("/v1/jobs", json={"prompt": "nobody runs me"}, headers={"Prefer": "wait=1"})
    assert response.status_code == 202 and response.json()["status"] == "pending"
    assert 1 <= time.monotonic() - started < 5


@pytest.mark.parametrize(
    "value", ["wait=61", "wait=-1", "wait=soon", "wait=1.5", "wait=\u00b2", "wait=" + "9" * 5000]
)
async def test_prefer_wait_out_of_range_is_named(client: httpx.AsyncClient, value: str) -> None:
    prefer = value.encode("latin-1")  # HTTP header bytes; the server reads them as Latin-1
    response = await client.post("/v1/jobs", json={"prompt": "p"}, headers={"Prefer": prefer})
    assert_problem(response, 422, {"Prefer": "wait must be a whole number of seconds from 0 to 60"})


async def test_absurdly_nested_json_is_a_400_not_a_crash(client: httpx.AsyncClient) -> None:
    deep = "[" * 60_000
    response = await client.post("/v1/jobs", content=deep, headers={"content-type": "application/json"})
    assert "nested too deeply" in assert_problem(response, 400)["detail"]
