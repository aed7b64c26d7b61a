"""Who is asking: the owner of a request or a socket.

``STEPCAST_AUTH=keys``: an API key (``Authorization: Bearer sk_…``) or the page's signed session
cookie, else 401; ``single_user``: every request is ``STEPCAST_ANONYMOUS_OWNER``'s. A change made
without a key must not come from another site's page (:func:`origin_allowed`). Reads, watches,
cancels and image fetches are filtered by owner: another's job is not found. docs/security.md.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import limits, problems
from stepcast import credentials
from stepcast.errors import FieldError, Forbidden, RateLimited, Unauthorized
from stepcast.redis_keys import owner_rate
from stepcast.settings import ServerSettings

SESSION_COOKIE = "stepcast_session"
PAGE_PATHS = {"/", "/index.html"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
HOW_TO = "send Authorization: Bearer <api key> (`stepcast keys create` makes one), or use the page"


async def owner_of(connection: HTTPConnection) -> str:
    """The caller's owner id, resolved once per request; raises Unauthorized."""
    state = connection.state
    owner: str | None = getattr(state, "owner", None)
    if owner is not None:
        return owner
    services = state.services
    settings = services.settings
    priority_class = settings.session_priority_class
    if settings.auth == "single_user":
        owner = settings.anonymous_owner
    elif (header := connection.headers.get("authorization")) is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(f"the Authorization header must be 'Bearer <api key>'; {HOW_TO}")
        key_hash = credentials.hash_key(token.strip())
        key = await services.db.owners.of_key(key_hash)
        if key is None:
            raise Unauthorized("this API key is unknown or revoked")
        owner, priority_class = key.owner, key.priority_class or settings.key_priority_class
        state.key_hash = key_hash
    else:
        cookie = connection.cookies.get(SESSION_COOKIE)
        owner = credentials.session_owner(services.session_secret, cookie) if cookie else None
        if owner is None:
            raise Unauthorized(f"no credentials: {HOW_TO}")
    if key_hash_of(connection) is None:
        _check_origin(connection, settings)
    state.owner = owner
    state.priority_class = priority_class
    if connection.scope["type"] == "http" and settings.auth == "keys":
        await _count_request(services, owner)
    return owner


def priority_class_of(connection: HTTPConnection) -> str:
    """The caller's priority class (its key's; a browser session's), once :func:`owner_of`
    has resolved the caller."""
    priority_class: str | None = getattr(connection.state, "priority_class", None)
    if priority_class is None:
        raise RuntimeError("priority_class_of before owner_of resolved the caller")
    return priority_class


def origin_allowed(connection: HTTPConnection, settings: ServerSettings) -> bool:
    """A browser's ``Origin`` must be this server or an allowed one (programs send none)."""
    origin = connection.headers.get("origin")
    if origin is None:
        return True  # not a browser
    return origin in settings.allowed_origins or urlsplit(origin).netloc == connection.headers.get("host")


def _check_origin(connection: HTTPConnection, settings: ServerSettings) -> None:
    """Cross-site request forgery: a browser attaches the session cookie (or, in
    ``single_user`` mode, nothing is needed at all) to a form or a no-CORS fetch that
    another site makes it send; such a request carries that site's ``Origin``."""
    if connection.scope["type"] != "http" or connection.scope["method"] in SAFE_METHODS:
        return
    if not origin_allowed(connection, settings):
        origin = connection.headers["origin"]
        message = f"Origin {origin} may not change anything here (STEPCAST_ALLOWED_ORIGINS lists others)"
        raise Forbidden(message, errors=[FieldError("Origin", message)])


def key_hash_of(connection: HTTPConnection) -> str | None:
    """The hash of the API key :func:`owner_of` took the caller's word from, if a key."""
    key_hash: str | None = getattr(connection.state, "key_hash", None)
    return key_hash


async def _count_request(services: Any, owner: str) -> None:
    """Per-owner request rate, one-second windows counted in Redis (all servers together)."""
    window = int(time.time())
    key = owner_rate(owner, window)
    try:
        async with services.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2)
            count, _ = await pipe.execute()
    except RedisError:
        return  # Redis is down: do not refuse work over a counter
    limit = services.settings.requests_per_s_per_owner
    if count > limit:
        raise RateLimited(f"more than {limit} requests in a second; slow down", retry_after_s=1)


class BrowserSession:
    """Gives a browser loading the page an anonymous owner of its own, in a signed cookie."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Passing a request on returns the app's awaitable: no frame of ours stays on the
        # stack a WebSocket holds for its whole life.
        services = (scope.get("state") or {}).get("services")
        if (
            scope["type"] != "http"
            or scope["path"] not in PAGE_PATHS
            or services is None
            or services.settings.auth != "keys"
        ):
            return self.app(scope, receive, send)
        return self._page(scope, receive, send, services)

    async def _page(self, scope: Scope, receive: Receive, send: Send, services: Any) -> None:
        secret: bytes = services.session_secret
        connection = HTTPConnection(scope)
        cookie = connection.cookies.get(SESSION_COOKIE)
        if cookie and credentials.session_owner(secret, cookie):
            await self.app(scope, receive, send)
            return
        try:
            limit = services.settings.sessions_per_min_per_address
            await limits.count_per_minute(
                services.redis, "new sessions", limits.client_address(connection), limit
            )
        except RateLimited as exc:
            await problems.of_error(exc)(scope, receive, send)
            return
        value = credentials.new_session(secret, services.settings.session_max_age_s)
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        max_age = services.settings.session_max_age_s
        set_cookie = f"{SESSION_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("Set-Cookie", set_cookie)
            await send(message)

        await self.app(scope, receive, send_with_cookie)
