"""The OpenAPI 3.1 document of the REST API, served at ``GET /openapi.json``.

Written here rather than inferred: the handlers parse their input by hand (to
name every bad field), so the document states the contract and the tests keep
the two together — every route is documented and every documented route
exists, and real answers validate against these schemas. Limits come from the
settings, so the document describes this server, not a default one. The
WebSocket and SSE protocols are in docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stepcast import __version__
from stepcast.jobs import Status
from stepcast.params import (
    DEFAULT_WEBHOOK_EVENTS,
    MAX_GUIDANCE,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_SEED,
    MAX_SEQ,
    MAX_URL_CHARS,
    PREVIEW_MAX_PX,
    SCHEDULERS,
    WEBHOOK_EVENTS,
)
from stepcast.settings import Settings

PROBLEM = "application/problem+json"
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_SEQ = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {PROBLEM: {"schema": _ref("Problem")}}}
    if headers:
        answer["headers"] = headers
    return answer


def _job(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref("Job")}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
NOT_FOUND = _problem("No such job of yours (another owner's job answers the same)")
CROSS_SITE = _problem("Sent without a key from another site's page (its Origin is not allowed)")


def _schemas(settings: Settings) -> dict[str, Any]:
    size = {
        "type": "integer",
        "minimum": settings.min_size_px,
        "maximum": settings.max_size_px,
        "multipleOf": 8,
        "default": settings.default_size_px,
    }
    params = {
        "prompt": {"type": "string", "minLength": 1, "maxLength": settings.max_prompt_chars},
        "negative_prompt": {"type": ["string", "null"], "maxLength": settings.max_prompt_chars},
        "model": {"type": "string", "enum": [settings.model_name], "default": settings.model_name},
        "steps": {
            "type": "integer",
            "minimum": 1,
            "maximum": settings.max_steps,
            "default": settings.default_steps,
        },
        "width": size,
        "height": size,
        "guidance_scale": {
            "type": "number",
            "minimum": 0,
            "maximum": MAX_GUIDANCE,
            "default": settings.default_guidance_scale,
        },
        "seed": {
            "type": ["integer", "null"],
            "minimum": 0,
            "maximum": MAX_SEED,
            "description": "random if absent",
        },
        "num_images": {"type": "integer", "minimum": 1, "maximum": settings.max_images, "default": 1},
        "scheduler": {"type": ["string", "null"], "enum": [*SCHEDULERS, None]},
    }
    preview = {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {
            "every": {"type": "integer", "minimum": 1, "maximum": settings.max_steps, "default": 1},
            "max_px": {"type": "integer", "minimum": 16, "maximum": PREVIEW_MAX_PX, "default": 128},
        },
    }
    webhook = {
        "type": ["object", "null"],
        "additionalProperties": False,
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "format": "uri", "maxLength": MAX_URL_CHARS},
            "events": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                "default": list(DEFAULT_WEBHOOK_EVENTS),
            },
        },
        "description": "Standard Webhooks deliveries, signed with GET /v1/me's webhook_secret",
    }
    image = {
        "type": "object",
        "required": ["url", "width", "height", "seed", "content_type"],
        "properties": {
            "url": {"type": "string"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "seed": {"type": "integer"},
            "content_type": {"type": "string"},
        },
    }
    job_fields = {
        "id": {"type": "string", "format": "uuid"},
        "status": {"type": "string", "enum": [s.value for s in Status]},
        "attempt": {"type": "integer", "minimum": 0},
        "owner": {"type": "string"},
        "params": {"type": "object", "properties": params},
        "progress": {
            "type": "object",
            "required": ["step", "total"],
            "properties": {"step": {"type": "integer"}, "total": {"type": "integer"}},
        },
        "queue_position": {"type": ["integer", "null"], "minimum": 1, "description": "1 = next to start"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": NULLABLE_TIME,
        "finished_at": NULLABLE_TIME,
        "result": {
            "type": ["object", "null"],
            "required": ["images"],
            "properties": {"images": {"type": "array", "items": image}},
        },
        "error": {
            "type": ["object", "null"],
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
        "timings": {
            "type": ["object", "null"],
            "properties": {
                "queue_s": {"type": ["number", "null"]},
                "run_s": {"type": ["number", "null"]},
                "pipeline_s": {"type": ["number", "null"]},
                "batch_size": {"type": ["integer", "null"], "minimum": 1},
            },
        },
        "last_seq": {"type": "integer", "minimum": 0},
        "images_expired_at": NULLABLE_TIME,
        "preview": preview,
        "webhook": webhook,
        "cancel_requested": {"type": "boolean"},
        "provenance": {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "model_revision": {"type": ["string", "null"]},
                "stepcast_version": {"type": "string"},
            },
        },
    }
    return {
        "JobRequest": {
            "type": "object",
            "required": ["prompt"],
            "additionalProperties": False,
            "properties": {**params, "preview": preview, "webhook": webhook},
        },
        "Job": {"type": "object", "required": list(job_fields), "properties": job_fields},
        "JobPage": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {
                "items": {"type": "array", "items": _ref("Job")},
                "next_cursor": {"type": ["string", "null"]},
            },
        },
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "message"],
                        "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            },
        },
    }


def _paths() -> dict[str, Any]:
    retry_after = {"Retry-After": _header("Seconds to wait before asking again", "integer")}
    location = {"Location": _header("The job's URL")}
    plain = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    return {
        "/v1/jobs": {
            "post": {
                "summary": "Submit a job",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS},
                        "description": "A repeat returns the first job; with other params it answers 409",
                    },
                    {
                        "name": "Prefer",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "wait=\\d+"},
                        "description": "wait=N (N <= 60): hold the answer until the job ends or N s pass",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("JobRequest")}},
                },
                "responses": {
                    "201": _job("Finished within Prefer: wait", location),
                    "202": _job("Accepted (or a replay of an idempotency key)", location),
                    "400": _problem("Body is not JSON"),
                    "403": CROSS_SITE,
                    "409": _problem("Idempotency key reused with other params"),
                    "413": _problem("Body too large"),
                    "415": _problem("Content-Type not application/json (or +json)"),
                    "422": _problem("Invalid params, one entry per field"),
                    "429": _problem("Queue full", retry_after),
                    "503": _problem("Postgres or Redis unavailable for a moment", retry_after),
                },
            },
            "get": {
                "summary": "Your jobs, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in Status]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "A page",
                        "content": {"application/json": {"schema": _ref("JobPage")}},
                    },
                    "422": _problem("Bad query parameter"),
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "One job",
                "parameters": [JOB_ID],
                "responses": {"200": _job("The job", retry_after), "404": NOT_FOUND},
            }
        },
        "/v1/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a job in any state",
                "parameters": [JOB_ID],
                "responses": {
                    "200": _job("Canceled (it was pending)"),
                    "202": _job("Stops at its next denoising step"),
                    "403": CROSS_SITE,
                    "404": NOT_FOUND,
                    "409": _problem("Already finished"),
                },
            }
        },
        "/v1/jobs/{job_id}/events": {
            "get": {
                "summary": "The job's events as Server-Sent Events (docs/protocol.md)",
                "parameters": [
                    JOB_ID,
                    {"name": "Last-Event-ID", "in": "header", "schema": _SEQ},
                    {"name": "after_seq", "in": "query", "schema": _SEQ},
                ],
                "responses": {
                    "200": {"description": "An event stream", "content": {"text/event-stream": {}}},
                    "404": NOT_FOUND,
                    "422": _problem("Bad Last-Event-ID"),
                },
            }
        },
        "/v1/images/{key}": {
            "get": {
                "summary": "An image (local storage)",
                "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "The image", "content": {"image/png": {}}},
                    "404": _problem("No such image of yours"),
                    "410": _problem("Deleted by retention"),
                },
            }
        },
        "/v1/me": {"get": {"summary": "Who you are: {owner, auth, webhook_secret}", "responses": plain}},
        "/v1/limits": {"get": {"summary": "What a job may ask for here", "responses": plain}},
        "/healthz": {"get": {"summary": "Liveness", "responses": plain}},
        "/readyz": {
            "get": {
                "summary": "Readiness: Postgres and Redis reachable",
                "responses": {**plain, "503": {"description": "Not ready, naming what is down"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {"description": "Text exposition format", "content": {"text/plain": {}}},
                    "401": {"description": "STEPCAST_METRICS_TOKEN is set and not sent as Bearer"},
                },
            }
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": plain}},
    }


# Paths that need an owner (an API key or the page's session) unless STEPCAST_AUTH=single_user.
OWNED = ("/v1/jobs", "/v1/images", "/v1/me")
SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {"session": []}]


def document(settings: Settings) -> dict[str, Any]:
    paths = _paths()
    if settings.auth == "keys":
        for path, item in paths.items():
            if path.startswith(OWNED):
                for operation in item.values():
                    operation["security"] = SECURITY
                    operation["responses"]["401"] = _problem("No valid API key or session")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stepcast",
            "version": __version__,
            "description": "Submit a prompt, get a job id at once, watch every denoising step. "
            "Real-time: WebSocket /v1/ws and SSE, see docs/protocol.md.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(settings),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "`stepcast keys create`"},
                "session": {"type": "apiKey", "in": "cookie", "name": "stepcast_session"},
            },
        },
    }


async def endpoint(request: Request) -> Response:
    return JSONResponse(document(request.state.services.settings))
