"""What another site's page, in the user's own browser, cannot make this server do.

A browser sends some requests across sites without asking first (forms, no-CORS
fetches: "simple requests"), attaching the session cookie, or nothing at all in
``single_user`` mode; DNS rebinding points a hostile name at a loopback server.
Each test plays that page's requests with the headers a browser would send."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from stepcast.settings import Settings
from tests.conftest import assert_problem
from tests.test_auth import KEYS

EVIL = "http://evil.example"


async def test_a_post_body_is_read_only_as_declared_json(client: httpx.AsyncClient) -> None:
    body = b'{"prompt": "a fox from another site", "steps": 2}'
    # fetch(url, {method: "POST", mode: "no-cors", body: new Blob([json])}) sends no Content-Type
    for headers, sent in (({}, "none"), ({"content-type": "text/plain"}, "'text/plain'")):
        problem = assert_problem(await client.post("/v1/jobs", content=body, headers=headers), 415)
        [error] = problem["errors"]
        assert error["field"] == "Content-Type" and error["message"].endswith(f"this request sent {sent}")
    assert (await client.get("/v1/jobs")).json()["items"] == []  # nothing was made
    declared = {"content-type": "application/vnd.stepcast+json; charset=utf-8"}
    assert (await client.post("/v1/jobs", content=body, headers=declared)).status_code == 202


async def cross_site_cancel(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """Another site's page cancels a job: refused; the job is untouched; the page itself may."""
    job = (await client.post("/v1/jobs", json={"prompt": "p", "steps": 2}, headers=headers)).json()
    cancel = f"/v1/jobs/{job['id']}/cancel"
    for origin in (EVIL, "null"):  # a form post; a sandboxed frame or a data: URL
        problem = assert_problem(await client.post(cancel, headers={**headers, "Origin": origin}), 403)
        assert problem["errors"][0]["field"] == "Origin" and origin in problem["detail"]
    submitted = await client.post("/v1/jobs", json={"prompt": "p"}, headers={**headers, "Origin": EVIL})
    assert_problem(submitted, 403)
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).json()["status"] == "pending"
    own = {**headers, "Origin": str(client.base_url)}
    assert (await client.post(cancel, headers=own)).json()["status"] == "canceled"


async def test_single_user_mode_refuses_other_sites_changes(client: httpx.AsyncClient) -> None:
    await cross_site_cancel(client, {})


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_a_session_cookie_changes_nothing_for_another_site(client: httpx.AsyncClient) -> None:
    cookie = (await client.get("/")).headers["set-cookie"].split(";")[0]
    await cross_site_cancel(client, {"Cookie": cookie})


async def upgrade_status(settings: Settings, host: str) -> int:
    """The status a WebSocket upgrade for ``host`` gets, sent over a loopback connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
    try:
        writer.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://{host}\r\n\r\n".encode()
        )
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def test_single_user_mode_answers_only_to_loopback_names(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    port = settings.port
    # DNS rebinding: evil.example now resolves to 127.0.0.1, and its page asks for the history.
    rebound = await client.get("/v1/jobs", headers={"Host": f"evil.example:{port}"})
    [error] = assert_problem(rebound, 400)["errors"]
    assert error["field"] == "Host" and "evil.example" in error["message"]
    assert "STEPCAST_ALLOWED_HOSTS" in error["message"]
    assert_problem(await client.get("/", headers={"Host": "evil.example"}), 400)
    assert await upgrade_status(settings, f"evil.example:{port}") == 403
    assert await upgrade_status(settings, f"127.0.0.1:{port}") == 101
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert (await client.get("/v1/jobs", headers={"Host": name})).status_code == 200, name
    for path in ("/healthz", "/readyz", "/metrics"):  # a probe by the pod's IP
        assert (await client.get(path, headers={"Host": "10.1.2.3:8000"})).status_code == 200, path


@pytest.mark.parametrize(
    "settings",
    [{**KEYS[0], "allowed_hosts": ("stepcast.example.com", "*.stepcast.internal")}],
    indirect=True,
)
async def test_allowed_hosts_names_what_the_server_answers_to(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    for name in ("stepcast.example.com", "a.b.stepcast.internal:443", "Stepcast.Example.Com."):
        assert (await client.get("/v1/limits", headers={"Host": name})).status_code == 200, name
    for name in ("example.com", "stepcast.internal", "evilstepcast.internal", f"127.0.0.1:{settings.port}"):
        assert_problem(await client.get("/v1/limits", headers={"Host": name}), 400)
    assert await upgrade_status(settings, f"127.0.0.1:{settings.port}") == 403
    page = await client.get("/", headers={"Host": "elsewhere.example"})
    assert_problem(page, 400)
    assert "set-cookie" not in page.headers  # no session handed out under a stranger's name


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_keys_mode_answers_to_any_name_by_default(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/limits", headers={"Host": "10.1.2.3:8000"})).status_code == 200


@pytest.mark.parametrize("settings", KEYS, indirect=True)
async def test_the_session_cookie_is_secure_behind_a_tls_proxy(client: httpx.AsyncClient) -> None:
    async def cookie(headers: dict[str, str]) -> str:
        async with httpx.AsyncClient(base_url=client.base_url) as fresh:  # no session yet
            return (await fresh.get("/", headers=headers)).headers["set-cookie"]

    # The test talks from 127.0.0.1, a trusted proxy by default (STEPCAST_TRUSTED_PROXIES).
    assert "; Secure" in await cookie({"X-Forwarded-Proto": "https"})
    assert "Secure" not in await cookie({})


@pytest.mark.parametrize("settings", [{**KEYS[0], "trusted_proxies": ("10.0.0.0/8",)}], indirect=True)
async def test_an_untrusted_peer_cannot_claim_tls(client: httpx.AsyncClient) -> None:
    response = await client.get("/", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" not in response.headers["set-cookie"]
