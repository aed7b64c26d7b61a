"""``make run``: Postgres, Redis, the server and one worker on this machine.

Postgres and Redis are started as child processes when the configured URLs
point at loopback (data under ``.data/``); URLs that point elsewhere are used
as they are. The server and the worker run as child processes too, and
everything stops together on Ctrl-C, SIGTERM, or when any part dies.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from urllib.parse import urlsplit

from stepcast.processes import LocalPostgres, LocalRedis, ProcessError
from stepcast.settings import DATA_DIR, Settings

logger = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise ProcessError(f"{child.args!r} exited with {child.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise ProcessError(f"the server at {url} was not ready within {timeout_s} s")


def run(settings: Settings) -> int:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    with ExitStack() as stack:
        db_url = urlsplit(settings.database_url)
        if db_url.hostname in LOOPBACK:
            postgres = LocalPostgres(
                DATA_DIR / "postgres", db_url.port or 5432, user=db_url.username or "stepcast"
            )
            postgres.start()
            stack.callback(postgres.stop)
            postgres.create_database(db_url.path.lstrip("/") or "stepcast")
            print(
                f"postgres  {postgres.dsn(db_url.path.lstrip('/'))}  (data: {postgres.data_dir})", flush=True
            )
        redis_url = urlsplit(settings.redis_url)
        if redis_url.hostname in LOOPBACK:
            redis = LocalRedis(DATA_DIR / "redis", redis_url.port or 6379)
            redis.start()
            stack.callback(redis.stop)
            print(f"redis     {settings.redis_url}", flush=True)

        env = os.environ.copy()
        if "STEPCAST_AUTH" not in env and settings.host in LOOPBACK:
            # Only this machine can reach it: one user, no keys to juggle.
            env["STEPCAST_AUTH"] = "single_user"
            print("auth      single user (loopback only; STEPCAST_AUTH=keys for API keys)", flush=True)
        children: list[subprocess.Popen[bytes]] = []
        for module in ("server.app", "gpu_worker.worker"):
            child = subprocess.Popen([sys.executable, "-m", module], env=env)
            children.append(child)
            stack.callback(_terminate, child)

        url = f"http://{settings.host}:{settings.port}"
        _wait_ready(url, children, timeout_s=120)
        print(f"\nstepcast is up: {url}   (Ctrl-C stops everything)\n", flush=True)
        while not stop:
            for child in children:
                if child.poll() is not None:
                    logger.error("%s exited with %s; stopping", child.args, child.returncode)
                    return 1
            time.sleep(0.5)
    return 0


def _terminate(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
