"""Real Postgres, Redis and S3 endpoint for the session; isolated state per test.

Postgres: one throw-away cluster per session; each test gets its own database
cloned from a migrated template. Redis: one server per session, flushed before
each test. S3: moto's standalone HTTP server as a child process, one bucket per
test. The server runs in a real uvicorn on a free port, the worker is a real
arq worker driving the tiny diffusers model (loaded once per session).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from gpu_worker.pipeline import DiffusersPipeline, Pipeline
from gpu_worker.tiny_model import ensure
from gpu_worker.worker import create_worker
from server.app import Server, create_app
from stepcast import schema
from stepcast import settings as settings_module
from stepcast.cli.processes import LocalPostgres, LocalRedis, LocalRedisCluster, free_port, wait_for_port
from stepcast.db import Database
from stepcast.models import queue_of
from stepcast.params import JobParams
from stepcast.settings import DATA_DIR, Settings

ROOT = Path(__file__).resolve().parent.parent  # the checkout the tests run from
TEMPLATE_DB = "stepcast_template"
PROBLEM = "application/problem+json"

for name in [n for n in os.environ if n.startswith("STEPCAST_")]:
    del os.environ[name]  # tests configure themselves; a developer's environment must not leak in


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    server = LocalPostgres(DATA_DIR / "test" / "postgres", free_port(), durable=False)
    server.start()
    try:
        subprocess.run(["psql", server.dsn(), "-qc", f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"'], check=True)
        server.create_database(TEMPLATE_DB)

        asyncio.run(schema.migrate(settings_module.load(database_url=server.dsn(TEMPLATE_DB))))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    server = LocalRedis(DATA_DIR / "test" / "redis", free_port(), durable=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    """A Redis only this test uses, so it can be killed, or hold what another does not."""
    port = free_port()
    server = LocalRedis(DATA_DIR / "test" / f"redis-{port}", port, durable=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """Three primaries with a replica each, for the event plane on a cluster."""
    cluster = LocalRedisCluster(DATA_DIR / "test" / "redis-cluster")
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def event_plane(request: pytest.FixtureRequest) -> str:
    """Where the test's jobs' events live: "plain" (the queue's Redis), or "cluster" for a
    module marked ``pytest.mark.parametrize("event_plane", ["cluster"], indirect=True)``."""
    return str(getattr(request, "param", "plain"))


@pytest.fixture
async def event_plane_settings(event_plane: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if event_plane == "plain":
        return {}
    cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
    for node in await asyncio.to_thread(cluster.primaries):  # isolated state per test
        client = Redis.from_url(node.url())
        await client.flushall()
        await client.aclose()
    return {"event_redis_url": cluster.url(), "event_redis_cluster": True}


@pytest.fixture
async def own_postgres() -> AsyncIterator[tuple[LocalPostgres, str]]:
    """A Postgres cluster only this test uses (initdb once, kept under .data/test), and a fresh database."""
    server = LocalPostgres(DATA_DIR / "test" / "postgres-faults", free_port(), durable=False)
    await asyncio.to_thread(server.start)
    name = f"faults_{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.to_thread(server.create_database, name)
        await schema.migrate(settings_module.load(database_url=server.dsn(name)))
        yield server, server.dsn(name)
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server: a real HTTP endpoint speaking the S3 protocol."""
    port = free_port()
    log = DATA_DIR / "test" / "moto.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port, process, 30, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


# The two families the tests serve: ``@pytest.mark.parametrize("settings", MODELS,
# indirect=True, ids=MODEL_IDS)`` runs a test against each (server and workers on that model).
TINY_XL = {"model_name": "tiny-xl", "model_dir": str(DATA_DIR / "models" / "tiny-xl")}
MODELS = [{}, TINY_XL]
MODEL_IDS = ["sd1", "sdxl"]


@pytest.fixture(scope="session")
def pipelines() -> Callable[[str], Pipeline]:
    """The tiny pipeline of a model name (``tiny``, ``tiny-xl``), loaded once per session."""
    loaded: dict[str, Pipeline] = {}

    def get(name: str) -> Pipeline:
        if name not in loaded:
            loaded[name] = DiffusersPipeline.load(ensure(DATA_DIR / "models" / name, shape=name), name=name)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def pipeline(pipelines: Callable[[str], Pipeline]) -> Pipeline:
    return pipelines("tiny")


@pytest.fixture
async def database_url(postgres: LocalPostgres) -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
        yield postgres.dsn(name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def redis_url(redis_server: LocalRedis) -> AsyncIterator[str]:
    client = Redis.from_url(redis_server.url())
    await client.flushall()
    await client.aclose()
    yield redis_server.url()


@pytest.fixture
def make_settings(
    database_url: str, redis_url: str, tmp_path: Path, event_plane_settings: dict[str, Any]
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "redis_url": redis_url,
            "storage_dir": tmp_path / "images",
            "default_size_px": 64,
            "poll_delay_s": 0.5,  # wake-ups start jobs; a missed one would show as slow tests
            "heartbeat_s": 0.2,
            "port": free_port(),
            # Tests about something else run as one user; tests/test_auth.py uses keys.
            "auth": "single_user",
            **event_plane_settings,
        }
        values.update(overrides)
        return settings_module.load(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings], request: pytest.FixtureRequest) -> Settings:
    """Test settings; ``@pytest.mark.parametrize("settings", [{...}], indirect=True)`` overrides some."""
    return make_settings(**getattr(request, "param", {}))


async def eventually(probe: Callable[[], Awaitable[Any]], timeout_s: float = 30) -> Any:
    """Poll ``probe`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := await probe():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true after {timeout_s} s")


async def finish_within(awaitable: Awaitable[Any], timeout_s: float, what: str) -> None:
    """Await a fixture's step (a start, a teardown), at most ``timeout_s``. One that hangs fails
    the test with the stacks of the loop's tasks (where it hung), and is cancelled: the tests
    after it share this event loop and must not inherit a server or worker still running."""
    step = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({step}, timeout=timeout_s)
    if done:
        step.result()
        return
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.print_stack(limit=12, file=stacks)
    step.cancel()
    await asyncio.wait({step}, timeout=5)
    raise AssertionError(f"{what} still running after {timeout_s} s; the tasks:\n{stacks.getvalue()}")


@dataclass
class Stack:
    settings: Settings
    client: httpx.AsyncClient
    db: Database

    async def submit(self, **params: Any) -> dict[str, Any]:
        response = await self.client.post("/v1/jobs", json={"prompt": "a red fox", **params})
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait(self, job_id: str, *, timeout_s: float = 30) -> dict[str, Any]:
        """Poll the REST API until the job is terminal."""
        return await self.wait_as(job_id, {}, timeout_s=timeout_s)

    async def wait_as(self, job_id: str, headers: dict[str, str], *, timeout_s: float = 30) -> dict[str, Any]:
        """:meth:`wait`, sending these headers (credentials)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job: dict[str, Any] = (await self.client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
            if job["status"] in {"completed", "failed", "canceled"}:
                return job
            await asyncio.sleep(0.02)
        raise AssertionError(f"job {job_id} not finished after {timeout_s} s: {job}")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Settings], Awaitable[str]]]:
    """Start the real app under uvicorn on the settings' port; returns its base URL."""
    servers: list[tuple[Server, asyncio.Task[None]]] = []

    async def start(settings: Settings) -> str:
        server = Server(create_app(settings), settings)
        task = asyncio.create_task(server.serve())
        servers.append((server, task))

        async def started() -> None:
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)

        await finish_within(started(), 30, f"the server's start on port {settings.port}")
        return f"http://127.0.0.1:{settings.port}"

    yield start
    for server, _ in servers:
        server.should_exit = True
    for server, task in servers:
        await finish_within(task, 30, f"the server on port {server.config.port}")


