"""Webhooks: signed per Standard Webhooks (verified with the reference library),
recorded, retried with back-off, never sent to private addresses.

Every receiver here is on 127.0.0.1. The SSRF tests give the sender a fake
resolver and a transport that fails the test if it is asked to connect
anywhere but 127.0.0.1, so nothing can leave the machine even if the guard
were broken.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from stepcast.db import Database
from stepcast.netguard import refused
from stepcast.processes import free_port
from stepcast.settings import Settings
from stepcast.storage import open_storage
from stepcast.webhooks import WebhookSender
from tests.conftest import Stack, assert_problem, eventually

FAST = {"webhook_allow_private": True, "webhook_backoff_s": (0.2, 0.2), "webhook_poll_s": 0.1}


@dataclass
class Receiver:
    url: str
    statuses: list[int] = field(default_factory=list)  # answers to give, in order; then 200
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    redirected_to: int = 0


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on loopback that records what it gets."""
    port = free_port()
    state = Receiver(f"http://127.0.0.1:{port}")

    async def hook(request: Request) -> Response:
        state.received.append((dict(request.headers), await request.body()))
        return Response(status_code=state.statuses.pop(0) if state.statuses else 200)

    async def redirect(request: Request) -> Response:
        return RedirectResponse(f"{state.url}/elsewhere", status_code=302)

    async def elsewhere(request: Request) -> Response:
        state.redirected_to += 1
        return Response()

    app = Starlette(
        routes=[
            Route("/hook", hook, methods=["POST"]),
            Route("/redirect", redirect, methods=["POST"]),
            Route("/elsewhere", elsewhere, methods=["POST", "GET"]),
        ]
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: asyncio.sleep(0.01, result=server.started))
    yield state
    server.should_exit = True
    await task


async def deliveries(stack: Stack, job_id: str) -> list[Any]:
    return list(
        await stack.db.pool.fetch(
            "SELECT * FROM webhook_deliveries WHERE job_id = $1 ORDER BY created_at", job_id
        )
    )


async def settled(stack: Stack, job_id: str, count: int) -> list[Any]:
    async def done() -> list[Any] | None:
        rows = await deliveries(stack, job_id)
        return rows if len(rows) == count and all(r["status"] != "pending" for r in rows) else None

    result: list[Any] = await eventually(done)
    return result


@pytest.mark.parametrize("settings", [FAST], indirect=True)
async def test_deliveries_are_signed_recorded_and_verifiable(stack: Stack, receiver: Receiver) -> None:
    hook = {"url": f"{receiver.url}/hook", "events": ["started", "completed"]}
    job = await stack.submit(steps=2, webhook=hook)
    assert job["webhook"] == hook
    await stack.wait(job["id"])
    rows = await settled(stack, job["id"], 2)
    assert [(r["event"], r["status"], r["attempts"], r["last_status"]) for r in rows] == [
        ("started", "delivered", 1, 200),
        ("completed", "delivered", 1, 200),
    ]
    secret = (await stack.client.get("/v1/me")).json()["webhook_secret"]
    assert secret.startswith("whsec_")
    verifier = Webhook(secret)
    payloads = [verifier.verify(body, headers) for headers, body in receiver.received]
    assert sorted(p["type"] for p in payloads) == ["job.completed", "job.started"]
    completed = next(p for p in payloads if p["type"] == "job.completed")
    assert completed["data"]["id"] == job["id"] and completed["data"]["status"] == "completed"
    assert completed["data"]["result"]["images"][0]["url"].endswith("/1/0.png")
    ids = {headers["webhook-id"] for headers, _ in receiver.received}
    assert ids == {str(r["id"]) for r in rows}
    headers, body = receiver.received[0]
    with pytest.raises(Exception):  # noqa: B017 - the library's own error type for a bad signature
        verifier.verify(body.replace(b"job.", b"jab."), headers)


@pytest.mark.parametrize("settings", [FAST], indirect=True)
async def test_failures_are_retried_with_backoff_then_given_up(stack: Stack, receiver: Receiver) -> None:
    hook = {"url": f"{receiver.url}/hook", "events": ["completed"]}
    receiver.statuses = [500, 429]
    flaky = await stack.submit(steps=2, webhook=hook)
    [row] = await settled(stack, flaky["id"], 1)
    assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 3, 200)

    receiver.statuses = [503, 503, 503]
    down = await stack.submit(steps=2, webhook=hook)
    [row] = await settled(stack, down["id"], 1)
    assert (row["status"], row["attempts"], row["last_status"]) == ("failed", 3, 503)
    assert "gave up after 3 attempts" in row["last_error"]

    receiver.statuses = [400]
    refused = await stack.submit(steps=2, webhook=hook)
    [row] = await settled(stack, refused["id"], 1)
    assert (row["status"], row["attempts"], row["last_status"]) == ("failed", 1, 400)  # no retry

    moved = await stack.submit(steps=2, webhook={"url": f"{receiver.url}/redirect", "events": ["completed"]})
    [row] = await settled(stack, moved["id"], 1)
    assert (row["status"], row["last_status"]) == ("failed", 302) and "not followed" in row["last_error"]
    assert receiver.redirected_to == 0
    metrics = (await stack.client.get("/metrics")).text
    assert 'stepcast_webhook_deliveries_total{outcome="retry"} 4.0' in metrics


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:9/hook", "url may not point at a loopback address: 127.0.0.1"),
        ("http://[::1]/hook", "url may not point at a loopback address: ::1"),
        ("http://169.254.169.254/latest/meta-data", "url may not point at a link-local address"),
        ("http://10.0.0.5/hook", "url may not point at a private or reserved address: 10.0.0.5"),
        ("http://[::ffff:192.168.1.1]/hook", "url may not point at a private or reserved address"),
        ("ftp://example.com/hook", "url must be an absolute http:// or https:// URL"),
        ("https://user:pw@example.com/hook", "url must not carry credentials"),
    ],
)
async def test_private_and_malformed_urls_are_refused_at_submit(
    client: httpx.AsyncClient, url: str, message: str
) -> None:
    response = await client.post("/v1/jobs", json={"prompt": "p", "webhook": {"url": url}})
    body = assert_problem(response, 422)
    assert body["errors"][0]["field"] == "webhook.url" and message in body["errors"][0]["message"]


