"""What the serving layer costs next to the model, in one run.

The same jobs (the tiny diffusers model by default, 64×64, 20 steps, one
prompt and seed per job) run

(a) in the plain loop a user would write without stepcast: a fresh process,
    ``from_pretrained`` then ``pipe(...)`` per job (:mod:`bench.bare`);
(b) through the whole system: Postgres, Redis, one server process and one
    worker process, submitted over a WebSocket, until `completed` arrives.

Reported:

- side by side, one job at a time, alternating job by job (``--pairs`` of
  them), each side idle while the other runs: the worker's own
  ``timings.pipeline_s`` against (a)'s time per call, p50, with the minor page
  faults and kernel CPU per job of each process; first for a fresh worker,
  then again after the same worker has served large jobs (sizes up to 1024²,
  batches of 4, previews on, cancels mid-job) next to a new plain loop: the
  model call must not get slower inside the worker, nor stay slower after big
  allocations. Each job runs in (b) twice: polled over REST as its
  ``Retry-After`` says (``ratio``: nothing else wants the cores while the
  model runs, as with a client on another machine), and watched step by step
  over a WebSocket from this process (``watched_ratio``: the server, Redis
  and this client then take CPU at every step, from the same cores);
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
    python -m bench.overhead --model .data/models/sd15 --pairs 6 --side-by-side-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import websockets

from bench import stack
from bench.cpu import CpuMeter
from gpu_worker.tiny_model import ensure
from stepcast.cli.processes import free_port
from stepcast.settings import DATA_DIR

PARAMS = {"steps": 20, "width": 64, "height": 64}

# What a worker has served before the "after large jobs" rounds: (width, height,
# images, steps, cancel at this step or None to finish). Previews on for all.
LARGE_JOBS = {
    "tiny": [(1024, 1024, 4, 20, 3), (808, 632, 1, 150, 10), (512, 512, 4, 8, None), (1024, 768, 2, 30, 5)],
    # The full-size architecture on 2 CPU cores: a step at 768² takes tens of seconds.
    "full": [(512, 512, 2, 20, 1), (768, 768, 1, 20, 1), (512, 384, 4, 2, None)],
}


def bare_process(
    model_dir: Path, jobs: int, params: dict[str, int] = PARAMS, options: tuple[str, ...] = ()
) -> dict[str, Any]:
    """(a): a fresh process running the plain loop (bench.bare) ``jobs`` times; its rate."""
    command = [*plain_loop_command(model_dir, params, options), "--jobs", str(jobs)]
    done = subprocess.run(command, cwd=stack.ROOT, capture_output=True, text=True, check=True)
    calls = [json.loads(line) for line in done.stdout.strip().splitlines()]
    seconds = [call["seconds"] for call in calls]
    return {
        "pipeline_ms": stack.summary([s * 1000 for s in seconds], 1),
        "jobs_per_s": round(len(seconds) / sum(seconds), 3),
    }


def plain_loop_command(model_dir: Path, params: dict[str, int], options: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "bench.bare", str(model_dir), "--steps", str(params["steps"]),
            "--size", str(params["width"]), *options]  # fmt: skip


class PlainLoop:
    """(a) job by job: a fresh ``bench.bare --serve`` process, one call per :meth:`call`."""

    def __init__(self, model_dir: Path, params: dict[str, int], options: tuple[str, ...]) -> None:
        command = [*plain_loop_command(model_dir, params, options), "--serve"]
        self.process = subprocess.Popen(
            command,
            cwd=stack.ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if json.loads(self._line()) != {"ready": True}:
            raise RuntimeError("bench.bare did not start")

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.bare exited with {self.process.wait()}")
        return line

    def call(self, index: int) -> dict[str, float]:
        """One ``pipe(...)`` call: its seconds, minor page faults and kernel CPU seconds."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()
        figures: dict[str, float] = json.loads(self._line())
        return figures

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(30)


def process_counters(pid: int) -> tuple[int, float]:
    """Minor page faults and kernel CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


class WorkerCosts:
    """The worker process's minor page faults and kernel CPU, job by job."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.faults: list[int] = []
        self.kernel_ms: list[float] = []
        self._before = (0, 0.0)

    def start(self) -> None:
        self._before = process_counters(self.pid)

    def stop(self) -> None:
        faults, kernel_s = process_counters(self.pid)
        self.faults.append(faults - self._before[0])
        self.kernel_ms.append((kernel_s - self._before[1]) * 1000)

    def per_job(self) -> dict[str, float]:
        return {
            "minor_faults_per_job": round(statistics.median(self.faults)),
            "kernel_ms_per_job": round(statistics.median(self.kernel_ms), 1),
        }


