"""A Python client for a stepcast server: async (:class:`AsyncClient`) and sync (:class:`Client`).

``watch`` follows a job's events over the WebSocket and resumes by itself after a drop, from the
last ``seq`` it saw. Errors come back as :class:`ApiError` with the server's problem details.
An example: README.md, "A 30-second tour".
"""

from __future__ import annotations

import asyncio
import builtins
import json
import random
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stepcast.status import TERMINAL

RECONNECT_MAX_S = 5.0


class ApiError(Exception):
    """The server said no: ``status`` and ``code`` from its problem+json (or error frame)."""

    def __init__(
        self, status: int, code: str, detail: str, errors: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors or []


@dataclass(frozen=True)
class Image:
    url: str
    width: int
    height: int
    seed: int
    content_type: str


@dataclass(frozen=True)
class Job:
    """A job as the server shows it (its wire shape, parsed). ``status`` stays the wire's string, so a
    client keeps working with a newer server's statuses; compare it with :class:`Status` members."""

    id: str
    status: str
    attempt: int
    params: dict[str, Any]
    progress_step: int
    progress_total: int
    queue_position: int | None
    images: list[Image]
    error: dict[str, str] | None
    last_seq: int
    raw: dict[str, Any] = field(repr=False)
    estimated_start_at: str | None = None  # while pending: when it should start

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Job:
        result = data.get("result") or {}
        return cls(
            id=data["id"],
            status=data["status"],
            attempt=data["attempt"],
            params=data["params"],
            progress_step=data["progress"]["step"],
            progress_total=data["progress"]["total"],
            queue_position=data.get("queue_position"),
            images=[Image(**image) for image in result.get("images", [])],
            error=data.get("error"),
            last_seq=data["last_seq"],
            raw=data,
            estimated_start_at=data.get("estimated_start_at"),
        )


@dataclass(frozen=True)
class Event:
    """One job event (``queued``, ``started``, ``progress``…) or a ``snapshot``."""

    type: str
    job_id: str
    seq: int | None
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        if self.type == "snapshot":
            return bool(self.data["job"]["status"] in TERMINAL)
        return self.type in TERMINAL


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class Model:
    """A model a job may name (``GET /v1/models``): its limits, live workers, queue and ETA."""

    name: str
    family: str | None
    workers: int  # live now; 0: a job waits until one starts
    pending: int
    eta_s: float | None  # for a job sent now, at the model's defaults
    limits: dict[str, Any]
    default: bool
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_wire(cls, data: dict[str, Any], default: str) -> Model:
        return cls(
            name=data["name"],
            family=data.get("family"),
            workers=len(data["workers"]),
            pending=data["queue"]["pending"],
            eta_s=data.get("eta_s"),
            limits=data["limits"],
            default=data["name"] == default,
            raw=data,
        )


def _raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    code = str(body.get("type", "")).rpartition(":")[2] or "http_error"
    raise ApiError(response.status_code, code, body.get("detail", response.text), body.get("errors"))


class AsyncClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout_s)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def submit(
        self,
        prompt: str,
        *,
        idempotency_key: str | None = None,
        preview: dict[str, int] | None = None,
        wait_s: int | None = None,
        start_within_s: float | None = None,
        **params: Any,
    ) -> Job:
        """Submit a job; ``wait_s`` (≤ 60) holds the answer until it finishes, if it does by then;
        ``start_within_s``: queue it only if it should start within that long (else the server
        answers 429 start_too_late, raised here as :class:`ApiError`, and queues nothing)."""
        headers = {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if wait_s is not None:
            headers["Prefer"] = f"wait={wait_s}"
        body = {"prompt": prompt, **params, **({"preview": preview} if preview else {})}
        if start_within_s is not None:
            body["start_within_s"] = start_within_s
        response = await self.http.post("/v1/jobs", json=body, headers=headers)
        _raise_for_problem(response)
        return Job.from_wire(response.json())

    async def get(self, job_id: str) -> Job:
        response = await self.http.get(f"/v1/jobs/{job_id}")
        _raise_for_problem(response)
        return Job.from_wire(response.json())

    async def list(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> Page:
        query: dict[str, Any] = {"limit": limit}
        if status:
            query["status"] = status
        if cursor:
            query["cursor"] = cursor
        response = await self.http.get("/v1/jobs", params=query)
        _raise_for_problem(response)
        body = response.json()
        return Page([Job.from_wire(item) for item in body["items"]], body["next_cursor"])

    async def cancel(self, job_id: str) -> Job:
        response = await self.http.post(f"/v1/jobs/{job_id}/cancel")
        _raise_for_problem(response)
        return Job.from_wire(response.json())

    async def download(self, image: Image) -> bytes:
        response = await self.http.get(image.url)  # relative (local storage) or presigned (S3)
        _raise_for_problem(response)
        return response.content

    async def webhooks(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The job's webhook deliveries (GET /v1/jobs/{id}/webhooks), oldest first."""
        response = await self.http.get(f"/v1/jobs/{job_id}/webhooks")
        _raise_for_problem(response)
        items: builtins.list[dict[str, Any]] = response.json()["items"]
        return items

    async def redeliver(self, job_id: str, delivery_id: str) -> dict[str, Any]:
        """Send one of them again now, under its own webhook-id."""
        response = await self.http.post(f"/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver")
        _raise_for_problem(response)
        delivery: dict[str, Any] = response.json()
        return delivery

    async def models(self) -> builtins.list[Model]:
        """The models a job may name here, the default first."""
        response = await self.http.get("/v1/models")
        _raise_for_problem(response)
        body = response.json()
        models = [Model.from_wire(item, body["default"]) for item in body["models"]]
        return sorted(models, key=lambda model: not model.default)

    async def watch(self, job_id: str, *, after_seq: int | None = None) -> AsyncGenerator[Event, None]:
        """The job's events until its terminal one, resuming after every dropped connection."""
        ws_url = self.base_url.replace("http", "ws", 1) + "/v1/ws"
        last_seq = after_seq
        delay_s = 0.2
        while True:
            try:
                async with websockets.connect(ws_url, additional_headers=self.headers, max_size=2**24) as ws:
                    subscribe: dict[str, Any] = {"type": "subscribe", "job_id": job_id}
                    if last_seq is not None:
                        subscribe["after_seq"] = last_seq
                    await ws.send(json.dumps(subscribe))
                    delay_s = 0.2
                    async for raw in ws:
                        message = json.loads(raw)
                        if message["type"] == "error":
                            raise ApiError(400, message["code"], message["message"])
                        event = Event(
                            message["type"], message.get("job_id", job_id), message.get("seq"), message
                        )
                        if event.type == "snapshot":
                            last_seq = message["job"]["last_seq"]
                        elif event.seq is not None:
                            last_seq = event.seq
                        yield event
                        if event.terminal:
                            return
            except (ConnectionClosed, OSError, InvalidStatus) as exc:
                # Refused for good: the key was revoked (close 4401), or is not accepted at all.
                if isinstance(exc, ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == 4401:
                    raise ApiError(401, "unauthorized", exc.rcvd.reason or "API key revoked") from None
                if isinstance(exc, InvalidStatus) and exc.response.status_code in {401, 403}:
                    status = exc.response.status_code
                    raise ApiError(status, "unauthorized", "the server refused the connection") from None
                # The server went away (restart, deploy, network): come back and resume.
                await asyncio.sleep(delay_s * (0.5 + random.random()))
                delay_s = min(delay_s * 2, RECONNECT_MAX_S)

    async def wait(self, job_id: str) -> Job:
        """The job once it is finished."""
        async for _ in self.watch(job_id):
            pass
        return await self.get(job_id)


class Client:
    """The same calls, blocking; ``watch`` is a plain iterator."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 30) -> None:
        self._runner = asyncio.Runner()
        self._async = self._runner.run(_make(base_url, api_key, timeout_s))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._async.close())
        self._runner.close()

    def submit(self, prompt: str, **kwargs: Any) -> Job:
        return self._runner.run(self._async.submit(prompt, **kwargs))

    def get(self, job_id: str) -> Job:
        return self._runner.run(self._async.get(job_id))

    def list(self, **kwargs: Any) -> Page:
        return self._runner.run(self._async.list(**kwargs))

    def cancel(self, job_id: str) -> Job:
        return self._runner.run(self._async.cancel(job_id))

    def download(self, image: Image) -> bytes:
        return self._runner.run(self._async.download(image))

    def models(self) -> builtins.list[Model]:
        return self._runner.run(self._async.models())

    def webhooks(self, job_id: str) -> builtins.list[dict[str, Any]]:
        return self._runner.run(self._async.webhooks(job_id))

    def redeliver(self, job_id: str, delivery_id: str) -> dict[str, Any]:
        return self._runner.run(self._async.redeliver(job_id, delivery_id))

    def wait(self, job_id: str) -> Job:
        return self._runner.run(self._async.wait(job_id))

    def watch(self, job_id: str, *, after_seq: int | None = None) -> Iterator[Event]:
        events = self._async.watch(job_id, after_seq=after_seq)
        try:
            while True:
                try:
                    yield self._runner.run(_next(events))
                except StopAsyncIteration:
                    return
        finally:
            self._runner.run(events.aclose())


async def _make(base_url: str, api_key: str | None, timeout_s: float) -> AsyncClient:
    # httpx binds its pool to the loop it is created on: create it on the runner's.
    return AsyncClient(base_url, api_key=api_key, timeout_s=timeout_s)


async def _next(events: AsyncGenerator[Event, None]) -> Event:
    return await anext(events)
