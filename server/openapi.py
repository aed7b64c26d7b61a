"""The OpenAPI 3.1 document of the REST API, served at ``GET /openapi.json``.

Written by hand, its limits from the settings and each route's error answers from the error
classes the route raises; the tests keep the document and the routes together. Why by hand:
docs/design.md, "Interfaces". The WebSocket and SSE protocols: docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stepcast import __version__
from stepcast.errors import (
    Conflict,
    Forbidden,
    Gone,
    IdempotencyKeyReused,
    InvalidParams,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StepcastError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from stepcast.models import FALLBACK_SIZE_PX, FAMILIES, SCHEDULERS
from stepcast.params import (
    DEFAULT_WEBHOOK_EVENTS,
    MAX_GUIDANCE,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_SEED,
    MAX_SEQ,
    MAX_URL_CHARS,
    PREVIEW_MAX_PX,
    WEBHOOK_EVENTS,
)
from stepcast.settings import ServerSettings
from stepcast.status import Status

PROBLEM = "application/problem+json"
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_SEQ = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


HEADERS = {
    "Retry-After": _header("Seconds to wait before asking again", "integer"),
    "WWW-Authenticate": _header("How to authenticate: Bearer"),
}
RETRY_AFTER = {"Retry-After": HEADERS["Retry-After"]}
LOCATION = {"Location": _header("The job's URL")}


def _job(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref("Job")}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


# An error a route may raise, and what it means there. Its status and headers come
# from the error class (stepcast/errors.py), as they do when it is raised.
Raises = tuple[type[StepcastError], str]

JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
NO_JOB: Raises = (NotFound, "No such job of yours (another owner's job answers the same)")
CROSS_SITE: Raises = (Forbidden, "Sent without a key from another site's page (its Origin is not allowed)")
# Facts true of every route that finds the caller's owner (owner_of): it reads the
# stores, and with STEPCAST_AUTH=keys it needs credentials and counts the caller's requests.
OWNED = ("/v1/jobs", "/v1/images", "/v1/me")
STORES: Raises = (Unavailable, "Postgres or Redis unavailable for a moment (a restart, a failover)")
CREDENTIALS: tuple[Raises, ...] = (
    (Unauthorized, "No valid API key or session"),
    (RateLimited, "More requests in a second than STEPCAST_REQUESTS_PER_S_PER_OWNER"),
)
METRICS_TOKEN: Raises = (Unauthorized, "STEPCAST_METRICS_TOKEN is set and not sent as Authorization: Bearer")
SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {"session": []}]


@dataclass(frozen=True)
class Operation:
    summary: str
    answers: dict[str, Any]  # what it answers when it succeeds
    raises: tuple[Raises, ...] = ()
    parameters: tuple[dict[str, Any], ...] = ()
    body: dict[str, Any] | None = None

    def document(self, *, owned: bool, keys: bool) -> dict[str, Any]:
        raises = [*self.raises, *((STORES,) if owned else ()), *(CREDENTIALS if owned and keys else ())]
        operation: dict[str, Any] = {
            "summary": self.summary,
            "responses": {**self.answers, **_problems(raises)},
        }
        if self.parameters:
            operation["parameters"] = list(self.parameters)
        if self.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": self.body}},
            }
        if owned and keys:
            operation["security"] = SECURITY
        return operation


def _problems(raises: list[Raises]) -> dict[str, Any]:
    """One problem+json answer per status, naming every cause of it."""
    answers: dict[str, Any] = {}
    for kind, description in sorted(dict.fromkeys(raises), key=lambda raised: raised[0].status):
        answer = answers.setdefault(
            str(kind.status), {"description": "", "content": {PROBLEM: {"schema": _ref("Problem")}}}
        )
        answer["description"] = "; ".join(filter(None, (answer["description"], description)))
        for name in kind.header_names:
            answer.setdefault("headers", {})[name] = HEADERS[name]
    return answers


def _schemas(settings: ServerSettings) -> dict[str, Any]:
    size = {
        "type": "integer",
        "minimum": settings.min_size_px,
        "maximum": settings.max_size_px,
        "multipleOf": 8,
        "default": settings.default_size_px or FALLBACK_SIZE_PX,
        "description": "within the model's own limits (GET /v1/limits?model=)",
    }
    params = {
        "prompt": {"type": "string", "minLength": 1, "maxLength": settings.max_prompt_chars},
        "negative_prompt": {"type": ["string", "null"], "maxLength": settings.max_prompt_chars},
        "model": {
            "type": "string",
            "default": settings.model_name,
            "description": "one of GET /v1/models; each has its own limits and defaults",
        },
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
        "estimated_start_at": {
            **NULLABLE_TIME,
            "description": "while pending: when it should start, from the queue's order and pace",
        },
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
        "resumed_from_step": {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "The step a retried attempt resumes from (its checkpoint's); null: never resumed",
        },
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
    delivery = {
        "id": {"type": "string", "format": "uuid", "description": "the webhook-id its receiver gets"},
        "event": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
        "url": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "delivered", "failed"]},
        "attempts": {"type": "integer", "minimum": 0},
        "last_status": {"type": ["integer", "null"], "description": "the receiver's last HTTP status"},
        "last_error": {"type": ["string", "null"]},
        "next_attempt_at": {**NULLABLE_TIME, "description": "while pending"},
        "delivered_at": NULLABLE_TIME,
        "created_at": {"type": "string", "format": "date-time"},
    }
    return {
        **_model_schemas(),
        "Delivery": {"type": "object", "required": list(delivery), "properties": delivery},
        "DeliveryLog": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": _ref("Delivery")}},
        },
        "JobRequest": {
            "type": "object",
            "required": ["prompt"],
            "additionalProperties": False,
            "properties": {
                **params,
                "preview": preview,
                "webhook": webhook,
                "start_within_s": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 86400,
                    "description": "queue it only if it should start within this long: else 429 "
                    "start_too_late with the estimate, nothing queued",
                },
            },
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
                "budget": {"type": "string", "enum": ["queue", "owner"], "description": "over_budget: which"},
                "budget_s": {"type": "number", "description": "over_budget: that budget, GPU-seconds"},
                "estimated_start_s": {"type": ["number", "null"], "description": "start_too_late"},
                "estimated_start_at": {**NULLABLE_TIME, "description": "start_too_late"},
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


def _model_schemas() -> dict[str, Any]:
    def bounds(*names: str) -> dict[str, Any]:
        return {"type": "object", "properties": {name: {"type": "integer"} for name in names}}

    limits = {
        "schedulers": {"type": "array", "items": {"type": "string", "enum": list(SCHEDULERS)}},
        "max_prompt_chars": {"type": "integer"},
        "steps": bounds("min", "max", "default"),
        "size_px": bounds("min", "max", "default", "multiple_of"),
        "guidance_scale": {"type": "object"},
        "num_images": bounds("min", "max"),
        "seed": bounds("min", "max"),
        "preview_max_px": {"type": "integer"},
    }
    worker = {
        "type": "object",
        "properties": {
            "device": {"type": "string"},
            "dtype": {"type": "string"},
            "batch_size": {"type": "integer"},
            "revision": {"type": "string"},
            "since": {"type": "string", "format": "date-time"},
        },
    }
    model = {
        "name": {"type": "string"},
        "family": {"type": ["string", "null"], "enum": [*FAMILIES, None]},
        "revision": {"type": ["string", "null"]},
        "previews": {
            "type": ["string", "null"],
            "description": "how previews are made (latent: a linear projection); null: none",
        },
        "limits": {"type": "object", "properties": limits},
        "workers": {"type": "array", "items": worker, "description": "live now; [] while none runs"},
        "queue": {"type": "object", "properties": {"pending": {"type": "integer"}}},
        "per_step_s": {"type": ["number", "null"], "description": "lately, at its default size"},
        "eta_s": {"type": ["number", "null"], "description": "for a job sent now; null without a worker"},
        "last_served_at": NULLABLE_TIME,
    }
    return {
        "Limits": {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "models": {"type": "array", "items": {"type": "string"}},
                **limits,
            },
        },
        "Models": {
            "type": "object",
            "required": ["default", "models"],
            "properties": {
                "default": {"type": "string"},
                "models": {
                    "type": "array",
                    "items": {"type": "object", "required": list(model), "properties": model},
                },
            },
        },
    }


def _operations(settings: ServerSettings) -> dict[str, dict[str, Operation]]:
    plain = {"200": _json("OK")}
    return {
        "/v1/jobs": {
            "post": Operation(
                "Submit a job",
                {
                    "201": _job("Finished within Prefer: wait", LOCATION),
                    "202": _job("Accepted (or a replay of an idempotency key)", LOCATION),
                },
                raises=(
                    (InvalidRequest, "Body is not JSON"),
                    (IdempotencyKeyReused, "Idempotency key reused with other params"),
                    (PayloadTooLarge, "Body too large"),
                    (UnsupportedMediaType, "Content-Type not application/json (or +json)"),
                    CROSS_SITE,
                    (InvalidParams, "Invalid params or headers, one entry per field"),
                    (
                        TooManyRequests,
                        "Queue full, or your share of it (queue_full); a budget of GPU-seconds "
                        "(over_budget); or it would not start within start_within_s (start_too_late)",
                    ),
                ),
                parameters=(
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS},
                        "description": "A repeat returns the first job; with other params it answers 409",
                    },
                    {
                        "name": "Prefer",
                        "in": "header",
                        "schema": {"type": "string"},
                        "description": "wait=N (N <= 60): hold the answer until the job ends or N s "
                        "pass; other preferences are ignored (RFC 7240)",
                    },
                ),
                body=_ref("JobRequest"),
            ),
            "get": Operation(
                "Your jobs, newest first",
                {"200": _json("A page", _ref("JobPage"))},
                raises=((InvalidParams, "Bad query parameter"),),
                parameters=(
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
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "The previous page's next_cursor, as it was given",
                    },
                ),
            ),
        },
        "/v1/jobs/{job_id}": {
            "get": Operation(
                "One job", {"200": _job("The job", RETRY_AFTER)}, raises=(NO_JOB,), parameters=(JOB_ID,)
            )
        },
        "/v1/jobs/{job_id}/cancel": {
            "post": Operation(
                "Cancel a job in any state",
                {"200": _job("Canceled (it was pending)"), "202": _job("Stops at its next denoising step")},
                raises=(NO_JOB, (Conflict, "Already finished"), CROSS_SITE),
                parameters=(JOB_ID,),
            )
        },
        "/v1/jobs/{job_id}/webhooks": {
            "get": Operation(
                "The job's webhook deliveries: attempts, last answer, next try (docs/webhooks.md)",
                {"200": _json("The deliveries, oldest first", _ref("DeliveryLog"))},
                raises=(NO_JOB,),
                parameters=(JOB_ID,),
            )
        },
        "/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver": {
            "post": Operation(
                "Send a delivery again now, under its own webhook-id (one more attempt)",
                {"202": _json("The delivery, due now", _ref("Delivery"))},
                raises=((NotFound, "No such delivery of a job of yours"), CROSS_SITE),
                parameters=(
                    JOB_ID,
                    {"name": "delivery_id", "in": "path", "required": True, "schema": {"type": "string"}},
                ),
            )
        },
        "/v1/jobs/{job_id}/events": {
            "get": Operation(
                "The job's events as Server-Sent Events (docs/protocol.md)",
                {"200": {"description": "An event stream", "content": {"text/event-stream": {}}}},
                raises=(NO_JOB, (InvalidParams, "Bad Last-Event-ID or after_seq")),
                parameters=(
                    JOB_ID,
                    {"name": "Last-Event-ID", "in": "header", "schema": _SEQ},
                    {"name": "after_seq", "in": "query", "schema": _SEQ},
                ),
            )
        },
        "/v1/images/{key}": {
            "get": Operation(
                "An image (local storage)",
                {"200": {"description": "The image", "content": {"image/png": {}}}},
                raises=((NotFound, "No such image of yours"), (Gone, "Deleted by retention")),
                parameters=({"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},),
            )
        },
        "/v1/me": {"get": Operation("Who you are: {owner, auth, webhook_secret}", plain)},
        "/v1/limits": {
            "get": Operation(
                "What a job for one model may ask for here",
                {"200": _json("Its limits and defaults", _ref("Limits"))},
                raises=((InvalidParams, "No such model here (the message lists those there are)"),),
                parameters=(
                    {
                        "name": "model",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": f"the default: {settings.model_name}",
                    },
                ),
            )
        },
        "/v1/models": {
            "get": Operation(
                "The models a job may name: limits, live workers, queue and ETA of each",
                {"200": _json("The models", _ref("Models"))},
            )
        },
        "/healthz": {"get": Operation("Liveness", plain)},
        "/readyz": {
            "get": Operation(
                "Readiness: Postgres and Redis reachable",
                {**plain, "503": _json("Not ready, naming what is down")},
            )
        },
        "/metrics": {
            "get": Operation(
                "Prometheus metrics",
                {"200": {"description": "Text exposition format", "content": {"text/plain": {}}}},
                # The job gauges are read from Postgres; STEPCAST_METRICS_TOKEN asks for a bearer.
                raises=(STORES, *([METRICS_TOKEN] if settings.metrics_token is not None else [])),
            )
        },
        "/openapi.json": {"get": Operation("This document", plain)},
    }


def document(settings: ServerSettings) -> dict[str, Any]:
    keys = settings.auth == "keys"
    paths = {
        path: {
            method: operation.document(owned=path.startswith(OWNED), keys=keys)
            for method, operation in item.items()
        }
        for path, item in _operations(settings).items()
    }
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