def pipeline_seconds(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    match = re.search(r"^stepcast_worker_pipeline_seconds_total ([0-9.e+-]+)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("the worker's metrics have no pipeline seconds")
    return float(match.group(1))


async def submit(ws: Any, index: int, params: dict[str, int] = PARAMS) -> None:
    await ws.send(
        json.dumps({"type": "submit", "params": {"prompt": f"fox {index}", "seed": index, **params}})
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


async def watched_job(ws: Any, index: int, params: dict[str, int]) -> dict[str, float]:
    """One job submitted over a WebSocket and watched step by step until `completed`: its
    pipeline time and what the system added around it, in ms."""
    sent = time.perf_counter()
    await submit(ws, index, params)
    to_start = 0.0
    while True:
        message = json.loads(await ws.recv())
        now = time.perf_counter()
        if message["type"] == "started":
            to_start = (now - sent) * 1000
        elif message["type"] == "completed":
            timings = message["timings"]
            e2e = (now - sent) * 1000
            return {
                "pipeline": timings["pipeline_s"] * 1000,
                "to_start": to_start,
                "e2e": e2e,
                "overhead": e2e - timings["pipeline_s"] * 1000,
                "claimed": timings["queue_s"] * 1000,
                "after": (timings["run_s"] - timings["pipeline_s"]) * 1000,
            }
        elif message["type"] in {"failed", "canceled", "error"}:
            raise RuntimeError(message)


async def polled_job(client: httpx.AsyncClient, index: int, params: dict[str, int]) -> float:
    """One job over REST, polled as its ``Retry-After`` says, so that no one watches its
    steps (as the issue measured): its pipeline time in ms."""
    body = {"prompt": f"fox {index}", "seed": index, **params}
    response = (await client.post("/v1/jobs", json=body)).raise_for_status()
    job = response.json()
    while job["status"] not in {"completed", "failed", "canceled"}:
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
        response = (await client.get(f"/v1/jobs/{job['id']}")).raise_for_status()
        job = response.json()
    if job["status"] != "completed":
        raise RuntimeError(job)
    return float(job["timings"]["pipeline_s"]) * 1000


async def one_at_a_time(
    ws_url: str, jobs: int, worker_pid: int, params: dict[str, int] = PARAMS
) -> dict[str, Any]:
    """(b) one job at a time, the worker idle between them: what the system adds to each,
    and the worker's own pipeline time, page faults and kernel CPU per job."""
    runs: list[dict[str, float]] = []
    costs = WorkerCosts(worker_pid)
    async with websockets.connect(ws_url, max_size=2**22) as ws:
        for index in range(jobs):
            await asyncio.sleep(0.2)  # the worker is idle, as at low load
            costs.start()
            runs.append(await watched_job(ws, index, params))
            costs.stop()

    def figures(name: str) -> dict[str, float] | None:
        return stack.summary([run[name] for run in runs], 1)

    return {
        "pipeline_ms": figures("pipeline"),
        **costs.per_job(),
        "submit_to_started_ms": figures("to_start"),
        "submit_to_completed_ms": figures("e2e"),
        "overhead_ms": figures("overhead"),
        # Where it goes: row created -> claimed (Postgres clock), and the part of
        # the run outside the pipeline (claim -> terminal write, minus the pipeline).
        "insert_to_claim_ms": figures("claimed"),
        "run_outside_pipeline_ms": figures("after"),
    }


def large_jobs(http_url: str, jobs: list[tuple[int, int, int, int, int | None]]) -> list[dict[str, Any]]:
    """Run each job with previews on, canceling it once it reaches its cancel step."""
    served = []
    with httpx.Client(base_url=http_url, timeout=30) as client:
        for width, height, images, steps, cancel_at in jobs:
            body = {"prompt": "a large job", "width": width, "height": height, "num_images": images,
                    "steps": steps, "preview": {"every": 1}}  # fmt: skip
            started = time.perf_counter()
            job = client.post("/v1/jobs", json=body).raise_for_status().json()
            canceled = False
            while job["status"] not in {"completed", "failed", "canceled"}:
                time.sleep(0.1)
                job = client.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
                if cancel_at is not None and not canceled and job["progress"]["step"] >= cancel_at:
                    client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
                    canceled = True
            served.append({"size": f"{width}x{height}x{images}", "steps": steps, "status": job["status"],
                           "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
            print(json.dumps({"large_job": served[-1]}), flush=True)
    return served


async def side_by_side(
    model_dir: Path,
    running: stack.Running,
    jobs: int,
    phase: str,
    params: dict[str, int] = PARAMS,
    options: tuple[str, ...] = (),
) -> dict[str, Any]:
    """(a) and (b) alternating job by job, each idle while the other runs, so that a machine
    whose speed drifts (a shared VM) slows both alike: a plain loop in a fresh process makes
    one call, then the worker runs the same job polled over REST (``ratio``: nothing else
    wants the cores while the model runs), then watched step by step over a WebSocket
    (``watched_ratio``: the server, Redis and this client then take CPU every step, from the
    same cores). Ratios of the p50s; ``*_pair_ratio``: the p50 of the job-by-job ratios."""
    plain = PlainLoop(model_dir, params, options)
    bare: list[dict[str, float]] = []
    polled: list[float] = []
    watched: list[float] = []
    costs = WorkerCosts(running.workers[0].pid)
    try:
        async with (
            httpx.AsyncClient(base_url=running.http_url, timeout=30) as client,
            websockets.connect(running.ws_url, max_size=2**22) as ws,
        ):
            for index in range(jobs):
                await asyncio.sleep(0.2)
                bare.append(await asyncio.to_thread(plain.call, index))
                await asyncio.sleep(0.2)
                costs.start()
                polled.append(await polled_job(client, index, params))
                costs.stop()
                await asyncio.sleep(0.2)
                watched.append((await watched_job(ws, index, params))["pipeline"])
    finally:
        plain.close()
    bare_ms = [call["seconds"] * 1000 for call in bare]

    def ratios(worker: list[float]) -> tuple[float, float]:
        of_p50s = statistics.median(worker) / statistics.median(bare_ms)
        of_pairs = statistics.median(w / b for w, b in zip(worker, bare_ms, strict=True))
        return round(of_p50s, 3), round(of_pairs, 3)

    (ratio, pair_ratio), (watched_ratio, watched_pair_ratio) = ratios(polled), ratios(watched)
    result = {
        "plain_loop": {
            "pipeline_ms": stack.summary(bare_ms, 1),
            "minor_faults_per_job": round(statistics.median(call["minor_faults"] for call in bare)),
            "kernel_ms_per_job": round(statistics.median(call["kernel_s"] for call in bare) * 1000, 1),
        },
        "worker_polled": {"pipeline_ms": stack.summary(polled, 1), **costs.per_job()},
        "worker_watched": {"pipeline_ms": stack.summary(watched, 1)},
        "ratio": ratio,
        "pair_ratio": pair_ratio,
        "watched_ratio": watched_ratio,
        "watched_pair_ratio": watched_pair_ratio,
        "jobs_ms": {"plain_loop": bare_ms, "worker_polled": polled, "worker_watched": watched},
    }
    print(json.dumps({phase: {k: v for k, v in result.items() if k != "jobs_ms"}}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, help="a diffusers directory (default: the tiny model)")
    parser.add_argument("--pairs", type=int, default=30, help="jobs a side by side phase alternates")
    parser.add_argument("--side-by-side-only", action="store_true", help="skip the throughput legs")
    args = parser.parse_args()
    model_dir = args.model or ensure(DATA_DIR / "models" / "tiny")
    tiny = args.model is None
    metrics_port = free_port()
    env = {
        "STEPCAST_BATCH_SIZE": "1",
        "STEPCAST_WORKER_METRICS_PORT": str(metrics_port),
        "STEPCAST_MODEL_DIR": str(model_dir),
        "STEPCAST_MODEL_NAME": "tiny" if tiny else model_dir.name,
        "STEPCAST_MAX_SIZE_PX": "1024",
        "STEPCAST_JOB_TIMEOUT_S": "3600",
    }
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    per_round = max(8, args.jobs // args.rounds)
    result: dict[str, Any] = {"model": str(model_dir), "jobs": args.jobs, **PARAMS}
    with stack.services("overhead") as (postgres, redis):
        with stack.stepcast("overhead", postgres, redis, workers=1, env=env) as running:
            stack.warm_up(running.http_url, 3 if tiny else 1, PARAMS, timeout_s=600)
            result["fresh"] = asyncio.run(side_by_side(model_dir, running, args.pairs, "fresh"))
            if not args.side_by_side_only:
                # (a) and (b) take turns, so that a machine whose speed drifts (a
                # shared VM) slows both alike; the stack idles during (a).
                rounds: list[dict[str, Any]] = []
                for _ in range(args.rounds):
                    bare = bare_process(model_dir, per_round)
                    system = asyncio.run(saturation(running.ws_url, metrics_url, per_round))
                    rounds.append(
                        {"bare": bare, "system": system,
                         "ratio": round(system["jobs_per_s"] / bare["jobs_per_s"], 4)}
                    )  # fmt: skip
                    print(json.dumps({"saturation": rounds[-1]}), flush=True)
                light = asyncio.run(one_at_a_time(running.ws_url, args.jobs, running.workers[0].pid))
                result["rounds"] = rounds
                result["system"] = {
                    "busy_fraction": statistics.median(r["system"]["busy_fraction"] for r in rounds),
                    **light,
                }
                result["throughput_ratio"] = statistics.median(r["ratio"] for r in rounds)
            result["large_jobs"] = large_jobs(running.http_url, LARGE_JOBS["tiny" if tiny else "full"])
            result["after_large_jobs"] = asyncio.run(side_by_side(model_dir, running, args.pairs, "after"))
        if not args.side_by_side_only:
            pipeline_s = statistics.median(r["bare"]["pipeline_ms"]["p50"] for r in result["rounds"]) / 1000
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
            result["model_without_cpu"] = {
                "pipeline_s": pipeline_s,
                **model_without_cpu,
                "throughput_ratio": round(model_without_cpu["jobs_per_s"] * pipeline_s, 4),
            }
    stack.write_result("overhead" if tiny else f"overhead-{model_dir.name}", result)


if __name__ == "__main__":
    main()
