"""Every request gets an id and is counted.

The id comes from the client's ``X-Request-ID`` (if it is a sane one) or is
made here; it is echoed in the response and carried by every log line written
while the request is served. HTTP requests are counted and timed by route
template (``/v1/jobs/{job_id}``, not the id itself).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepcast import logs

MAX_REQUEST_ID_CHARS = 128


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if 0 < len(text) <= MAX_REQUEST_ID_CHARS and text.isprintable() and " " not in text:
                return text
    return uuid.uuid4().hex


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http":
            return self._http(scope, receive, send)
        if scope["type"] == "websocket":
            # Set for the connection's task, whose context ends with it: nothing is left to
            # do after, so no frame of ours stays on the stack a socket holds for its life.
            logs.request_id.set(_request_id(scope))
        return self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = _request_id(scope)
        token = logs.request_id.set(request_id)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)
            self._count(scope, status, time.perf_counter() - started)

    @staticmethod
    def _count(scope: Scope, status: int, seconds: float) -> None:
        state = scope.get("state") or {}
        services = state.get("services")
        if services is None:
            return
        matched = scope.get("route")
        route = (getattr(matched, "path", None) or "/") if matched is not None else "unmatched"
        method = scope["method"]
        services.metrics.http_requests.labels(method, route, str(status)).inc()
        services.metrics.http_seconds.labels(method, route).observe(seconds)
