"""Which names this server answers to: the ``Host`` allow-list (``STEPCAST_ALLOWED_HOSTS``).

A request for another name is refused (400 problem+json naming ``Host``; a WebSocket upgrade 403)
before anything else runs, which closes DNS rebinding. ``/healthz``, ``/readyz`` and ``/metrics``
answer any name. Why: docs/security.md, "DNS rebinding".
"""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.problems import stepcast_error
from stepcast.errors import FieldError, HostNotAllowed
from stepcast.settings import ServerSettings

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
ANY_HOST_PATHS = {"/healthz", "/readyz", "/metrics"}


def allowed_hosts(settings: ServerSettings) -> tuple[str, ...]:
    """``STEPCAST_ALLOWED_HOSTS``, or by default: loopback names in ``single_user`` mode
    (no credentials to protect it), any name with keys (the cookie is the browser's own)."""
    if settings.allowed_hosts is not None:
        return tuple(pattern.lower().rstrip(".") for pattern in settings.allowed_hosts)
    return LOOPBACK_HOSTS if settings.auth == "single_user" else ("*",)


def host_name(host: str) -> str:
    """The name of a ``Host`` header, without its port: ``[::1]:8000`` is ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.partition(":")[0].rstrip(".")


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    name = host_name(host)
    for pattern in patterns:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


class HostCheck:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Passing a request on returns the app's awaitable: no frame of ours stays on the
        # stack a WebSocket holds for its whole life.
        services = (scope.get("state") or {}).get("services")
        if scope["type"] not in {"http", "websocket"} or services is None or scope["path"] in ANY_HOST_PATHS:
            return self.app(scope, receive, send)
        host = Headers(scope=scope).get("host", "")
        if host_allowed(host, allowed_hosts(services.settings)):
            return self.app(scope, receive, send)
        return self._refuse(scope, receive, send, host)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, host: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: 403
            return
        message = f"this server does not answer to {host_name(host) or 'a request without Host'}"
        message += "; STEPCAST_ALLOWED_HOSTS lists the names it answers to"
        error = HostNotAllowed(message, errors=[FieldError("Host", message)])
        response = await stepcast_error(Request(scope, receive), error)
        await response(scope, receive, send)
