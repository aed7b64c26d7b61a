"""WebSocket ``/v1/ws``: submit, watch and cancel over one connection.

Every client frame is one JSON object with a ``type``. A bad frame gets an ``error`` frame and the
connection stays usable; only abuse closes it: flooding (1008), not reading while events pile up
(1013: reconnect and resume), a revoked API key (4401). Frames and codes: docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import Any

from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from server import frames
from server.auth import key_hash_of, origin_allowed, owner_of, priority_class_of
from server.feed import Feed, SlowConsumer
from server.limits import client_address
from server.services import Services
from stepcast.background import cancel_and_wait
from stepcast.errors import (
    FieldError,
    InvalidParams,
    InvalidRequest,
    ServerBusy,
    StepcastError,
    TooManySockets,
    Unauthorized,
    Unavailable,
)
from stepcast.params import (
    SUBMISSION_FIELDS,
    parse_after_seq,
    parse_idempotency_key,
    parse_submission,
    unstorable_strings,
)

logger = logging.getLogger(__name__)

CLOSE_POLICY = 1008  # flooding
CLOSE_TRY_AGAIN = 1013  # too slow to keep up, or the server is full: reconnect (later) and resume
CLOSE_TOO_MANY_SOCKETS = 4029  # the owner's or the address's sockets are at their cap: close one first
CLOSE_REVOKED = 4401  # the API key the connection was opened with was revoked (like HTTP 401)
MAX_STRIKES = 50  # rate-limited frames tolerated before the connection is closed
MAX_REQUEST_ID_CHARS = 128

_FIELDS = {
    "submit": {"type", "request_id", "params", "idempotency_key", "preview", "webhook", "start_within_s"},
    "subscribe": {"type", "request_id", "job_id", "after_seq", "scope"},
    "unsubscribe": {"type", "request_id", "job_id"},
    "cancel": {"type", "request_id", "job_id"},
    "ping": {"type", "request_id"},
}
_SUBMISSION = {"params", *SUBMISSION_FIELDS}


class _RateLimit:
    """Token bucket: ``rate`` frames a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = time.monotonic()
        self.strikes = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.strikes += 1
        return False


def _job_id(message: dict[str, Any]) -> uuid.UUID:
    value = message.get("job_id")
    try:
        return uuid.UUID(value) if isinstance(value, str) else uuid.UUID(int=-1)
    except ValueError:
        pass
    raise InvalidParams.one("job_id", "job_id must be a job id (a UUID)")