async def test_bad_events_are_named(client: httpx.AsyncClient) -> None:
    hook = {"url": "https://hooks.example.com/x", "events": ["finished"]}
    response = await client.post("/v1/jobs", json={"prompt": "p", "webhook": hook})
    assert_problem(
        response,
        422,
        {"webhook.events": "events must be a non-empty list of: started, completed, failed, canceled"},
    )


def loopback_only(answer: int = 200) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that fails the test if asked to connect anywhere but 127.0.0.1."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "127.0.0.1", f"the sender tried to reach {request.url.host}"
        seen.append(request)
        return httpx.Response(answer)

    return httpx.MockTransport(handle), seen


# The server's own sender runs once at start-up, before any job exists; the
# test drives a sender with a fake resolver instead (no DNS query leaves).
@pytest.mark.parametrize("settings", [{"webhook_poll_s": 3600}], indirect=True)
@pytest.mark.parametrize(
    ("resolves_to", "reason"),
    [
        (["10.1.2.3"], "10.1.2.3 is a private or reserved address"),
        (["169.254.169.254"], "link-local"),
        (["::1"], "::1 is a loopback address"),
        (["93.184.216.34", "127.0.0.1"], "127.0.0.1 is a loopback address"),  # one bad answer is enough
        # IPv6 forms that carry an IPv4 address are judged by it.
        (["64:ff9b::a9fe:a9fe"], "carries 169.254.169.254: 169.254.169.254 is a link-local"),  # NAT64
        (["64:ff9b::a00:1"], "carries 10.0.0.1: 10.0.0.1 is a private"),
        (["64:ff9b:1::a00:1"], "local-use NAT64"),  # RFC 8215: where the IPv4 address sits varies
        (["2002:a9fe:a9fe::1"], "carries 169.254.169.254"),  # 6to4
        (["2002:7f00:1::"], "carries 127.0.0.1: 127.0.0.1 is a loopback"),
        (["::127.0.0.1"], "carries 127.0.0.1: 127.0.0.1 is a loopback"),  # IPv4-compatible
        (["::ffff:169.254.169.254"], "carries 169.254.169.254"),  # IPv4-mapped
    ],
)
async def test_names_resolving_to_private_addresses_are_refused_before_connecting(
    client: httpx.AsyncClient, settings: Settings, resolves_to: list[str], reason: str
) -> None:
    job_id = await canceled_job_with_webhook(client, "http://hooks.internal.test/hook")
    transport, seen = loopback_only()

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("hooks.internal.test", 80)
        return resolves_to

    row = await send_once(settings, job_id, resolver, transport)
    assert seen == []  # refused before any connection
    assert (
        row["status"] == "failed"
        and reason in row["last_error"]
        and "hooks.internal.test" in row["last_error"]
    )


@pytest.mark.parametrize("settings", [{"webhook_poll_s": 3600, "webhook_allow_private": True}], indirect=True)
async def test_allowed_private_receivers_get_the_checked_address_not_the_name(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    job_id = await canceled_job_with_webhook(client, "http://hooks.internal.test:8080/hook")
    transport, seen = loopback_only()

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    row = await send_once(settings, job_id, resolver, transport)
    assert row["status"] == "delivered"
    [request] = seen
    assert str(request.url) == "http://127.0.0.1:8080/hook"  # connected to what was checked
    assert request.headers["host"] == "hooks.internal.test:8080"
    assert json.loads(request.content)["type"] == "job.canceled"


async def canceled_job_with_webhook(client: httpx.AsyncClient, url: str) -> str:
    hook = {"url": url, "events": ["canceled"]}
    job_id: str = (await client.post("/v1/jobs", json={"prompt": "p", "webhook": hook})).json()["id"]
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    return job_id


async def send_once(
    settings: Settings, job_id: str, resolver: Callable[[str, int], Awaitable[list[str]]], transport: Any
) -> Any:
    db = await Database.connect(settings.database_url, max_size=2)
    try:
        async with open_storage(settings) as storage:
            sender = WebhookSender(db, storage, settings, resolver=resolver, transport=transport)
            assert await sender.tick() == 1
        return await db.pool.fetchrow("SELECT * FROM webhook_deliveries WHERE job_id = $1", uuid.UUID(job_id))
    finally:
        await db.close()


@pytest.mark.parametrize(
    "address", ["64:ff9b::5db8:d822", "2002:5db8:d822::1", "::ffff:93.184.216.34", "2606:4700::1111"]
)
def test_ipv6_forms_of_public_addresses_may_receive_webhooks(address: str) -> None:
    assert refused(address) is None


def test_a_local_nat64_address_is_allowed_only_where_private_receivers_are() -> None:
    assert refused("64:ff9b:1::a00:1", allow_private=True) is None
    assert refused("64:ff9b::a00:1", allow_private=True) is None
