"""The frames the server sends that are not job events: ``accepted``, ``error``, ``pong``, ``snapshot``.

Job events are built in :mod:`stepcast.events`; these are built here, each by one function, so a
frame's shape (docs/design.md, "Wire shapes") is written once.
"""

from __future__ import annotations

from typing import Any

from stepcast.errors import InvalidParams, ServerBusy, StepcastError, TooManyRequests


def error(
    code: str,
    message: str,
    *,
    request_id: Any = None,
    field: str | None = None,
    retry_after_s: float | None = None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error"}
    if isinstance(request_id, str):
        frame["request_id"] = request_id
    frame["code"] = code
    if field is not None:
        frame["field"] = field
    frame["message"] = message
    if retry_after_s is not None:
        frame["retry_after_s"] = retry_after_s
    return frame


def of_error(exc: StepcastError, *, request_id: Any = None) -> dict[str, Any]:
    """The ``error`` frame of a refusal: one field's error names it, several are listed."""
    retry_after_s = exc.retry_after_s if isinstance(exc, TooManyRequests | ServerBusy) else None
    if not isinstance(exc, InvalidParams):
        return {
            **error(exc.code, exc.detail, request_id=request_id, retry_after_s=retry_after_s),
            **exc.extensions,
        }
    first = exc.errors[0] if exc.errors else None
    message = first.message if first is not None and len(exc.errors) == 1 else exc.detail
    frame = error(exc.code, message, request_id=request_id, field=first.field if first else None)
    if len(exc.errors) > 1:
        frame["errors"] = [{"field": e.field, "message": e.message} for e in exc.errors]
    return frame


def accepted(request_id: str | None, job_id: str, *, replayed: bool) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "accepted", "request_id": request_id, "job_id": job_id}
    if replayed:
        frame["replayed"] = True
    return frame


def pong(request_id: str | None) -> dict[str, Any]:
    return {"type": "pong", **({"request_id": request_id} if request_id else {})}


def snapshot(job_id: str, job: dict[str, Any]) -> dict[str, Any]:
    return {"type": "snapshot", "job_id": job_id, "job": job}
