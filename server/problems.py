"""Errors on the wire: problem+json (RFC 9457) for REST."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stepcast.db import TRANSIENT_ERRORS
from stepcast.errors import StepcastError, Unavailable

logger = logging.getLogger(__name__)

PROBLEM_TYPE = "urn:stepcast:problem:"


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    extensions: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": PROBLEM_TYPE + code, "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    body.update(extensions or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


def of_error(exc: StepcastError) -> JSONResponse:
    errors = [{"field": e.field, "message": e.message} for e in exc.errors]
    return problem(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        errors=errors,
        headers=exc.headers or None,
        extensions=exc.extensions,
    )


async def stepcast_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StepcastError)
    return of_error(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return problem(
        exc.status_code,
        code,
        code.replace("_", " ").capitalize(),
        str(exc.detail),
        headers=dict(exc.headers or {}),
    )


async def backend_unavailable(request: Request, exc: Exception) -> Response:
    """Postgres or Redis unreachable (a restart, a failover): 503 and when to try again."""
    logger.warning("%s %s: backend unavailable: %r", request.method, request.url.path, exc)
    error = Unavailable("a backing service is unavailable for a moment; try again")
    return await stepcast_error(request, error)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    StepcastError: stepcast_error,
    HTTPException: http_error,
    **{kind: backend_unavailable for kind in (*TRANSIENT_ERRORS, RedisConnectionError, RedisTimeoutError)},
}
