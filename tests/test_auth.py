"""Owners, API keys and browser sessions (STEPCAST_AUTH=keys, the default).

Keys are made and revoked with the real CLI against the test database; every
interface refuses a caller without credentials, and another owner's job is
not found anywhere (404, like a job that does not exist)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stepcast import credentials
from stepcast.settings import Settings
from tests.conftest import Stack, assert_problem

SESSION_SECRET = "9c1f4e7a2b8d06f3" * 4  # 64 hex characters, like `openssl rand -hex 32`
KEYS = [{"auth": "keys", "session_secret": SESSION_SECRET}]


def stepcast_keys(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STEPCAST_DATABASE_URL": settings.database_url}
    command = [sys.executable, "-m", "stepcast.cli", "keys", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


async def make_key(settings: Settings, owner: str) -> tuple[str, str]:
    """(key id, key) made by `stepcast keys create`."""
    run = await asyncio.to_thread(stepcast_keys, settings, "create", "--owner", owner, "--name", "test")
    assert run.returncode == 0, run.stderr
    fields = dict(line.split(maxsplit=1) for line in run.stdout.splitlines() if line.strip())
    fields["id"] = run.stdout.split("key id", 1)[1].split()[0]
    return fields["id"], fields["key"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ws_url(stack: Stack) -> str:
    return str(stack.client.base_url).replace("http://", "ws://") + "/v1/ws"


async def ws_ask(stack: Stack, headers: dict[str, str], message: dict[str, Any]) -> dict[str, Any]:
    async with websockets.connect(ws_url(stack), additional_headers=headers) as ws:
        await ws.send(json.dumps(message))
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return answer


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_without_credentials_nothing_is_served(stack: Stack) -> None:
    job_id = "6f1c0000-0000-4000-8000-000000000000"
    for method, path in [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/images/{job_id}/0.png"),
        ("GET", "/v1/me"),
    ]:
        response = await stack.client.request(
            method, path, json={"prompt": "p"} if method == "POST" else None
        )
        body = assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer"), path
        assert "stepcast keys create" in body["detail"]
    wrong = await stack.client.get("/v1/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert "Bearer <api key>" in assert_problem(wrong, 401)["detail"]
    with pytest.raises(InvalidStatus) as refused:  # refused at the upgrade: no frame is ever sent
        await ws_ask(stack, {}, {"type": "ping"})
    assert refused.value.response.status_code == 403
    for public in ("/healthz", "/v1/limits", "/openapi.json", "/metrics"):
        assert (await stack.client.get(public)).status_code == 200, public


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_keys_are_hashed_and_owners_see_only_their_own(stack: Stack) -> None:
    alice_id, alice = await make_key(stack.settings, "alice")
    _, bob = await make_key(stack.settings, "bob")
    assert alice.startswith("sk_") and len(alice) > 40
    stored = await stack.db.pool.fetch("SELECT * FROM api_keys")
    assert all(alice not in str(dict(row).values()) for row in stored)  # only its hash is kept

    me = (await stack.client.get("/v1/me", headers=bearer(alice))).json()
    assert (me["owner"], me["auth"]) == ("alice", "keys") and me["webhook_secret"].startswith("whsec_")
    bobs = (await stack.client.get("/v1/me", headers=bearer(bob))).json()["webhook_secret"]
    assert bobs != me["webhook_secret"]  # one signing secret per owner
    submitted = await stack.client.post(
        "/v1/jobs", json={"prompt": "alice's fox", "steps": 2}, headers=bearer(alice)
    )
    job = await stack.wait_as(submitted.json()["id"], bearer(alice))
    assert job["owner"] == "alice" and job["status"] == "completed"
    image = job["result"]["images"][0]["url"]

    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("GET", image),
    ]:
        assert_problem(await stack.client.request(method, path, headers=bearer(bob)), 404)
    assert (await stack.client.get("/v1/jobs", headers=bearer(bob))).json()["items"] == []
    # Idempotency keys are per owner: bob reusing alice's key makes bob's own job.
    keyed = {"Idempotency-Key": "shared-key"}
    fox = {"prompt": "a shared fox", "steps": 2}
    first = await stack.client.post("/v1/jobs", json=fox, headers={**bearer(alice), **keyed})
    other = await stack.client.post("/v1/jobs", json=fox, headers={**bearer(bob), **keyed})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert other.json()["owner"] == "bob" and "idempotent-replayed" not in other.headers
    assert (await stack.client.get(image, headers=bearer(alice))).status_code == 200
    for message in (
        {"type": "subscribe", "job_id": job["id"]},
        {"type": "cancel", "job_id": job["id"]},
    ):
        answer = await ws_ask(stack, bearer(bob), message)
        assert answer["type"] == "error" and answer["code"] == "not_found"
    snapshot = await ws_ask(stack, bearer(alice), {"type": "subscribe", "job_id": job["id"]})
    assert snapshot["type"] == "snapshot" and snapshot["job"]["owner"] == "alice"

    revoked = await asyncio.to_thread(stepcast_keys, stack.settings, "revoke", alice_id)
    assert revoked.returncode == 0
    listed = await asyncio.to_thread(stepcast_keys, stack.settings, "list")
    assert (
        f"{alice_id}  {alice[:10]}…  alice  test  interactive  revoked" in listed.stdout
    )  # (the default class)
    assert (
        "unknown or revoked"
        in assert_problem(await stack.client.get("/v1/me", headers=bearer(alice)), 401)["detail"]
    )
    again = await asyncio.to_thread(stepcast_keys, stack.settings, "revoke", alice_id)
    assert again.returncode != 0 and "no active key" in again.stderr


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_the_page_gets_a_signed_session_of_its_own(stack: Stack) -> None:
    def browser(session: str | None = None) -> httpx.AsyncClient:
        cookies = {"stepcast_session": session} if session else None
        return httpx.AsyncClient(base_url=stack.client.base_url, cookies=cookies)

    async def new_session() -> httpx.Response:
        async with browser() as fresh:
            return await fresh.get("/")

    page = await new_session()
    cookie = page.headers["set-cookie"]
    assert cookie.startswith("stepcast_session=anon_") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    session = cookie.split(";")[0].split("=", 1)[1]
    async with httpx.AsyncClient(
        base_url=stack.client.base_url, cookies={"stepcast_session": session}
    ) as tab:
        owner = (await tab.get("/v1/me")).json()["owner"]
        assert owner == session.split(".")[0]
        job_id = (await tab.post("/v1/jobs", json={"prompt": "p", "steps": 2})).json()["id"]
        assert "set-cookie" not in (await tab.get("/")).headers  # a valid session is kept
    headers = {"Cookie": f"stepcast_session={session}", "Origin": str(stack.client.base_url)}
    answer = await ws_ask(stack, headers, {"type": "subscribe", "job_id": job_id})
    assert answer["type"] == "snapshot" and answer["job"]["owner"] == owner

    other = (await stack.client.get("/")).headers["set-cookie"].split(";")[0].split("=", 1)[1]
    assert other != session
    async with httpx.AsyncClient(
        base_url=stack.client.base_url, cookies={"stepcast_session": other}
    ) as stranger:
        assert (await stranger.get(f"/v1/jobs/{job_id}")).status_code == 404
    forged = "anon_0000000000000000." + session.split(".")[1]  # someone else's id, this signature
    async with httpx.AsyncClient(
        base_url=stack.client.base_url, cookies={"stepcast_session": forged}
    ) as forger:
        assert (await forger.get("/v1/me")).status_code == 401


async def page_loads(base_url: str, forwarded_for: list[str | None]) -> list[httpx.Response]:
    """Load the page once per entry, each time without a cookie (a new browser, or a script)."""
    answers = []
    for address in forwarded_for:
        headers = {"X-Forwarded-For": address} if address else {}
        async with httpx.AsyncClient(base_url=base_url) as fresh:
            answers.append(await fresh.get("/", headers=headers))
    return answers


@pytest.mark.parametrize("settings", [{**KEYS[0], "sessions_per_min_per_address": 3}], indirect=True)
async def test_cookie_less_page_loads_are_limited_per_address(stack: Stack) -> None:
    base_url = str(stack.client.base_url)
    first, *_, refused = await page_loads(base_url, [None] * 4)
    assert [r.status_code for r in _] == [200, 200]
    assert first.status_code == 200 and "set-cookie" in first.headers
    body = assert_problem(refused, 429)
    assert body["type"].endswith("rate_limited") and "3 new sessions a minute" in body["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60 and "set-cookie" not in refused.headers
    # A session made before is kept, and a key holder is not limited by it.
    session = first.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    async with httpx.AsyncClient(base_url=base_url, cookies={"stepcast_session": session}) as tab:
        assert (await tab.get("/")).status_code == 200
        assert (await tab.get("/v1/me")).status_code == 200
    _, key = await make_key(stack.settings, "alice")
    assert (await stack.client.get("/v1/me", headers=bearer(key))).json()["owner"] == "alice"


async def test_x_forwarded_for_names_the_client_only_from_a_trusted_proxy(
    make_settings: Any, serve: Any
) -> None:
    limited = {**KEYS[0], "sessions_per_min_per_address": 2}
    # The test's peer is 127.0.0.1: not a trusted proxy here, so its header is a spoof.
    untrusted = await serve(make_settings(**limited, trusted_proxies=("192.0.2.1",)))
    spoofed = await page_loads(untrusted, ["198.51.100.1", "198.51.100.2", "198.51.100.3"])
    assert [r.status_code for r in spoofed] == [200, 200, 429]
    # Behind a trusted proxy (loopback, the default) each forwarded client counts alone.
    trusted = await serve(make_settings(**limited))
    forwarded = await page_loads(trusted, ["198.51.100.1", "198.51.100.2", "198.51.100.3"])
    assert [r.status_code for r in forwarded] == [200, 200, 200]
    again = await page_loads(trusted, ["198.51.100.1", "198.51.100.1"])
    assert [r.status_code for r in again] == [200, 429]


def session_of(response: httpx.Response) -> str:
    """The session cookie a page load set."""
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("stepcast_session="), cookie
    return cookie.split(";")[0].split("=", 1)[1]


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_a_session_carries_a_signed_expiry(client: httpx.AsyncClient, settings: Settings) -> None:
    def cookie(session: str) -> dict[str, bytes]:
        return {"Cookie": f"stepcast_session={session}".encode()}  # bytes: any UTF-8 gets through

    async def me(session: str) -> httpx.Response:
        return await client.get("/v1/me", headers=cookie(session))

    async def page(session: str) -> httpx.Response:
        return await client.get("/", headers=cookie(session))

    session = session_of(await client.get("/"))
    owner, expires_at, _ = session.split(".")
    assert abs(int(expires_at) - (time.time() + settings.session_max_age_s)) < 60
    assert (await me(session)).json()["owner"] == owner

    secret = SESSION_SECRET.encode()
    expired = credentials.sign_session(secret, owner, expires_at=int(time.time()) - 1)
    stretched = f"{owner}.{int(expires_at) + 10**6}.{session.split('.')[2]}"  # a later expiry, same signature
    digest = hmac.new(secret, owner.encode(), hashlib.sha256).digest()
    old_form = f"{owner}." + base64.urlsafe_b64encode(digest).decode().rstrip("=")  # no expiry inside
    for refused in (expired, stretched, old_form, "anon_x.1.\u00e9"):
        assert "no credentials" in assert_problem(await me(refused), 401)["detail"], refused
        renewed = session_of(await page(refused))  # the page hands out a new session at once
        assert renewed.split(".")[0] != owner and (await me(renewed)).status_code == 200
    assert "set-cookie" not in (await page(session)).headers  # a valid session is kept


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_revoking_a_key_ends_its_open_sockets_and_streams(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    carol_id, carol = await make_key(settings, "carol")
    _, dave = await make_key(settings, "dave")
    submitted = await client.post("/v1/jobs", json={"prompt": "p", "steps": 2}, headers=bearer(carol))
    job_id = submitted.json()["id"]  # no worker here: it stays pending, its streams stay open
    url = str(client.base_url).replace("http://", "ws://") + "/v1/ws"
    async with (
        websockets.connect(url, additional_headers=bearer(carol)) as ws,
        websockets.connect(url, additional_headers=bearer(dave)) as bystander,
        client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(carol)) as sse,
    ):
        await ws.send(json.dumps({"type": "subscribe", "job_id": job_id}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"
        lines = sse.aiter_lines()
        while await asyncio.wait_for(anext(lines), 10) != "event: snapshot":
            pass

        revoked = await asyncio.to_thread(stepcast_keys, settings, "revoke", carol_id)
        assert revoked.returncode == 0, revoked.stderr
        revoked_at = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # queue updates may come first
                await asyncio.wait_for(ws.recv(), 15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert closed.value.rcvd.reason == "API key revoked"
        rest = [line async for line in lines]  # the stream ends
        assert time.monotonic() - revoked_at < 6  # STEPCAST_KEY_CHECK_S is 2 s
        error = json.loads(rest[rest.index("event: error") + 1].removeprefix("data: "))
        assert (error["type"], error["code"]) == ("error", "unauthorized") and "revoked" in error["message"]

        await bystander.send(json.dumps({"type": "ping"}))  # another key's socket lives on
        assert json.loads(await asyncio.wait_for(bystander.recv(), 10)) == {"type": "pong"}
    with pytest.raises(InvalidStatus):  # and the revoked key opens no new one
        async with websockets.connect(url, additional_headers=bearer(carol)):
            pass


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_a_key_is_made_in_a_priority_class_and_an_unknown_class_is_refused(settings: Settings) -> None:
    made = await asyncio.to_thread(stepcast_keys, settings, "create", "--owner", "carol", "--class", "batch")
    assert made.returncode == 0 and "class   batch" in made.stdout
    listed = await asyncio.to_thread(stepcast_keys, settings, "list")
    assert "carol  -  batch  active" in listed.stdout
    refused = await asyncio.to_thread(stepcast_keys, settings, "create", "--class", "urgent")
    assert refused.returncode != 0
    assert "no priority class 'urgent' (STEPCAST_PRIORITY_CLASSES: batch, interactive)" in refused.stderr
