"""WebSocket fan-out: N clients, each submitting a job and watching it to the end.

Runs its own Postgres, Redis, one server process and workers on the
``simulated`` backend (loopback only), and reports:

- event latency, worker publish -> client receive, p50/p99. The publish time is
  taken by a reference Redis subscriber in this process (same clock as the
  clients), so the figure is the server's fan-out plus the client's own delay;
- server memory per idle connection (RSS growth over N open sockets / N);
- events published and received (none may be lost), and the wall time.

    python -m bench.ws_fanout --clients 100 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import websockets
from redis.asyncio import Redis

from bench import stack
from stepcast.redis_keys import ALL_JOB_CHANNELS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def run_clients(url: str, redis_url: str, server_pid: int, clients: int, steps: int) -> dict[str, Any]:
    published: dict[tuple[str, int], float] = {}
    received: dict[tuple[str, int], float] = {}
    kinds: dict[tuple[str, int], str] = {}
    redis = Redis.from_url(redis_url)
    reference = redis.pubsub()
    await reference.psubscribe(ALL_JOB_CHANNELS)

    async def stamp_publishes() -> None:
        async for message in reference.listen():
            if message["type"] == "pmessage":
                event = json.loads(message["data"])
                published[(event["job_id"], event["seq"])] = time.perf_counter()

    stamper = asyncio.create_task(stamp_publishes())
    rss_before = rss_kib(server_pid)
    sockets = []
    for _ in range(clients):
        sockets.append(await websockets.connect(url, max_size=2**22, open_timeout=30))
    await asyncio.sleep(1.0)
    rss_idle = rss_kib(server_pid)

    async def client(ws: Any, index: int) -> None:
        await ws.send(json.dumps({"type": "submit", "params": {"prompt": f"bench {index}", "steps": steps}}))
        while True:
            message = json.loads(await ws.recv())
            now = time.perf_counter()
            if "seq" in message:
                received[(message["job_id"], message["seq"])] = now
                kinds[(message["job_id"], message["seq"])] = message["type"]
            if message["type"] in {"completed", "failed", "canceled"}:
                return
            if message["type"] == "error":
                raise RuntimeError(message)

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client(ws, i) for i, ws in enumerate(sockets))), 600)
    wall_s = time.perf_counter() - started
    await asyncio.sleep(0.2)
    for ws in sockets:
        await ws.close()
    stamper.cancel()
    await reference.aclose()
    await redis.aclose()
    by_type: dict[str, list[float]] = {}
    for key, at in received.items():
        if key in published:
            by_type.setdefault(kinds[key], []).append((at - published[key]) * 1000)
    latencies_ms = [
        (received[key] - published[key]) * 1000
        for key in received
        if key in published and received[key] >= published[key]
    ]
    return {
        "clients": clients,
        "steps_per_job": steps,
        "events_received": len(received),
        "events_published": len(published),
        "latency_ms_p50": round(stack.percentile(latencies_ms, 0.50), 3),
        "latency_ms_p99": round(stack.percentile(latencies_ms, 0.99), 3),
        "latency_ms_max": round(max(latencies_ms), 3),
        "latency_ms_mean": round(statistics.fmean(latencies_ms), 3),
        "latency_ms_p99_by_type": {
            kind: round(stack.percentile(v, 0.99), 2) for kind, v in sorted(by_type.items())
        },
        "server_rss_kib_before": rss_before,
        "server_rss_kib_idle_sockets": rss_idle,
        "server_kib_per_idle_connection": round((rss_idle - rss_before) / clients, 1),
        "wall_s": round(wall_s, 2),
        "jobs_per_s": round(clients / wall_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-ms", type=float, default=2.0, help="simulated time per denoising step")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    env = {
        "STEPCAST_BACKEND": "simulated",
        "STEPCAST_SIMULATED_STEP_S": str(args.step_ms / 1000),
        # Every client is the same owner here (single-user mode): lift the per-owner limits.
        "STEPCAST_MAX_JOBS_PER_OWNER": str(max(args.clients)),
        "STEPCAST_MAX_QUEUE_DEPTH": str(max(args.clients)),
    }
    results = []
    with stack.services("ws_fanout") as (postgres, redis):
        for clients in args.clients:
            with stack.stepcast("ws_fanout", postgres, redis, workers=args.workers, env=env) as running:
                stack.warm_up(running.http_url, args.workers * 2, {"steps": args.steps})
                result = asyncio.run(
                    run_clients(running.ws_url, running.redis_url, running.server_pid, clients, args.steps)
                )
            result.update(workers=args.workers, step_ms=args.step_ms)
            results.append(result)
            print(json.dumps(result), flush=True)
    stack.BENCH_DIR.mkdir(parents=True, exist_ok=True)
    (stack.BENCH_DIR / "ws_fanout.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {stack.BENCH_DIR / 'ws_fanout.json'}")


if __name__ == "__main__":
    main()
