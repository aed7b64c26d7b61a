"""The control plane alone: stepcast on no-op work next to bare arq, in one run.

Everything on loopback: one Postgres, one Redis, one server process and N
worker processes on the ``simulated`` backend with no delay (one step, so a
job is all control plane: submit, row, queue, claim, events, image, terminal
write, fan-out), batching as configured by default (``--batch-size``: 1 makes
every job a pipeline call of its own). Reported:

1. jobs/s end to end: every job submitted at once, spread over ``--sockets``
   WebSocket clients, each done when its jobs' `completed` events reach it;
2. the same number of no-op jobs through bare arq, N worker processes
   (``max_jobs`` 10, ``poll_delay`` 10 ms: arq at its quickest), enqueued
   from here, done when the function has run (it counts in Redis);
3. the ratio of the two (goal: stepcast >= 50 % of bare arq): the two take
   turns for ``--rounds`` rounds (a fresh stepcast each round), so that a
   shared machine's drifting speed slows both alike; each round's ratio and
   their median;
4. CPU of every component (share of one core) while stepcast runs 1,000
   jobs a minute for ``--steady-s`` seconds (goal: none saturates a core).

    python -m bench.controlplane --jobs 2000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, ClassVar

import httpx
import websockets
from arq import create_pool
from arq.connections import RedisSettings

from bench import stack
from bench.cpu import CpuMeter
from stepcast.cli.processes import LocalRedis
from stepcast.settings import Settings

PARAMS = {"steps": 1, "width": 64, "height": 64}
DONE_KEY = "bench:noop:done"


async def noop(ctx: dict[str, Any]) -> None:
    await ctx["redis"].incr(DONE_KEY)


class BareArq:
    """``arq bench.controlplane.BareArq``: no-op jobs, arq's defaults but a 10 ms poll."""

    functions: ClassVar = [noop]
    redis_settings = RedisSettings.from_dsn(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379"))
    poll_delay = 0.01
    max_jobs = 10


async def bare_arq(redis: LocalRedis, workers: int, jobs: int) -> dict[str, Any]:
    env = {**os.environ, "BENCH_REDIS_URL": redis.url()}
    command = [sys.executable, "-m", "arq", "bench.controlplane.BareArq"]
    fleet = [
        subprocess.Popen(  # noqa: ASYNC220
            command, env=env, cwd=stack.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(workers)
    ]
    pool = await create_pool(RedisSettings.from_dsn(redis.url()))
    try:
        await pool.flushall()
        await asyncio.sleep(2)  # the workers are up and polling
        started = time.perf_counter()
        for _ in range(jobs):
            await pool.enqueue_job("noop")
        while int(await pool.get(DONE_KEY) or 0) < jobs:  # noqa: ASYNC110 (another process counts)
            await asyncio.sleep(0.005)
        wall_s = time.perf_counter() - started
    finally:
        await pool.aclose()
        for process in fleet:
            process.terminate()
        for process in fleet:
            process.wait(30)
    return {"jobs_per_s": round(jobs / wall_s, 1), "wall_s": round(wall_s, 2)}


class Watcher:
    """Counts `completed` events of every job of the (single) owner over one WebSocket."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.completed = 0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with websockets.connect(self.ws_url, max_size=2**22) as ws:
            await ws.send(json.dumps({"type": "subscribe", "scope": "mine"}))
            self.ready.set()
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "completed":
                    self.completed += 1
                elif message["type"] in {"failed", "canceled"}:
                    raise RuntimeError(message)


async def client(ws_url: str, jobs: range) -> None:
    """Submit these jobs at once over one WebSocket and follow each to `completed`."""
    async with websockets.connect(ws_url, max_size=2**22) as ws:
        for index in jobs:
            await ws.send(json.dumps({"type": "submit", "params": {"prompt": f"noop {index}", **PARAMS}}))
        completed = 0
        while completed < len(jobs):
            message = json.loads(await ws.recv())
            if message["type"] == "completed":
                completed += 1
            elif message["type"] in {"failed", "canceled", "error"}:
                raise RuntimeError(message)


async def burst(running: stack.Running, cpu: CpuMeter, jobs: int, sockets: int) -> dict[str, Any]:
    """Every job at once, spread over ``sockets`` WebSocket clients: jobs/s, and where the CPU went.

    The submits go over WebSockets, not REST: an HTTP client in this process
    (httpx) spends about 7 ms of CPU per request, on the same two cores, and
    became the limit; a WebSocket message costs the client about 1 ms.
    """
    cpu.start()
    started = time.perf_counter()
    await asyncio.gather(*(client(running.ws_url, range(i, jobs, sockets)) for i in range(sockets)))
    wall_s = time.perf_counter() - started
    return {
        "sockets": sockets,
        "jobs_per_s": round(jobs / wall_s, 1),
        "wall_s": round(wall_s, 2),
        "core_share": cpu.shares(),
        "cpu_ms_per_job": cpu.ms_per_job(jobs),
    }


async def steady(running: stack.Running, cpu: CpuMeter, per_min: int, seconds: float) -> dict[str, Any]:
    """Submit at a fixed rate; each component's CPU share of one core meanwhile."""
    interval = 60 / per_min
    count = int(seconds / interval)
    watcher = Watcher(running.ws_url)
    watching = asyncio.create_task(watcher.run())
    await watcher.ready.wait()
    cpu.start()
    async with httpx.AsyncClient(base_url=running.http_url, timeout=60) as client:
        started = time.perf_counter()
        for index in range(count):
            await asyncio.sleep(max(0.0, started + index * interval - time.perf_counter()))
            response = await client.post("/v1/jobs", json={"prompt": f"steady {index}", **PARAMS})
            response.raise_for_status()
        while watcher.completed < count and time.perf_counter() - started < seconds + 30:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    watching.cancel()
    return {
        "jobs_per_min": per_min,
        "jobs": count,
        "completed": watcher.completed,
        "core_share": cpu.shares(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sockets", type=int, default=8, help="WebSocket clients sharing the burst")
    parser.add_argument("--rounds", type=int, default=3, help="stepcast and bare arq take turns")
    parser.add_argument("--steady-s", type=float, default=30)
    parser.add_argument("--batch-size", type=int, default=Settings.model_fields["batch_size"].default)
    args = parser.parse_args()
    env = {
        "STEPCAST_BACKEND": "simulated",
        "STEPCAST_SIMULATED_STEP_S": "0",
        "STEPCAST_BATCH_SIZE": str(args.batch_size),
        "STEPCAST_MAX_QUEUE_DEPTH": str(args.jobs),
        "STEPCAST_MAX_JOBS_PER_OWNER": str(args.jobs),
    }
    rounds = []
    with stack.services("controlplane") as (postgres, redis):
        for number in range(1, args.rounds + 1):
            with stack.stepcast("controlplane", postgres, redis, workers=args.workers, env=env) as running:
                stack.warm_up(running.http_url, 4, PARAMS)
                cpu = CpuMeter(running, postgres, redis)
                system = asyncio.run(burst(running, cpu, args.jobs, args.sockets))
            arq = asyncio.run(bare_arq(redis, args.workers, args.jobs))
            ratio = round(system["jobs_per_s"] / arq["jobs_per_s"], 3)
            rounds.append({"stepcast": system, "bare_arq": arq, "ratio": ratio})
            stepcast_rate, arq_rate = system["jobs_per_s"], arq["jobs_per_s"]
            print(f"round {number}: stepcast {stepcast_rate} jobs/s, bare arq {arq_rate}, ratio {ratio}")
        with stack.stepcast("controlplane", postgres, redis, workers=args.workers, env=env) as running:
            stack.warm_up(running.http_url, 4, PARAMS)
            load = asyncio.run(steady(running, CpuMeter(running, postgres, redis), 1000, args.steady_s))
    result = {
        "jobs": args.jobs,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "rounds": rounds,
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "steady": load,
    }
    stack.write_result("controlplane", result)


if __name__ == "__main__":
    main()
