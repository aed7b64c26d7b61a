"""A whole stepcast on loopback for benchmarks: Postgres, Redis, server
processes and worker processes, all torn down afterwards; and what the
benchmarks share (submitting jobs, percentiles, writing results)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets

from stepcast.cli.processes import LocalPostgres, LocalRedis, free_port, running, wait_for_port
from stepcast.settings import DATA_DIR

ROOT = Path(__file__).resolve().parent.parent  # the checkout the benchmarks run from
BENCH_DIR = DATA_DIR / "bench"


@dataclass
class Running:
    servers: list[subprocess.Popen[bytes]]
    ports: list[int]
    redis_url: str
    database_url: str
    workers: list[subprocess.Popen[bytes]]
    start_worker: Callable[[], subprocess.Popen[bytes]]
    start_server: Callable[[int], subprocess.Popen[bytes]] | None = None
    log_path: Path | None = None

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

    def restart_server(self, index: int, timeout_s: float = 30) -> None:
        """SIGKILL server ``index`` and start a new one on its port; returns once it listens."""
        assert self.start_server is not None and self.log_path is not None
        self.kill_server(index)
        self.servers[index] = self.start_server(self.ports[index])
        wait_for_port(self.ports[index], self.servers[index], timeout_s, self.log_path)


@contextlib.contextmanager
def services(name: str, *, durable_postgres: bool = False) -> Iterator[tuple[LocalPostgres, LocalRedis]]:
    """Postgres and Redis for one benchmark; Redis never persists, Postgres only if ``durable_postgres``."""
    base = BENCH_DIR / name
    postgres = LocalPostgres(base / "postgres", free_port(), durable=durable_postgres)
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
        # A benchmark measures throughput, not the limits that keep one client from flooding a server.
        "STEPCAST_REQUESTS_PER_S_PER_OWNER": "100000",
        "STEPCAST_WS_MESSAGES_PER_S": "100000",
        "STEPCAST_WS_BURST": "100000",
        "STEPCAST_MAX_SOCKETS_PER_PROCESS": "1000000",
        "STEPCAST_MAX_SOCKETS_PER_OWNER": "1000000",
        "STEPCAST_MAX_ANONYMOUS_SOCKETS_PER_ADDRESS": "1000000",
        **env,
    }
    ports = [free_port() for _ in range(servers)]
    log_path = BENCH_DIR / name / "processes.log"
    with open(log_path, "ab") as log:
        # As a deployment does before it starts servers and workers.
        migrate = [sys.executable, "-m", "stepcast.cli", "migrate"]
        subprocess.run(migrate, env=settings, cwd=ROOT, stdout=log, stderr=log, check=True)

        def start(module: str, extra: Mapping[str, str]) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", module], env={**settings, **extra}, cwd=ROOT, stdout=log, stderr=log
            )

        def start_worker() -> subprocess.Popen[bytes]:
            return start("gpu_worker.worker", {})

        def start_server(port: int) -> subprocess.Popen[bytes]:
            return start("server.app", {"STEPCAST_PORT": str(port)})

        front = [start_server(port) for port in ports]
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
                start_server=start_server,
                log_path=log_path,
            )
        finally:
            for process in [*front, *fleet]:
                if process.poll() is None:
                    process.terminate()
            for process in [*front, *fleet]:
                process.wait(30)


def restart_redis(redis: LocalRedis) -> None:
    """Stop Redis and start it again empty (it never persists here: nothing comes back)."""
    redis.stop()
    (redis.data_dir / "dump.rdb").unlink(missing_ok=True)
    redis.start()
    # Not DBSIZE: the servers and workers may already be writing again.
    info = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "info", "persistence"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if "rdb_last_load_keys_loaded:0" not in info.split():
        raise RuntimeError(f"redis came back with data: {info}")


def restart_postgres(postgres: LocalPostgres, *, immediate: bool = False) -> None:
    """What ``pg_ctl restart -m fast`` (or ``-m immediate``) does, to the postmaster we own.

    pg_ctl would start the new postmaster outside this process's children, out
    of reach of the clean-up; the same signals (SIGINT: fast, SIGQUIT:
    immediate, a crash that recovery repairs) and a start keep it ours.
    """
    process = postgres.process
    assert process is not None
    process.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
    process.wait(60)
    postgres.start()


# Fast detection of a dead worker for the benchmarks that kill them: a 2 s
# lease renewed every 0.5 s, recovery every 0.5 s, many attempts allowed.
FAST_RECOVERY = {
    "STEPCAST_LEASE_S": "2",
    "STEPCAST_HEARTBEAT_S": "0.5",
    "STEPCAST_RECOVERY_INTERVAL_S": "0.5",
    "STEPCAST_ENQUEUE_GRACE_S": "2",
    "STEPCAST_MAX_ATTEMPTS": "10",
}


async def submit_jobs(
    http_url: str, count: int, params: Mapping[str, object], prefix: str
) -> list[dict[str, Any]]:
    """Submit ``count`` jobs over REST, 50 at a time; the jobs as the server answered them."""
    jobs: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=http_url, timeout=60) as client:
        for start in range(0, count, 50):
            posts = [
                client.post("/v1/jobs", json={"prompt": f"{prefix} {i}", **params})
                for i in range(start, min(count, start + 50))
            ]
            for response in await asyncio.gather(*posts):
                response.raise_for_status()
                jobs.append(response.json())
    return jobs


async def saturate(
    ws_url: str, jobs: int, params: Mapping[str, object], on_completed: Callable[[int], None] = lambda n: None
) -> dict[str, Any]:
    """Every job submitted at once over one WebSocket (one image each, a prompt and seed apiece).

    The rate is taken between the first and the last completion (steady
    state): the first batch's completions open the window, the images after
    them fill it. ``on_completed(n)`` is called as the n-th job completes.
    """
    async with websockets.connect(ws_url, max_size=2**22) as ws:
        for index in range(jobs):
            message = {"type": "submit", "params": {"prompt": f"fox {index}", "seed": index, **params}}
            await ws.send(json.dumps(message))
        done_at: list[float] = []
        batch_sizes: Counter[int] = Counter()
        first_batch: int | None = None
        while len(done_at) < jobs:
            message = json.loads(await ws.recv())
            if message["type"] in {"failed", "canceled", "error"}:
                raise RuntimeError(message)
            if message["type"] == "completed":
                done_at.append(time.perf_counter())
                batch = message["timings"]["batch_size"]
                batch_sizes[batch] += 1
                first_batch = first_batch or batch
                on_completed(len(done_at))
    assert first_batch is not None
    return {
        "images_per_s": round((jobs - first_batch) / (done_at[-1] - done_at[0]), 3),
        "jobs_by_batch_size": dict(sorted(batch_sizes.items())),
    }


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
