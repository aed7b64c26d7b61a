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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from stepcast.processes import LocalPostgres, LocalRedis, free_port, running, wait_for_port
from stepcast.settings import DATA_DIR, ROOT

BENCH_DIR = DATA_DIR / "bench"


@dataclass
class Running:
    servers: list[subprocess.Popen[bytes]]
    ports: list[int]
    redis_url: str
    database_url: str
    workers: list[subprocess.Popen[bytes]]
    start_worker: Callable[[], subprocess.Popen[bytes]]

    @property
    def http_url(self) -> str:
        return self.http_urls[0]

    @property
    def ws_url(self) -> str:
        return self.ws_urls[0]

    @property
    def http_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    @property
    def ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/v1/ws" for port in self.ports]

    @property
    def server_pid(self) -> int:
        return self.servers[0].pid

    def replace_worker(self, index: int) -> None:
        """SIGKILL worker ``index`` (no goodbye: its lease just stops) and start a new one."""
        self.workers[index].kill()
        self.workers[index].wait(30)
        self.workers[index] = self.start_worker()

    def kill_server(self, index: int) -> None:
        """SIGKILL server ``index``: its sockets drop, its clients go to another server."""
        self.servers[index].kill()
        self.servers[index].wait(30)


@contextlib.contextmanager
def services(name: str) -> Iterator[tuple[LocalPostgres, LocalRedis]]:
    base = BENCH_DIR / name
    postgres = LocalPostgres(base / "postgres", free_port(), durable=False)
    redis = LocalRedis(base / "redis", free_port(), durable=False)
    with running(postgres, redis):
        yield postgres, redis


@contextlib.contextmanager
def stepcast(
    name: str,
    postgres: LocalPostgres,
    redis: LocalRedis,
    *,
    workers: int,
    env: dict[str, str],
    servers: int = 1,
) -> Iterator[Running]:
    """Server processes and workers on a fresh database and an empty Redis."""
    database = f"bench_{int(time.time() * 1000)}"
    postgres.create_database(database)
    subprocess.run(["redis-cli", "-p", str(redis.port), "flushall"], check=True, capture_output=True)
    settings = {
        **os.environ,
        "STEPCAST_DATABASE_URL": postgres.dsn(database),
        "STEPCAST_REDIS_URL": redis.url(),
        "STEPCAST_LOG_LEVEL": "WARNING",
        "STEPCAST_AUTH": "single_user",  # loopback only
        "STEPCAST_STORAGE_DIR": str(BENCH_DIR / name / "images"),
        **env,
    }
    ports = [free_port() for _ in range(servers)]
    log_path = BENCH_DIR / name / "processes.log"
    with open(log_path, "ab") as log:

        def start(module: str, extra: Mapping[str, str]) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", module], env={**settings, **extra}, cwd=ROOT, stdout=log, stderr=log
            )

        def start_worker() -> subprocess.Popen[bytes]:
            return start("gpu_worker.worker", {})

        front = [start("server.app", {"STEPCAST_PORT": str(port)}) for port in ports]
        fleet = [start_worker() for _ in range(workers)]
        try:
            for port, server in zip(ports, front, strict=True):
                wait_for_port(port, server, 30, log_path)
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read()
            yield Running(
                servers=front,
                ports=ports,
                redis_url=redis.url(),
                database_url=postgres.dsn(database),
                workers=fleet,
                start_worker=start_worker,
            )
        finally:
            for process in [*front, *fleet]:
                if process.poll() is None:
                    process.terminate()
            for process in [*front, *fleet]:
                process.wait(30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float], digits: int = 2) -> dict[str, float] | None:
    """p50 and p99 of the values (None for none)."""
    if not values:
        return None
    return {"p50": round(percentile(values, 0.5), digits), "p99": round(percentile(values, 0.99), digits)}


def write_result(name: str, result: object) -> None:
    """Print the figures and keep them in .data/bench/<name>.json."""
    print(json.dumps(result))
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    (BENCH_DIR / f"{name}.json").write_text(json.dumps(result, indent=2))


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
