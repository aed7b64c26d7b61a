"""The OpenAPI document: valid, in step with the routes, and true of real answers."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from server.app import create_app
from server.openapi import document
from stepcast.settings import Settings
from tests.conftest import Stack


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
    assert "security" not in document["paths"]["/healthz"]["get"]
