"""REST: jobs, images, health."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.auth import owner_of, priority_class_of
from server.feed import Feed, SlowConsumer
from server.limits import client_address
from server.services import services_of
from stepcast import event_plane, webhooks
from stepcast.errors import (
    FieldError,
    Gone,
    InvalidParams,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from stepcast.jobs import Job, timestamp
from stepcast.params import parse_body, parse_idempotency_key, whole_number
from stepcast.status import Status
from stepcast.storage.local import URL_PREFIX

MAX_BODY_BYTES = 64 * 1024
MAX_PAGE = 100
MAX_WAIT_S = 60  # Prefer: wait — below the patience of the usual gateway (60-100 s)
# How long a poller should wait before asking again about an unfinished job.
RETRY_AFTER_S = {Status.PENDING: "2", Status.PROCESSING: "1"}


def _job_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["job_id"])
    except ValueError:
        raise NotFound(f"no job {request.path_params['job_id']}") from None


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def _json_body(request: Request) -> Any:
    """The JSON body, declared as such: a browser sends a body of any other type (or of
    none) across sites without asking first, so only JSON is read (no simple-request CSRF)."""
    content_type = request.headers.get("content-type")
    if content_type is None or not _is_json(content_type):
        sent = "none" if content_type is None else repr(content_type)
        message = f"Content-Type must be application/json (or a +json type); this request sent {sent}"
        raise UnsupportedMediaType(message, errors=[FieldError("Content-Type", message)])
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is not valid JSON: nested too deeply") from None


def _prefer_wait(request: Request) -> int | None:
    """``Prefer: wait=N`` (RFC 7240): seconds to hold the answer; other preferences are ignored."""
    for preference in request.headers.get("prefer", "").split(","):
        name, _, value = preference.partition("=")
        if name.strip().lower() != "wait":
            continue
        seconds = whole_number(value.strip().strip('"'), 0, MAX_WAIT_S)
        if seconds is None:
            message = f"wait must be a whole number of seconds from 0 to {MAX_WAIT_S}"
            raise InvalidParams.one("Prefer", message)
        return seconds
    return None


async def _outcome(request: Request, job: Job, wait_s: int) -> Job:
    """The job once it is finished, or as it stands after ``wait_s`` (or at shutdown)."""
    services = services_of(request)
    feed = Feed(services, job.owner)
    draining: asyncio.Event = request.app.state.draining
    deadline = time.monotonic() + wait_s
    try:
        await feed.watch(job.id, 0)
        while (left := deadline - time.monotonic()) > 0:
            item = await feed.next_unless(draining, timeout_s=left)
            if item is None or item.terminal:
                break
    except SlowConsumer:
        pass  # only progress piles up here; the row below says where the job is
    finally:
        await feed.close()
    return await services.jobs.get(job.owner, job.id)


async def create_job(request: Request) -> Response:
    """202 with the pending job; with ``Prefer: wait=N``, 201 with the finished job if it
    finishes within N seconds."""
    services = services_of(request)
    key = parse_idempotency_key(request.headers.get("idempotency-key"), "Idempotency-Key")
    wait_s = _prefer_wait(request)
    body = await _json_body(request)
    submission = parse_body(body, services.settings, await services.models.current())
    owner = await owner_of(request)
    job, created = await services.jobs.submit(
        owner,
        submission,
        idempotency_key=key,
        address=client_address(request),
        priority_class=priority_class_of(request),
    )
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    status = 202
    if wait_s is not None:
        headers["Preference-Applied"] = f"wait={wait_s}"
        if not job.status.terminal:
            job = await _outcome(request, job, wait_s)
        status = 201 if job.status.terminal else 202
    return JSONResponse(await services.jobs.render(job), status_code=status, headers=headers)


async def get_job(request: Request) -> Response:
    services = services_of(request)
    job = await services.jobs.get(await owner_of(request), _job_id(request))
    headers = {"Retry-After": RETRY_AFTER_S[job.status]} if not job.status.terminal else None
    return JSONResponse(await services.jobs.render(job), headers=headers)


async def list_jobs(request: Request) -> Response:
    services = services_of(request)
    query = request.query_params
    errors = [
        FieldError(name, f"unknown query parameter {name!r}")
        for name in query
        if name not in {"status", "limit", "cursor"}
    ]
    status = None
    if "status" in query:
        try:
            status = Status(query["status"])
        except ValueError:
            errors.append(
                FieldError("status", f"status must be one of: {', '.join(s.value for s in Status)}")
            )
    limit = 20
    if "limit" in query:
        asked = whole_number(query["limit"], 1, MAX_PAGE)
        if asked is None:
            errors.append(FieldError("limit", f"limit must be an integer between 1 and {MAX_PAGE}"))
        else:
            limit = asked
    if errors:
        raise InvalidParams.from_errors(errors)
    page = await services.db.jobs.page(
        await owner_of(request), status=status, limit=limit, cursor=query.get("cursor")
    )
    items = [await services.jobs.render(job) for job in page.jobs]
    return JSONResponse({"items": items, "next_cursor": page.next_cursor})


async def cancel_job(request: Request) -> Response:
    services = services_of(request)
    job = await services.jobs.cancel(await owner_of(request), _job_id(request))
    return JSONResponse(await services.jobs.render(job), status_code=202 if not job.status.terminal else 200)


def _delivery(row: Any) -> dict[str, Any]:
    """A webhook delivery as the log shows it; its id is the ``webhook-id`` its receiver got."""
    pending = row["status"] == "pending"
    return {
        "id": str(row["id"]),
        "event": row["event"],
        "url": row["url"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "next_attempt_at": timestamp(row["next_attempt_at"]) if pending else None,
        "delivered_at": timestamp(row["delivered_at"]) if row["delivered_at"] else None,
        "created_at": timestamp(row["created_at"]),
    }


async def job_webhooks(request: Request) -> Response:
    """The job's webhook deliveries: each event's attempts, last answer and next try."""
    services = services_of(request)
    owner, job_id = await owner_of(request), _job_id(request)
    job = await services.jobs.get(owner, job_id)  # (not the owner's: 404, like the job)
    rows = await services.db.deliveries.of_job(job.id, owner)
    return JSONResponse({"items": [_delivery(row) for row in rows]})


async def redeliver_webhook(request: Request) -> Response:
    """One more attempt of a delivery, now, under its own webhook-id (receivers dedupe on it)."""
    services = services_of(request)
    owner, job_id = await owner_of(request), _job_id(request)
    try:
        delivery_id = uuid.UUID(request.path_params["delivery_id"])
    except ValueError:
        raise NotFound(f"no webhook delivery {request.path_params['delivery_id']}") from None
    row = await services.db.deliveries.redeliver(job_id, delivery_id, owner)
    if row is None:
        raise NotFound(f"no webhook delivery {delivery_id} of job {job_id}")
    return JSONResponse(_delivery(row), status_code=202)


async def get_image(request: Request) -> Response:
    """Local storage only: S3 images are fetched from their presigned URLs."""
    services = services_of(request)
    key: str = request.path_params["key"]
    job_id = key.split("/", 1)[0]
    try:
        job = await services.db.jobs.get(uuid.UUID(job_id), await owner_of(request))
    except ValueError:
        job = None
    if job is None or key not in job.image_keys:
        raise NotFound(f"no image {key}")
    if job.images_expired_at is not None:
        raise Gone(f"image {key} was deleted at {timestamp(job.images_expired_at)} (retention)")
    try:
        data = await services.storage.get(key)
    except KeyError:
        raise NotFound(f"no image {key}") from None
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})


async def me(request: Request) -> Response:
    """Who the server takes the caller for."""
    services = services_of(request)
    owner = await owner_of(request)
    secret = await services.db.owners.webhook_secret(owner, webhooks.new_secret())
    return JSONResponse({"owner": owner, "auth": services.settings.auth, "webhook_secret": secret})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when Postgres and Redis (and the event plane, where it is another) answer within a
    second."""
    services = services_of(request)
    checks: dict[str, str] = {}
    probes = [("postgres", services.db.ping()), ("redis", services.redis.ping())]
    if services.events.redis is not services.redis:
        probes.append(("events", event_plane.ping(services.events.redis)))
    for name, probe in probes:
        try:
            async with asyncio.timeout(1.0):
                await probe
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready, whatever it is
            checks[name] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


routes = [
    Route("/v1/jobs", create_job, methods=["POST"]),
    Route("/v1/jobs", list_jobs, methods=["GET"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}/webhooks", job_webhooks, methods=["GET"]),
    Route("/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver", redeliver_webhook, methods=["POST"]),
    Route(URL_PREFIX + "{key:path}", get_image, methods=["GET"]),
    Route("/v1/me", me, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