def model_queue(settings: Settings) -> str:
    """The queue of the settings' model's jobs."""
    return queue_of(settings.queue_name, settings.model_name)


def fox_params(**changes: Any) -> JobParams:
    """Whole job params, as the parser makes them, for tests that build a job by hand."""
    params = JobParams(
        prompt="a fox", negative_prompt=None, model="tiny", steps=4, width=64, height=64,
        guidance_scale=7.5, seed=7, num_images=1, scheduler=None,
    )  # fmt: skip
    return replace(params, **changes)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as the STEPCAST_* variables a child process reads them from."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("STEPCAST_")}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            structured = isinstance(value, tuple | dict)  # a JSON list or object
            text = (
                json.dumps(list(value) if isinstance(value, tuple) else value) if structured else str(value)
            )
            env[f"STEPCAST_{name.upper()}"] = text
    return env


@dataclass
class StepcastProcess:
    """A server or worker as a separate process, to kill and start again like a real one."""

    module: str
    settings: Settings
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.port}/v1/ws"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=settings_env(self.settings),
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )
        if self.module == "server.app":
            wait_for_port(self.settings.port, self.process, 30, self.log)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[[str, Settings], Awaitable[StepcastProcess]]]:
    """Start ``server.app`` or ``gpu_worker.worker`` as a child process; stopped after the test."""
    started: list[StepcastProcess] = []

    async def start(module: str, settings: Settings) -> StepcastProcess:
        log = DATA_DIR / "test" / f"{module}-{settings.port}.log"
        child = StepcastProcess(module, settings, log)
        await asyncio.to_thread(child.start)
        started.append(child)
        return child

    yield start
    for child in started:
        if child.process is not None and child.process.poll() is None:
            child.process.terminate()
            await asyncio.to_thread(child.process.wait, 10)


@pytest.fixture
async def run_worker(pipelines: Callable[[str], Pipeline]) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    """Start an in-process arq worker on the shared pipeline of its settings' model."""
    workers: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(settings: Settings, *, with_pipeline: Pipeline | None = None) -> None:
        loaded = with_pipeline or pipelines(settings.model_name)
        worker = create_worker(settings, pipeline=loaded, handle_signals=False)
        task = asyncio.create_task(worker.async_run())
        workers.append((worker, task))
        # Up, its model announced: a submit from now on finds a live worker of its model.
        ready = asyncio.ensure_future(worker.ready.wait())
        await asyncio.wait({ready, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # its start failed: say why
        if not ready.done():
            ready.cancel()
            raise AssertionError("the worker did not start within 60 s")

    yield start
    for worker, task in workers:
        await finish_within(worker.close(), 30, "a worker's close")
        await finish_within(asyncio.gather(task, return_exceptions=True), 10, "a worker")


@pytest.fixture
async def client(
    settings: Settings, serve: Callable[[Settings], Awaitable[str]]
) -> AsyncIterator[httpx.AsyncClient]:
    """A REST client of a real server with no worker."""
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        yield client


def assert_problem(
    response: httpx.Response, status: int, fields: dict[str, str] | None = None
) -> dict[str, Any]:
    """A problem+json answer with this status (and these field errors)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == status
    if fields:
        assert {e["field"]: e["message"] for e in body["errors"]} == fields
    return body


@pytest.fixture
async def stack(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
) -> AsyncIterator[Stack]:
    """Server + one worker on real Postgres, Redis and the tiny model."""
    base_url = await serve(settings)
    await run_worker(settings)
    db = await Database.connect(settings.database_url, max_size=2)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        yield Stack(settings, client, db)
    await db.close()
