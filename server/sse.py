"""Server-Sent Events: ``GET /v1/jobs/{id}/events``, for clients that cannot hold a socket.

The same events as the WebSocket, each as ``id: <seq>``, ``event: <type>``,
``data: <json>``. ``Last-Event-ID`` (or ``?after_seq=``) resumes after that
seq; without it the stream opens with a ``snapshot``. The stream ends after
the job's terminal event, or when the server shuts down (the client
reconnects, to another server if there is one, and resumes).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.auth import owner_of
from server.feed import Feed, Outgoing, SlowConsumer
from server.services import Services
from stepcast.errors import InvalidParams, NotFound
from stepcast.tasks import cancel_and_wait


class _Draining(Exception):
    """The server is shutting down."""


def _after_seq(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("after_seq")
    if raw is None:
        return None
    if not raw.isdigit():
        raise InvalidParams.one("Last-Event-ID", "Last-Event-ID must be a non-negative integer")
    return int(raw)


async def job_events(request: Request) -> Response:
    services: Services = request.state.services
    try:
        job_id = uuid.UUID(request.path_params["job_id"])
    except ValueError:
        raise NotFound(f"no job {request.path_params['job_id']}") from None
    after_seq = _after_seq(request)
    feed = Feed(services, owner_of(request), max_buffer=services.settings.feed_buffer_max)
    try:
        await feed.watch(job_id, after_seq)
    except BaseException:
        await feed.close()
        raise

    draining: asyncio.Event = request.app.state.draining

    async def next_item() -> Outgoing | None:
        """The next item, None for a keep-alive; raises SlowConsumer, or Draining at shutdown."""
        waiting = asyncio.ensure_future(feed.next(timeout_s=services.settings.sse_keepalive_s))
        stopping = asyncio.ensure_future(draining.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(stopping)
        if not waiting.done():
            await cancel_and_wait(waiting)
            raise _Draining
        return waiting.result()

    async def stream() -> AsyncIterator[str]:
        try:
            yield "retry: 1000\n\n"
            while True:
                item = await next_item()
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                seq = f"id: {item.seq}\n" if item.seq is not None else ""
                yield f"{seq}event: {item.type}\ndata: {item.text}\n\n"
                if item.terminal:
                    return
        except (SlowConsumer, _Draining):
            return  # the client reconnects with Last-Event-ID and resumes
        finally:
            await feed.close()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
