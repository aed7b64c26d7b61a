"""Webhooks: signed per Standard Webhooks (verified with the reference library),
recorded, retried with back-off, never sent to private addresses.

Every receiver here is on 127.0.0.1. The SSRF tests give the sender a fake
resolver and a transport that fails the test if it is asked to connect
anywhere but 127.0.0.1, so nothing can leave the machine even if the guard
were broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from stepcast.background import cancel_and_wait
from stepcast.cli.processes import free_port
from stepcast.db import Database
from stepcast.netguard import refused
from stepcast.settings import Settings
from stepcast.storage import open_storage
from stepcast.webhooks import WebhookSender
from tests.conftest import Stack, assert_problem, eventually
from tests.test_client import cli

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


@pytest.mark.parametrize("settings", [FAST], indirect=True)
async def test_the_delivery_log_shows_each_delivery_and_a_redelivery_goes_at_once_under_its_id(
    stack: Stack, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.statuses = [503, 503, 503]
    job = await stack.submit(steps=2, webhook={"url": f"{receiver.url}/hook", "events": ["completed"]})
    await settled(stack, job["id"], 1)
    log = await stack.client.get(f"/v1/jobs/{job['id']}/webhooks")
    assert log.status_code == 200
    [failed] = log.json()["items"]
    assert (failed["event"], failed["status"], failed["attempts"], failed["last_status"]) == (
        "completed", "failed", 3, 503,
    )  # fmt: skip
    assert "gave up after 3 attempts" in failed["last_error"] and failed["next_attempt_at"] is None
    assert failed["url"] == f"{receiver.url}/hook" and failed["delivered_at"] is None

    # The receiver is back: one more attempt, now, with the same webhook-id.
    again = await stack.client.post(f"/v1/jobs/{job['id']}/webhooks/{failed['id']}/redeliver")
    assert again.status_code == 202 and again.json()["status"] == "pending"
    [row] = await settled(stack, job["id"], 1)
    assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 4, 200)
    assert [headers["webhook-id"] for headers, _ in receiver.received] == [failed["id"]] * 4

    # The CLI and the client show the same.
    run = await asyncio.to_thread(cli, stack.settings, tmp_path, "webhooks", job["id"])
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1].split()[:5] == [failed["id"], "completed", "delivered", "4", "200"]
    # Nobody else's: another owner sees no delivery and cannot redeliver one.
    assert await stack.db.deliveries.of_job(uuid.UUID(job["id"]), "someone-else") == []
    assert (
        await stack.db.deliveries.redeliver(uuid.UUID(job["id"]), uuid.UUID(failed["id"]), "someone-else")
        is None
    )
    missing = await stack.client.post(f"/v1/jobs/{job['id']}/webhooks/{uuid.uuid4()}/redeliver")
    assert_problem(missing, 404)
    assert_problem(await stack.client.get(f"/v1/jobs/{uuid.uuid4()}/webhooks"), 404)


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


# -- hostile receivers ---------------------------------------------------------

FLOOD_BYTES = 256 * 2**20  # what the flooding receiver sends before it stalls; the old sender kept it all
CHUNK = b"x" * 2**20


@dataclass
class Hostile:
    """A loopback receiver that misbehaves; what it saw."""

    url: str = ""
    connected_at: list[float] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    sent_bytes: int = 0


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Hostile], Awaitable[None]]


async def until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Hostile) -> None:
    while await reader.read(65536):  # until the sender hangs up
        pass


async def hang_before_answering(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Hostile
) -> None:
    await until_closed(reader, writer, state)


async def hang_after_headers(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Hostile
) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
    await until_closed(reader, writer, state)


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Hostile) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
    while True:  # one byte at a time, each well within any per-read time-out
        writer.write(b"a")
        await writer.drain()
        await asyncio.sleep(0.2)


async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Hostile) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4294967296\r\n\r\n")
    while state.sent_bytes < FLOOD_BYTES:
        writer.write(CHUNK)
        await writer.drain()
        state.sent_bytes += len(CHUNK)
    await until_closed(reader, writer, state)


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Hostile) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # a TCP RST instead of an answer


@contextlib.asynccontextmanager
async def hostile(behaviour: Behaviour) -> AsyncIterator[Hostile]:
    state = Hostile()
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(task := asyncio.current_task())  # type: ignore[arg-type]
        state.connected_at.append(time.monotonic())
        state.open_now += 1
        state.most_open = max(state.most_open, state.open_now)
        try:
            await reader.readuntil(b"\r\n\r\n")  # the request's head
            await behaviour(reader, writer, state)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the sender hung up
        finally:
            state.open_now -= 1
            writer.transport.abort()
            handlers.discard(task)  # type: ignore[arg-type]

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    try:
        yield state
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def memory_mib(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


HOSTILE = {
    "webhook_allow_private": True,
    "webhook_timeout_s": 1.0,
    "webhook_backoff_s": (0.5, 0.5),
    "webhook_poll_s": 0.1,
}


@pytest.mark.parametrize("settings", [HOSTILE], indirect=True)
async def test_hostile_receivers_cost_one_slot_for_one_deadline_and_a_few_kib(
    settings: Settings, spawn: Callable[[str, Settings], Awaitable[Any]], receiver: Receiver
) -> None:
    server = await spawn("server.app", settings)
    pid = server.process.pid
    async with (
        httpx.AsyncClient(base_url=server.base_url, timeout=10) as client,
        hostile(flood) as flooding,
        hostile(trickle) as trickling,
        hostile(hang_after_headers) as stalling,
        hostile(reset) as resetting,
    ):
        db = await Database.connect(settings.database_url, max_size=2)
        try:
            warm_up = await canceled_job_with_webhook(client, f"{receiver.url}/hook")
            await eventually(lambda: delivered(db, warm_up))
            rss_before = memory_mib(pid, "VmRSS")

            bad = {
                name: await canceled_job_with_webhook(client, receiver.url)
                for name, receiver in [
                    ("flood", flooding), ("trickle", trickling), ("stall", stalling), ("reset", resetting)
                ]
            }  # fmt: skip
            await eventually(lambda: asyncio.sleep(0, all(r.connected_at for r in (trickling, stalling))), 10)

            # Another delivery, made while the bad ones are in flight, goes at once.
            # (The old sender waited for its whole batch: the trickle held it for ever.)
            good = await canceled_job_with_webhook(client, f"{receiver.url}/hook")
            await eventually(lambda: delivered(db, good), timeout_s=10)
            assert (await client.get("/readyz", timeout=2)).status_code == 200

            rows = {name: await settled_row(db, job_id) for name, job_id in bad.items()}
        finally:
            await db.close()
        peak_mib = memory_mib(pid, "VmHWM")

    assert peak_mib - rss_before < 64, f"the server grew from {rss_before:.0f} to {peak_mib:.0f} MiB"
    flooded = rows.pop("flood")  # a 200 is a 200; the rest of its body is not read
    assert (flooded["status"], flooded["last_status"]) == ("delivered", 200)
    assert flooding.sent_bytes < FLOOD_BYTES
    for name, row in rows.items():  # each attempt recorded, retried per the schedule, then given up
        assert (row["status"], row["attempts"]) == ("failed", 3), name
        assert row["last_error"].endswith("; gave up after 3 attempts"), row["last_error"]
    assert "no complete answer within 1 s" in rows["trickle"]["last_error"]
    assert "no complete answer within 1 s" in rows["stall"]["last_error"]
    for state in (trickling, stalling, resetting):
        assert len(state.connected_at) == 3
        gaps = [b - a for a, b in zip(state.connected_at, state.connected_at[1:], strict=False)]
        assert all(gap >= 0.4 for gap in gaps), gaps  # back-off 0.5 s, jitter +-20%


async def delivered(db: Database, job_id: str) -> bool:
    status = await db.pool.fetchval(
        "SELECT status FROM webhook_deliveries WHERE job_id = $1", uuid.UUID(job_id)
    )
    return bool(status == "delivered")


async def settled_row(db: Database, job_id: str) -> Any:
    async def done() -> Any:
        row = await db.pool.fetchrow("SELECT * FROM webhook_deliveries WHERE job_id = $1", uuid.UUID(job_id))
        return row if row is not None and row["status"] != "pending" else None

    return await eventually(done, timeout_s=20)


@pytest.mark.parametrize(
    "settings",
    [{"webhook_poll_s": 3600, "webhook_allow_private": True, "webhook_timeout_s": 0.5,
      "webhook_backoff_s": (), "webhook_max_concurrent": 2}],
    indirect=True,
)  # fmt: skip
async def test_at_most_max_concurrent_deliveries_are_in_flight(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    async with hostile(hang_before_answering) as hanging:
        job_ids = [await canceled_job_with_webhook(client, hanging.url) for _ in range(3)]
        db = await Database.connect(settings.database_url, max_size=2)
        try:
            async with open_storage(settings) as storage:
                assert await WebhookSender(db, storage, settings).tick() == 3
            rows = [await settled_row(db, job_id) for job_id in job_ids]
        finally:
            await db.close()
    assert hanging.most_open == 2 and len(hanging.connected_at) == 3
    for row in rows:
        assert (row["status"], row["attempts"]) == ("failed", 1)
        assert row["last_error"] == "no complete answer within 0.5 s; gave up after 1 attempts"


@pytest.mark.parametrize(
    "settings",
    [
        {
            "webhook_poll_s": 3600,
            "webhook_allow_private": True,
            "webhook_timeout_s": 30,
            "webhook_backoff_s": (0.1,),
        }
    ],
    indirect=True,
)
async def test_an_attempt_counts_before_it_is_sent_so_dying_senders_do_not_loop(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    async with hostile(hang_before_answering) as hanging:
        job_id = await canceled_job_with_webhook(client, hanging.url)
        db = await Database.connect(settings.database_url, max_size=4)
        try:
            async with open_storage(settings) as storage:
                for attempt in (1, 2):  # a sender dies (OOM, SIGKILL) in the middle of each attempt
                    sender = asyncio.create_task(WebhookSender(db, storage, settings).run())
                    await eventually(lambda n=attempt: asyncio.sleep(0, len(hanging.connected_at) == n))
                    row = await db.pool.fetchrow(
                        "SELECT * FROM webhook_deliveries WHERE job_id = $1", uuid.UUID(job_id)
                    )
                    assert (row["status"], row["attempts"]) == ("pending", attempt)
                    await cancel_and_wait(sender)
                    await db.pool.execute(
                        "UPDATE webhook_deliveries SET next_attempt_at = now()"
                    )  # lease over
                # The first sender's outcome, late, is not recorded over the second attempt.
                assert not await db.deliveries.record(
                    row["id"], attempt=1, status="delivered", retry_in_s=None, http_status=200, error=None
                )
                assert await WebhookSender(db, storage, settings).tick() == 1
            row = await db.pool.fetchrow(
                "SELECT * FROM webhook_deliveries WHERE job_id = $1", uuid.UUID(job_id)
            )
        finally:
            await db.close()
    assert len(hanging.connected_at) == 2  # not sent a third time
    assert (row["status"], row["attempts"], row["last_status"]) == ("failed", 2, None)
    assert row["last_error"] == "gave up after 2 attempts (the last one ended without an outcome)"
