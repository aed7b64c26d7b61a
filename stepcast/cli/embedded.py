"""``stepcast run``: Postgres, Redis, the server and the workers on this machine, kept running.

Postgres and Redis start as child processes when their URLs point at loopback (data under
``.data/``); the schema migrations are applied before the server and workers start, and again
when the embedded Postgres restarts. Every child runs under a
:class:`~stepcast.cli.supervisor.Supervisor`; Ctrl-C or SIGTERM stops workers and server first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from stepcast import schema
from stepcast.cli.processes import LocalPostgres, LocalRedis, ProcessError
from stepcast.cli.supervisor import Child, Command, Service, Supervisor, say
from stepcast.errors import SchemaError
from stepcast.settings import DATA_DIR, Settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
NOT_READY_WARNING_S = 120.0


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The CUDA devices workers may be given: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    if (visible := env.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    try:
        listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []  # a driver that does not answer: no GPU to hand out
    gpus = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    return [str(index) for index in range(len(gpus))]


def worker_envs(settings: Settings, env: Mapping[str, str], workers: int | None) -> list[dict[str, str]]:
    """One environment per worker process.

    ``workers`` (``--workers``) wins, then an explicit ``STEPCAST_WORKERS``,
    then one per GPU on ``STEPCAST_DEVICE=cuda``, then ``settings.workers``.
    On GPUs each worker sees one (round robin); workers get distinct ids (when
    one is configured) and distinct metrics ports (when served).
    """
    gpus = visible_gpus(env) if settings.device in ("auto", "cuda") else []
    if workers is None:
        explicit = "workers" in settings.model_fields_set
        workers = len(gpus) if gpus and not explicit else settings.workers
    envs = []
    for index in range(workers):
        worker_env = dict(env)
        if gpus:
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        if settings.worker_id is not None and workers > 1:
            worker_env["STEPCAST_WORKER_ID"] = f"{settings.worker_id}-{index}"
        if settings.worker_metrics_port:
            worker_env["STEPCAST_WORKER_METRICS_PORT"] = str(settings.worker_metrics_port + index)
        envs.append(worker_env)
    return envs


def local_postgres(settings: Settings, data_dir: Path) -> tuple[LocalPostgres, str] | None:
    """The Postgres this machine runs for ``settings`` (and its database), if its URL is loopback."""
    db_url = urlsplit(settings.database_url)
    if db_url.hostname not in LOOPBACK:
        return None
    postgres = LocalPostgres(data_dir / "postgres", db_url.port or 5432, user=db_url.username or "stepcast")
    return postgres, db_url.path.lstrip("/") or "stepcast"


def migrate(settings: Settings) -> None:
    """Apply the migrations the database lacks, as `stepcast migrate` does."""
    try:
        applied = asyncio.run(schema.migrate(settings))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, SchemaError) as exc:
        raise ProcessError(f"cannot migrate the database (STEPCAST_DATABASE_URL): {exc}") from exc
    for migration in applied:
        say(f"migrated  {migration.name}")


def _services(settings: Settings, data_dir: Path) -> list[Child]:
    services: list[Child] = []
    if (local := local_postgres(settings, data_dir)) is not None:
        postgres, database = local

        def ready() -> None:
            postgres.create_database(database)
            migrate(settings)

        services.append(Service("postgres", postgres, ready=ready))
        say(f"postgres  {postgres.dsn(database)}  (data: {postgres.data_dir})")
    redis_url = urlsplit(settings.redis_url)
    if redis_url.hostname in LOOPBACK:
        redis = LocalRedis(data_dir / "redis", redis_url.port or 6379)
        services.append(Service("redis", redis))
        say(f"redis     {settings.redis_url}  (data: {redis.data_dir})")
    return services


def _apps(settings: Settings, workers: int | None) -> list[Child]:
    env = os.environ.copy()
    env["PYTHONUNBUFFERED"] = "1"  # their lines reach the terminal as they are written
    if settings.log_format == "auto":
        # Their output comes through pipes: they log as if they wrote to this terminal.
        env["STEPCAST_LOG_FORMAT"] = "text" if sys.stderr.isatty() else "json"
    if "STEPCAST_AUTH" not in env and settings.host in LOOPBACK:
        # Only this machine can reach it: one user, no keys to juggle.
        env["STEPCAST_AUTH"] = "single_user"
        say("auth      single user (loopback only; STEPCAST_AUTH=keys for API keys)")
    # Each stops within its own grace period after SIGTERM; a margin, then SIGKILL.
    apps: list[Child] = [
        Command(
            "server",
            [sys.executable, "-m", "server.app"],
            env,
            stop_timeout_s=settings.server_shutdown_s + 10,
        )
    ]
    for index, worker_env in enumerate(worker_envs(settings, env, workers)):
        gpu = worker_env.get("CUDA_VISIBLE_DEVICES") if settings.device in ("auto", "cuda") else None
        say(f"worker-{index}  {'GPU ' + gpu if gpu is not None else 'STEPCAST_DEVICE=' + settings.device}")
        apps.append(
            Command(
                f"worker-{index}",
                [sys.executable, "-m", "gpu_worker.worker"],
                worker_env,
                stop_timeout_s=settings.shutdown_grace_s + 10,
            )
        )
    return apps


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, OSError):
        return False


def run(settings: Settings, *, workers: int | None = None, data_dir: Path = DATA_DIR) -> int:
    """Run everything until Ctrl-C or SIGTERM (0) or until a child keeps dying (1)."""
    supervisor = Supervisor([_services(settings, data_dir), _apps(settings, workers)])
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stopping.is_set():
            supervisor.kill()  # a second Ctrl-C: no more waiting for graceful stops
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if local_postgres(settings, data_dir) is None:
            migrate(settings)  # an embedded Postgres is migrated as it comes up (_services)
        supervisor.start()
        url = f"http://{settings.host}:{settings.port}"
        up = False
        slow_at = time.monotonic() + NOT_READY_WARNING_S
        while not stopping.wait(0.2):
            supervisor.check()
            if not up and _ready(url):
                up = True
                say(f"\nstepcast is up: {url}   (Ctrl-C stops everything)\n")
            elif not up and time.monotonic() > slow_at:
                slow_at = float("inf")  # once: a server that hangs without exiting
                say(f"the server at {url} is not ready after {NOT_READY_WARNING_S:g} s; still waiting")
        say("stopping")
        return 0
    except ProcessError as exc:
        print(f"stepcast: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
