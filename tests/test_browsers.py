"""What another site's page, in the user's own browser, cannot make this server do.

A browser sends some requests across sites without asking first (forms, no-CORS
fetches: "simple requests"), attaching the session cookie, or nothing at all in
``single_user`` mode; DNS rebinding points a hostile name at a loopback server.
Each test plays that page's requests with the headers a browser would send."""

from __future__ import annotations

import httpx
import pytest

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
