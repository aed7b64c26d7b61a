"""One job at a time through the whole system, on the real tiny diffusers model.

Submits over the WebSocket and times submit -> `started` and submit ->
`completed` as the client sees them, next to the worker's own run time
(claim to terminal state, from the job's timings). 64x64, 20 steps.

    python -m bench.latency --jobs 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import websockets

from bench import stack


async def measure(ws_url: str, jobs: int, params: dict[str, Any]) -> dict[str, Any]:
    to_start, to_done, run = [], [], []
    async with websockets.connect(ws_url, max_size=2**22) as ws:
        for index in range(jobs):
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "submit", "params": {"prompt": f"fox {index}", **params}}))
            while True:
                message = json.loads(await ws.recv())
                now = time.perf_counter()
                if message["type"] == "started":
                    to_start.append((now - sent) * 1000)
                if message["type"] == "completed":
                    to_done.append((now - sent) * 1000)
                    run.append(message["timings"]["run_s"] * 1000)
                    break
                if message["type"] in {"failed", "canceled", "error"}:
                    raise RuntimeError(message)
    overhead = [done - worker for done, worker in zip(to_done, run, strict=True)]

    return {
        "jobs": jobs,
        **params,
        "submit_to_started_ms": stack.summary(to_start),
        "submit_to_completed_ms": stack.summary(to_done),
        "worker_run_ms": stack.summary(run),
        "end_to_end_minus_run_ms": stack.summary(overhead),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    args = parser.parse_args()
    params = {"steps": 20, "width": 64, "height": 64}
    with (
        stack.services("latency") as (postgres, redis),
        stack.stepcast("latency", postgres, redis, workers=1, env={}) as running,
    ):
        stack.warm_up(running.http_url, 3, params)
        result = asyncio.run(measure(running.ws_url, args.jobs, params))
    stack.write_result("latency", result)


if __name__ == "__main__":
    main()
