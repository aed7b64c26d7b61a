"""The OpenAPI document: valid, in step with the routes, and true of real answers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from server.app import create_app
from server.openapi import document
from stepcast.cli.processes import LocalPostgres
from stepcast.settings import Settings
from tests.conftest import Stack
from tests.test_auth import bearer, make_key


def schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    """A component schema with its $refs resolvable."""
    return {"$ref": f"#/components/schemas/{name}", "components": document["components"]}


async def test_the_document_is_valid_openapi(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_every_route_is_documented_and_every_documented_route_exists(settings: Settings) -> None:
    app = create_app(settings)
    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    paths = document(settings)["paths"]
    documented = {
        (path.replace("{key}", "{key:path}"), method) for path, item in paths.items() for method in item
    }
    assert served == documented


async def test_real_answers_match_the_schemas(stack: Stack) -> None:
    document = (await stack.client.get("/openapi.json")).json()
    job = await stack.wait((await stack.submit(steps=2, preview={"every": 1}))["id"])
    jsonschema.validate(job, schema(document, "Job"))
    page = (await stack.client.get("/v1/jobs")).json()
    jsonschema.validate(page, schema(document, "JobPage"))
    problem = (await stack.client.post("/v1/jobs", json={"prompt": "", "steps": 0})).json()
    jsonschema.validate(problem, schema(document, "Problem"))


BODIES = [
    {"prompt": "a fox"},
    {"prompt": "a fox", "steps": 150, "width": 1024, "height": 64, "seed": 0, "num_images": 4},
    {"prompt": "a fox", "scheduler": "ddim", "guidance_scale": 0, "preview": {"every": 2, "max_px": 16}},
    {"prompt": ""},
    {"prompt": "a fox", "steps": 0},
    {"prompt": "a fox", "steps": 151},
    {"prompt": "a fox", "width": 68},
    {"prompt": "a fox", "width": 2048},
    {"prompt": "a fox", "seed": -1},
    {"prompt": "a fox", "num_images": 5},
    {"prompt": "a fox", "scheduler": "plms"},
    {"prompt": "a fox", "guidance_scale": 51},
    {"prompt": "a fox", "step": 20},
    {"prompt": "a fox", "preview": {"every": 0}},
    {"steps": 20},
]


async def test_the_server_accepts_exactly_what_the_document_allows(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    request = schema(document, "JobRequest")
    for body in BODIES:
        allowed = jsonschema.Draft202012Validator(request).is_valid(body)
        status = (await client.post("/v1/jobs", json=body)).status_code
        assert (status == 202) == allowed, (body, status)


@pytest.mark.parametrize("settings", [{"auth": "keys"}], indirect=True)
async def test_owned_paths_declare_their_credentials(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    validate(document)
    create = document["paths"]["/v1/jobs"]["post"]
    assert "401" in create["responses"] and {"apiKey": []} in create["security"]
    for public in ("/healthz", "/v1/limits", "/openapi.json", "/metrics"):
        assert "security" not in document["paths"][public]["get"]
        assert "401" not in document["paths"][public]["get"]["responses"], public


async def answer_every_operation(
    client: httpx.AsyncClient, document: dict[str, Any], headers: dict[str, str] | None = None
) -> list[tuple[str, str, httpx.Response]]:
    """One request to each documented operation: (path, method, answer)."""
    answers = []
    for path, item in document["paths"].items():
        for method in item:
            url = path.replace("{job_id}", str(uuid.uuid4())).replace("{key}", f"{uuid.uuid4()}/0.png")
            url = url.replace("{delivery_id}", str(uuid.uuid4()))
            body = {"prompt": "a fox", "steps": 1} if path == "/v1/jobs" and method == "post" else None
            answers.append((path, method, await client.request(method, url, json=body, headers=headers)))
    return answers


def undocumented(document: dict[str, Any], answers: list[tuple[str, str, httpx.Response]]) -> list[str]:
    """Answers whose status or content type the document does not give for that operation."""
    wrong = []
    for path, method, answer in answers:
        documented = document["paths"][path][method]["responses"].get(str(answer.status_code))
        media_type = answer.headers.get("content-type", "").split(";")[0]
        if documented is None or media_type not in documented.get("content", {media_type: {}}):
            wrong.append(f"{method.upper()} {path}: {answer.status_code} {media_type}")
    return wrong


@pytest.mark.parametrize("settings", [{"auth": "keys", "requests_per_s_per_owner": 1}], indirect=True)
async def test_every_route_documents_the_rate_limit_it_answers(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    _, key = await make_key(settings, "hasty")
    document = (await client.get("/openapi.json")).json()
    answers = []
    for _ in range(3):  # one second's share is one request: the later ones are refused
        answers += await answer_every_operation(client, document, bearer(key))
    assert undocumented(document, answers) == []
    limited = {(path, method) for path, method, answer in answers if answer.status_code == 429}
    owned = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if "security" in item[method]
    }
    assert limited == owned and len(owned) == 9


async def test_every_route_documents_what_it_answers_while_postgres_is_down(
    make_settings: Callable[..., Settings],
    own_postgres: tuple[LocalPostgres, str],
    serve: Callable[[Settings], Awaitable[str]],
) -> None:
    postgres, database_url = own_postgres
    async with httpx.AsyncClient(base_url=await serve(make_settings(database_url=database_url))) as client:
        document = (await client.get("/openapi.json")).json()
        await asyncio.to_thread(postgres.stop)
        answers = await answer_every_operation(client, document)
    assert undocumented(document, answers) == []
    down = {
        f"{method.upper()} {path}": answer for path, method, answer in answers if answer.status_code == 503
    }
    reads_postgres = {"GET /readyz", "GET /metrics"} | {
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
        if path.startswith(("/v1/jobs", "/v1/images", "/v1/me"))
    }  # fmt: skip
    assert set(down) == reads_postgres
    # A store restarting is worth waiting a second for.
    assert all(answer.headers["retry-after"] == "1" for name, answer in down.items() if name != "GET /readyz")
