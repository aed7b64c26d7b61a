"""Who is asking (DESIGN §4, Auth). Every job has an owner, and every read,
watch, cancel and image fetch is filtered by it, so another owner's job is
simply not found (404, never 403: ids leak nothing).

With ``STEPCAST_AUTH=keys`` (the default) a request is a key holder's
(``Authorization: Bearer sk_…``) or a browser session's (a signed HttpOnly,
SameSite cookie the page gets when it is loaded), or it is refused with 401.
``single_user`` makes every request ``STEPCAST_ANONYMOUS_OWNER``'s.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepcast import keys
from stepcast.errors import Unauthorized

SESSION_COOKIE = "stepcast_session"
PAGE_PATHS = {"/", "/index.html"}
HOW_TO = "send Authorization: Bearer <api key> (`stepcast keys create` makes one), or use the page"


async def owner_of(connection: HTTPConnection) -> str:
    """The caller's owner id, resolved once per request; raises Unauthorized."""
    state = connection.state
    owner: str | None = getattr(state, "owner", None)
    if owner is not None:
        return owner
    services = state.services
    settings = services.settings
    if settings.auth == "single_user":
        owner = settings.anonymous_owner
    elif (header := connection.headers.get("authorization")) is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(f"the Authorization header must be 'Bearer <api key>'; {HOW_TO}")
        owner = await services.db.owner_of_key(keys.hash_key(token.strip()))
        if owner is None:
            raise Unauthorized("this API key is unknown or revoked")
    else:
        cookie = connection.cookies.get(SESSION_COOKIE)
        owner = keys.session_owner(services.session_secret, cookie) if cookie else None
        if owner is None:
            raise Unauthorized(f"no credentials: {HOW_TO}")
    state.owner = owner
    return owner


class BrowserSession:
    """Gives a browser loading the page an anonymous owner of its own, in a signed cookie."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = (scope.get("state") or {}).get("services")
        if (
            scope["type"] != "http"
            or scope["path"] not in PAGE_PATHS
            or services is None
            or services.settings.auth != "keys"
        ):
            await self.app(scope, receive, send)
            return
        secret: bytes = services.session_secret
        cookie = HTTPConnection(scope).cookies.get(SESSION_COOKIE)
        if cookie and keys.session_owner(secret, cookie):
            await self.app(scope, receive, send)
            return
        value = keys.sign_session(secret, keys.new_owner("anon"))
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        max_age = services.settings.session_max_age_s
        set_cookie = f"{SESSION_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("Set-Cookie", set_cookie)
            await send(message)

        await self.app(scope, receive, send_with_cookie)