class Connection:
    def __init__(self, websocket: WebSocket, services: Services, owner: str) -> None:
        self.websocket = websocket
        self.services = services
        self.settings = services.settings
        self.owner = owner
        self.priority_class = priority_class_of(websocket)
        self.address = client_address(websocket)
        self.feed = Feed(services, self.owner)
        self.limit = _RateLimit(self.settings.ws_messages_per_s, self.settings.ws_burst)
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._revoked = False

    async def serve(self) -> None:
        """Read the client's frames until it goes; events go out from a writer task that
        runs only while the outbox holds something (an idle connection holds no task)."""
        await self.websocket.accept()
        metrics = self.services.metrics
        metrics.sockets.inc()
        self.feed.outbox.on_push = self._start_writer
        if self._revoked:  # while the upgrade was being accepted
            self.revoked()
        try:
            while (message := await self.websocket.receive())["type"] != "websocket.disconnect":
                if not await self._receive(message):
                    return
        finally:
            metrics.sockets.dec()
            self.feed.outbox.on_push = None
            await self.feed.close()
            for task in (self._writer, self._closing):
                if task is not None:
                    await cancel_and_wait(task)

    def revoked(self) -> None:
        """The API key the connection was opened with was revoked: close it (4401)."""
        self._revoked = True
        if self._closing is None and self.websocket.application_state is WebSocketState.CONNECTED:
            logger.info("closing a connection: API key revoked", extra={"owner": self.owner})
            self._closing = asyncio.create_task(self._close(CLOSE_REVOKED, "API key revoked"))

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        sent = self.services.metrics.events_sent.labels("websocket")
        try:
            while (item := self.feed.outbox.pop()) is not None:
                await self.websocket.send_text(item.text)
                if item.seq is not None:
                    sent.inc()
        except SlowConsumer:
            logger.warning("closing a connection that does not keep up", extra={"owner": self.owner})
            self.services.metrics.slow_clients.inc()
            await self._close(CLOSE_TRY_AGAIN, "too slow: reconnect and resume with after_seq")
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the reader sees the disconnect too
        finally:
            self._writer = None

    async def _close(self, code: int, reason: str) -> None:
        self.feed.outbox.on_push = None  # closing: nothing more is sent, no writer starts again
        if self.websocket.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, OSError):
                await self.websocket.close(code, reason)

    async def _receive(self, message: Message) -> bool:
        """Act on one frame from the client; False once the connection was closed for abuse."""
        if not self.limit.allow():
            if self.limit.strikes > MAX_STRIKES:
                await self._close(CLOSE_POLICY, "too many messages")
                return False
            self.feed.push_message(frames.error("rate_limited", "too many messages; slow down"))
            return True
        text = message.get("text")
        if text is None:
            self.feed.push_message(frames.error("invalid_frame", "frames must be JSON text, not binary"))
        elif len(text.encode()) > self.settings.ws_max_message_bytes:
            limit = self.settings.ws_max_message_bytes
            self.feed.push_message(
                frames.error("message_too_large", f"messages must be at most {limit} bytes")
            )
        else:
            await self._handle(text)
        return True

    async def _handle(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError as exc:
            self.feed.push_message(frames.error("invalid_json", f"not valid JSON: {exc}"))
            return
        except RecursionError:
            self.feed.push_message(frames.error("invalid_json", "not valid JSON: nested too deeply"))
            return
        if not isinstance(message, dict):
            self.feed.push_message(frames.error("invalid_message", "a message must be a JSON object"))
            return
        request_id = message.get("request_id")
        try:
            await self._dispatch(message)
        except StepcastError as exc:
            self.feed.push_message(frames.of_error(exc, request_id=request_id))
        except Exception:
            # Redis or Postgres unreachable (or a bug): this request fails, the connection lives on.
            logger.exception("websocket request failed", extra={"owner": self.owner})
            error = Unavailable("the service could not complete this request; try again")
            self.feed.push_message(frames.of_error(error, request_id=request_id))

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind not in _FIELDS:
            known = ", ".join(_FIELDS)
            raise InvalidRequest(f"unknown message type {kind!r}; expected one of: {known}")
        # The submission's own fields are checked as it is parsed, named as on REST.
        envelope = {name: value for name, value in message.items() if name not in _SUBMISSION}
        if unstorable := unstorable_strings(envelope, ""):
            raise InvalidParams.from_errors(unstorable)
        unknown = sorted(set(message) - _FIELDS[kind])
        if unknown:
            raise InvalidParams.from_errors([FieldError(name, f"unknown field {name!r}") for name in unknown])
        request_id = message.get("request_id")
        if request_id is not None and (
            not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_CHARS
        ):
            limit = MAX_REQUEST_ID_CHARS
            raise InvalidParams.one("request_id", f"request_id must be a string of at most {limit} chars")
        if kind == "ping":
            self.feed.push_message(frames.pong(request_id))
        elif kind == "submit":
            await self._submit(message, request_id)
        elif kind == "subscribe":
            if message.get("scope") is not None:
                if message["scope"] != "mine":
                    raise InvalidParams.one("scope", 'scope must be "mine"')
                await self.feed.watch_mine()
            else:
                await self.feed.watch(
                    _job_id(message), parse_after_seq(message.get("after_seq"), "after_seq")
                )
        elif kind == "unsubscribe":
            await self.feed.unwatch(_job_id(message))
        elif kind == "cancel":
            await self.services.jobs.cancel(self.owner, _job_id(message))

    async def _submit(self, message: dict[str, Any], request_id: str | None) -> None:
        key = parse_idempotency_key(message.get("idempotency_key"), "idempotency_key")
        submission = parse_submission(
            message.get("params"),
            message.get("preview"),
            self.settings,
            await self.services.models.current(),
            params_field="params",
            webhook=message.get("webhook"),
            start_within_s=message.get("start_within_s"),
        )
        job, created = await self.services.jobs.submit(
            self.owner,
            submission,
            idempotency_key=key,
            address=self.address,
            priority_class=self.priority_class,
        )
        self.feed.push_message(frames.accepted(request_id, str(job.id), replayed=not created))
        # A new job is watched from its first event; a replayed one from a snapshot.
        if created:
            await self.feed.watch(job.id, 0, new=job)
        else:
            await self.feed.watch(job.id, None)


class Endpoint:
    """``/v1/ws`` as a plain ASGI app. Starlette wraps a function endpoint in two more
    frames, which each of thousands of sockets would hold for its whole life."""

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return endpoint(WebSocket(scope, receive=receive, send=send))


async def endpoint(websocket: WebSocket) -> None:
    services: Services = websocket.state.services
    if not origin_allowed(websocket, services.settings):
        logger.warning("websocket refused: origin %s not allowed", websocket.headers.get("origin"))
        await websocket.close(CLOSE_POLICY)  # before accept: the upgrade is answered 403
        return
    try:
        owner = await owner_of(websocket)
    except Unauthorized:
        await websocket.close(CLOSE_POLICY)  # refused before anything is sent: 403
        return
    try:
        socket = services.sockets.open(owner, client_address(websocket))
    except (TooManySockets, ServerBusy) as exc:
        await _refuse(websocket, exc)
        return
    try:
        connection = Connection(websocket, services, owner)
        with services.revocations.watch(key_hash_of(websocket), connection.revoked):
            await connection.serve()
    finally:
        socket.close()


async def _refuse(websocket: WebSocket, exc: TooManySockets | ServerBusy) -> None:
    """Over a socket cap: accepted only to say why (browsers see no status of a refused
    upgrade), in an ``error`` frame, then closed with 4029 (yours) or 1013 (the server's)."""
    logger.warning("websocket refused: %s", exc.detail)
    frame = frames.of_error(exc)
    code = CLOSE_TOO_MANY_SOCKETS if isinstance(exc, TooManySockets) else CLOSE_TRY_AGAIN
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.accept()
        await websocket.send_text(json.dumps(frame))
        await websocket.close(code, "too many sockets" if code == CLOSE_TOO_MANY_SOCKETS else "server full")
