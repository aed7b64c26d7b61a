"""The one error hierarchy.

Each error carries its machine code and HTTP status here, in one place; the
REST layer renders it as problem+json and the WebSocket layer as an ``error``
frame with the same ``code``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class StepcastError(Exception):
    """Root of every error a client can be shown."""

    code = "internal_error"
    status = 500
    title = "Internal error"
    # The names of the headers in ``headers``, known before any error is made (the OpenAPI
    # document lists them with the status).
    header_names: tuple[str, ...] = ()

    def __init__(self, detail: str, *, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries (Retry-After, WWW-Authenticate…)."""
        return {}

    @property
    def extensions(self) -> dict[str, Any]:
        """Fields a client reads besides the message, in the problem+json body and the
        WebSocket error frame alike (the budget refused, the estimated start…)."""
        return {}


class InvalidParams(StepcastError):
    code = "invalid_params"
    status = 422
    title = "Invalid parameters"

    @classmethod
    def from_errors(cls, errors: list[FieldError]) -> InvalidParams:
        return cls("; ".join(f"{e.field}: {e.message}" for e in errors), errors=errors)

    @classmethod
    def one(cls, field: str, message: str) -> InvalidParams:
        return cls.from_errors([FieldError(field, message)])


class InvalidRequest(StepcastError):
    code = "invalid_request"
    status = 400
    title = "Malformed request"


class HostNotAllowed(StepcastError):
    code = "host_not_allowed"
    status = 400
    title = "Host not allowed"


class Unauthorized(StepcastError):
    code = "unauthorized"
    status = 401
    title = "Unauthorized"
    header_names = ("WWW-Authenticate",)

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="stepcast"'}


class Forbidden(StepcastError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class PayloadTooLarge(StepcastError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class UnsupportedMediaType(StepcastError):
    code = "unsupported_media_type"
    status = 415
    title = "Unsupported media type"


class NotFound(StepcastError):
    code = "not_found"
    status = 404
    title = "Not found"


class Gone(StepcastError):
    code = "gone"
    status = 410
    title = "Gone"


class Conflict(StepcastError):
    code = "conflict"
    status = 409
    title = "Conflict"


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"
    title = "Idempotency key reused"


class TooManyRequests(StepcastError):
    """Backpressure: the queue is full; ``retry_after_s`` says when to try again."""

    code = "queue_full"
    status = 429
    title = "Too many requests"
    header_names = ("Retry-After",)

    def __init__(self, detail: str, *, retry_after_s: int, extensions: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
        self._extensions = extensions or {}

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    @property
    def extensions(self) -> dict[str, Any]:
        return self._extensions


class OverBudget(TooManyRequests):
    """A job whose cost does not fit a budget now (``budget``: "queue" or "owner")."""

    code = "over_budget"


class StartTooLate(TooManyRequests):
    """A submit with ``start_within_s`` whose job would start later than that: not queued."""

    code = "start_too_late"


class RateLimited(TooManyRequests):
    code = "rate_limited"


class TooManySockets(TooManyRequests):
    """An owner or an address holds as many sockets as it may: close one first."""

    code = "too_many_sockets"


class Unavailable(StepcastError):
    """A store (Postgres, Redis) is restarting or failing over: try again in a second."""

    code = "unavailable"
    status = 503
    title = "Service unavailable"
    header_names = ("Retry-After",)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ServerBusy(Unavailable):
    """This server holds as many sockets as it may; another one, or this one later, may not."""

    code = "server_busy"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ConfigError(Exception):
    """Invalid configuration; raised at start-up, never shown to clients."""


class SchemaError(ConfigError):
    """The database's schema does not fit this version, or a migration could not be applied."""
