"""What the serving layer costs next to the model, in one run.

The same stream of jobs (the tiny diffusers model, 64×64, 20 steps, one
prompt and seed per job) runs

(a) in a bare loop calling the diffusers pipeline directly, in this process;
(b) through the whole system: Postgres, Redis, one server process and one
    worker process, submitted over a WebSocket, until the `completed` event
    arrives.

Reported:

- throughput at saturation, (a) and (b), and the ratio (b)/(a), in
  ``--rounds`` alternating rounds (the median ratio is the figure): every job
  of a round is submitted at once and the rate is taken between the first and
  the last completion (steady state);
- per-job overhead at low load (one job at a time): submit -> `completed` as
  the client sees it, minus the job's own pipeline time (``timings.pipeline_s``),
  p50/p99; and the pick-up latency, submit -> `started`, p50/p99;
- the worker's busy fraction under saturation: seconds inside the pipeline
  (the worker's own counter) over wall time, between two scrapes taken while
  jobs were still queued.

On this machine the model is a CPU model: the pipeline and the whole control
plane (server, Redis, Postgres, the worker's event loop, the client) share the
same cores, so every millisecond of control-plane CPU is taken from the model.
On a GPU the model does not compete for them. So the run repeats (b) with the
``simulated`` backend sleeping the bare pipeline's own time per job (a model
that uses no CPU, like one on a GPU): its jobs/s over the ideal 1/pipeline
time is the serving layer's own scheduling overhead, apart from CPU sharing,
and the CPU each process spends per job there is what the control plane
takes from a CPU model.

The worker runs with ``STEPCAST_BATCH_SIZE=1`` so that both sides call the
pipeline once per job (``bench.batching`` measures batching).

    python -m bench.overhead --jobs 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
import urllib.request
from typing import Any

import websockets

from bench import stack
from bench.cpu import CpuMeter
from gpu_worker.pipeline import DiffusersPipeline, Request
from gpu_worker.tiny_model import ensure
from stepcast.params import JobParams
from stepcast.processes import free_port
from stepcast.settings import DATA_DIR

PARAMS = {"steps": 20, "width": 64, "height": 64}


def job_params(index: int) -> JobParams:
    return JobParams(
        prompt=f"fox {index}", negative_prompt=None, model="tiny", guidance_scale=7.5,
        seed=index, num_images=1, scheduler=None, **PARAMS,
    )  # fmt: skip


def bare_loop(pipeline: DiffusersPipeline, jobs: int) -> dict[str, Any]:
    """(a): the pipeline alone, one call per job, as fast as it goes."""
    durations, done_at = [], []
    for index in range(jobs):
        started = time.perf_counter()
        pipeline.generate([Request(job_params(index), lambda *_: None, lambda: False)])
        done_at.append(time.perf_counter())
        durations.append((done_at[-1] - started) * 1000)
    return {
        "jobs_per_s": round((jobs - 1) / (done_at[-1] - done_at[0]), 3),
        "pipeline_ms": stack.summary(durations, 1),
    }


def pipeline_seconds(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    match = re.search(r"^stepcast_worker_pipeline_seconds_total ([0-9.e+-]+)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("the worker's metrics have no pipeline seconds")
    return float(match.group(1))


async def submit(ws: Any, index: int) -> None:
    await ws.send(
        json.dumps({"type": "submit", "params": {"prompt": f"fox {index}", "seed": index, **PARAMS}})
    )


async def saturation(ws_url: str, metrics_url: str, jobs: int, cpu: CpuMeter | None = None) -> dict[str, Any]:
    """(b) at saturation: every job submitted at once; the rate, the busy fraction, CPU per job."""
    marks: list[tuple[float, float]] = []

    def scrape(completed: int) -> None:
        # While jobs are still queued: the pipeline is never short of work.
        if completed in {2, jobs - 2}:
            marks.append((time.perf_counter(), pipeline_seconds(metrics_url)))

    if cpu is not None:
        cpu.start()
    run = await stack.saturate(ws_url, jobs, PARAMS, on_completed=scrape)
    (wall_a, busy_a), (wall_b, busy_b) = marks
    result = {
        "jobs_per_s": run["images_per_s"],
        "busy_fraction": round((busy_b - busy_a) / (wall_b - wall_a), 4),
    }
    if cpu is not None:
        result["cpu_ms_per_job"] = cpu.ms_per_job(jobs)
    return result


async def low_load(ws_url: str, jobs: int) -> dict[str, Any]:
    """(b) one job at a time: what the system adds to each."""
    to_start, overhead, e2e, claimed, after = [], [], [], [], []
    async with websockets.connect(ws_url, max_size=2**22) as ws:
        for index in range(jobs):
            await asyncio.sleep(0.2)  # the worker is idle, as at low load
            sent = time.perf_counter()
            await submit(ws, index)
            while True:
                message = json.loads(await ws.recv())
                now = time.perf_counter()
                if message["type"] == "started":
                    to_start.append((now - sent) * 1000)
                elif message["type"] == "completed":
                    e2e.append((now - sent) * 1000)
                    timings = message["timings"]
                    overhead.append(e2e[-1] - timings["pipeline_s"] * 1000)
                    claimed.append(timings["queue_s"] * 1000)
                    after.append((timings["run_s"] - timings["pipeline_s"]) * 1000)
                    break
                elif message["type"] in {"failed", "canceled", "error"}:
                    raise RuntimeError(message)
    return {
        "submit_to_started_ms": stack.summary(to_start, 1),
        "submit_to_completed_ms": stack.summary(e2e, 1),
        "overhead_ms": stack.summary(overhead, 1),
        # Where it goes: row created -> claimed (Postgres clock), and the part of
        # the run outside the pipeline (claim -> terminal write, minus the pipeline).
        "insert_to_claim_ms": stack.summary(claimed, 1),
        "run_outside_pipeline_ms": stack.summary(after, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    metrics_port = free_port()
    env = {"STEPCAST_BATCH_SIZE": "1", "STEPCAST_WORKER_METRICS_PORT": str(metrics_port)}
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    pipeline = DiffusersPipeline.load(ensure(DATA_DIR / "models" / "tiny"), name="tiny")
    bare_loop(pipeline, 3)  # warm up, as the system's worker is
    rounds: list[dict[str, Any]] = []
    with stack.services("overhead") as (postgres, redis):
        with stack.stepcast("overhead", postgres, redis, workers=1, env=env) as running:
            stack.warm_up(running.http_url, 3, PARAMS)
            # (a) and (b) take turns, so that a machine whose speed drifts (a
            # shared VM) slows both alike; the stack idles during (a).
            per_round = max(8, args.jobs // args.rounds)
            for _ in range(args.rounds):
                bare = bare_loop(pipeline, per_round)
                system = asyncio.run(saturation(running.ws_url, metrics_url, per_round))
                rounds.append(
                    {
                        "bare": bare,
                        "system": system,
                        "ratio": round(system["jobs_per_s"] / bare["jobs_per_s"], 4),
                    }
                )
                print(json.dumps(rounds[-1]), flush=True)
            light = asyncio.run(low_load(running.ws_url, args.jobs))
        pipeline_s = statistics.median(r["bare"]["pipeline_ms"]["p50"] for r in rounds) / 1000
        no_cpu = {
            **env,
            "STEPCAST_BACKEND": "simulated",
            "STEPCAST_SIMULATED_STEP_S": str(pipeline_s / PARAMS["steps"]),
        }
        with stack.stepcast("overhead", postgres, redis, workers=1, env=no_cpu) as running:
            stack.warm_up(running.http_url, 3, PARAMS)
            # The worker's CPU here is the control plane's alone: the model only sleeps.
            cpu = CpuMeter(running, postgres, redis)
            model_without_cpu = asyncio.run(saturation(running.ws_url, metrics_url, args.jobs, cpu))
    result = {
        "jobs": args.jobs,
        **PARAMS,
        "rounds": rounds,
        "system": {
            "busy_fraction": statistics.median(r["system"]["busy_fraction"] for r in rounds),
            **light,
        },
        "throughput_ratio": statistics.median(r["ratio"] for r in rounds),
        "model_without_cpu": {
            "pipeline_s": pipeline_s,
            **model_without_cpu,
            "throughput_ratio": round(model_without_cpu["jobs_per_s"] * pipeline_s, 4),
        },
    }
    stack.write_result("overhead", result)


if __name__ == "__main__":
    main()
