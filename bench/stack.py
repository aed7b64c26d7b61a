"""A whole stepcast on loopback for benchmarks: Postgres, Redis, one server
process and N worker processes, all torn down afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from stepcast.processes import LocalPostgres, LocalRedis, free_port, running, wait_for_port
from stepcast.settings import DATA_DIR, ROOT

BENCH_DIR = DATA_DIR / "bench"


@dataclass
class Running:
    http_url: str
    ws_url: str
    redis_url: str
    server_pid: int


@contextlib.contextmanager
def services(name: str) -> Iterator[tuple[LocalPostgres, LocalRedis]]:
    base = BENCH_DIR / name
    postgres = LocalPostgres(base / "postgres", free_port(), durable=False)
    redis = LocalRedis(base / "redis", free_port(), durable=False)
    with running(postgres, redis):
        yield postgres, redis


@contextlib.contextmanager
def stepcast(
    name: str, postgres: LocalPostgres, redis: LocalRedis, *, workers: int, env: dict[str, str]
) -> Iterator[Running]:
    """Server and workers on a fresh database and an empty Redis."""
    database = f"bench_{int(time.time() * 1000)}"
    postgres.create_database(database)
    subprocess.run(["redis-cli", "-p", str(redis.port), "flushall"], check=True, capture_output=True)
    port = free_port()
    settings = {
        **os.environ,
        "STEPCAST_DATABASE_URL": postgres.dsn(database),
        "STEPCAST_REDIS_URL": redis.url(),
        "STEPCAST_PORT": str(port),
        "STEPCAST_LOG_LEVEL": "WARNING",
        "STEPCAST_STORAGE_DIR": str(BENCH_DIR / name / "images"),
        **env,
    }
    log_path = BENCH_DIR / name / "processes.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "server.app"], env=settings, cwd=ROOT, stdout=log, stderr=log
        )
        fleet = [
            subprocess.Popen(
                [sys.executable, "-m", "gpu_worker.worker"], env=settings, cwd=ROOT, stdout=log, stderr=log
            )
            for _ in range(workers)
        ]
        try:
            wait_for_port(port, server, 30, log_path)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read()
            yield Running(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws", redis.url(), server.pid)
        finally:
            for process in [server, *fleet]:
                process.terminate()
            for process in [server, *fleet]:
                process.wait(30)


def warm_up(http_url: str, jobs: int, params: Mapping[str, object], timeout_s: float = 120) -> None:
    """Run a few jobs to the end, so every worker has loaded its model and polled."""
    ids = []
    for _ in range(jobs):
        request = urllib.request.Request(
            f"{http_url}/v1/jobs",
            data=json.dumps({"prompt": "warm up", **params}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            ids.append(json.load(response)["id"])
    deadline = time.monotonic() + timeout_s
    for job_id in ids:
        while True:
            with urllib.request.urlopen(f"{http_url}/v1/jobs/{job_id}", timeout=10) as response:
                if json.load(response)["status"] in {"completed", "failed", "canceled"}:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("warm-up jobs did not finish")
            time.sleep(0.05)
