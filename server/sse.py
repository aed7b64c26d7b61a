"""Server-Sent Events: ``GET /v1/jobs/{id}/events``, for clients that cannot hold a socket.

The WebSocket's events, each as ``id: <seq>``, ``event: <type>``, ``data: <json>``.
``Last-Event-ID`` (or ``?after_seq=``) resumes after that seq; without it the stream opens with a
``snapshot``. It ends after the terminal event, at server shutdown (the client reconnects and
resumes), or after an ``error`` event once its API key is revoked. docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server import frames
from server.auth import key_hash_of, owner_of
from server.feed import Feed, SlowConsumer
from server.limits import Socket, client_address
from server.services import Services
from stepcast.errors import NotFound
from stepcast.params import parse_after_seq

# The last event of a stream whose API key was revoked (the WebSocket's `error` frame).
REVOKED = json.dumps(frames.error("unauthorized", "this stream's API key was revoked"))


def _after_seq(request: Request) -> int | None:
    """The resume point: ``Last-Event-ID`` (a reconnecting EventSource sends it), else
    ``?after_seq=``; a bad one is refused even when the other is sent."""
    query = parse_after_seq(request.query_params.get("after_seq"), "after_seq", text=True)
    if header := request.headers.get("last-event-id"):
        return parse_after_seq(header, "Last-Event-ID", text=True)
    return query


async def job_events(request: Request) -> Response:
    services: Services = request.state.services
    try:
        job_id = uuid.UUID(request.path_params["job_id"])
    except ValueError:
        raise NotFound(f"no job {request.path_params['job_id']}") from None
    after_seq = _after_seq(request)
    owner = await owner_of(request)
    socket = services.sockets.open(owner, client_address(request))  # 429 or 503 over a cap
    feed = Feed(services, owner)
    try:
        await feed.watch(job_id, after_seq)
    except BaseException:
        socket.close()
        await feed.close()
        raise

    draining: asyncio.Event = request.app.state.draining

    metrics = services.metrics
    sent = metrics.events_sent.labels("sse")
    keepalive_s = services.settings.sse_keepalive_s

    async def stream() -> AsyncIterator[str]:
        metrics.sse_streams.inc()
        try:
            revoked = asyncio.Event()
            with services.revocations.watch(key_hash_of(request), revoked.set):
                yield "retry: 1000\n\n"
                while True:
                    item = await feed.next_unless(draining, revoked, timeout_s=keepalive_s)
                    if revoked.is_set():
                        yield f"event: error\ndata: {REVOKED}\n\n"
                        return  # a reconnect with the revoked key gets 401
                    if draining.is_set():
                        return  # the client reconnects (elsewhere) with Last-Event-ID and resumes
                    if item is None:
                        yield ": keep-alive\n\n"
                        continue
                    seq = f"id: {item.seq}\n" if item.seq is not None else ""
                    yield f"{seq}event: {item.type}\ndata: {item.text}\n\n"
                    if item.seq is not None:
                        sent.inc()
                    if item.terminal:
                        return
        except SlowConsumer:
            metrics.slow_clients.inc()
            return  # the client reconnects with Last-Event-ID and resumes
        finally:
            metrics.sse_streams.dec()
            await feed.close()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _Stream(socket, stream(), media_type="text/event-stream", headers=headers)


class _Stream(StreamingResponse):
    """A stream that gives its socket's place back however it ends, even before its
    first byte (a client gone at once: the generator's ``finally`` never runs)."""

    def __init__(self, socket: Socket, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.socket = socket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.socket.close()
