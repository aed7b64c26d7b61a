"""Failover: how soon a killed worker's job runs again, and what resuming from a checkpoint saves.

Loopback only, the tiny model. Three legs (``--legs``):

- ``detection``: lease and session settings at their defaults; one server, two workers. A
  long job (``--steps`` at ``--size``²) is watched over a WebSocket; once it reports step
  ``--kill-step`` the worker running it is SIGKILLed. From the kill to the ``requeued`` event's
  arrival and to the next attempt's ``started`` (the job is then canceled), ``--runs`` times,
  a fresh worker taking the dead one's place each time (ready before the next run). p50, p90,
  max. Goals: kill→requeued p50 ≤ 2 s, kill→started p50 ≤ 3 s.
- ``resume``: the same job killed at step ``--resume-kill-step``, run to ``completed``: the
  time from the kill, the steps run again (the newest step the dead attempt reported, less the
  step the next attempt resumed from) and ``resumed_from_step``; for this checkout ("after": the
  session ends, the job resumes from its checkpoint) and, with ``--before DIR``, a checkout of
  the code before (its processes import from DIR; "before": the lease runs out, the job starts
  again from 0), ``--pairs`` runs each, alternating, each side on its own Postgres and Redis.
- ``cost``: in this process, no stack: the tiny pipeline's ``generate`` taking the job's state
  (``state()``, a ``checkpoints.take``) at every step, for each scheduler, at ``--cost-sizes``,
  1 and 4 images: ``state()``'s time (on the pipeline thread: the denoising waits), encoding
  and decoding (off it), the encoded size and a save to Redis; with the share of a second they
  take at the default interval (one checkpoint a second).

Workers log at INFO in JSON (into .data/bench/failover-*/processes.log): their "worker ready"
line says when a new one takes jobs.

    git worktree add /tmp/before 4ee16a0
    python -m bench.failover --runs 10 --pairs 3 --before /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from bench import stack
from gpu_worker import checkpoints
from gpu_worker.checkpoints import Snapshot
from gpu_worker.pipeline import DiffusersPipeline, Request
from gpu_worker.tiny_model import ensure
from stepcast.checkpoints import Checkpoints
from stepcast.cli import processes
from stepcast.models import SCHEDULERS
from stepcast.params import JobParams
from stepcast.settings import DATA_DIR, WorkerSettings

LEGS = ("detection", "resume", "cost")
READY_S = 180.0  # a new worker loads torch and the model on two busy cores
Event = dict[str, Any]
# The checkpoint cost table: heading, the row's figure, its form.
COST_COLUMNS = {
    "size": ("size", "{}"),
    "images": ("images", "{}"),
    "scheduler": ("scheduler", "{}"),
    "state() ms p50": ("state_ms_p50", "{:.2f}"),
    "max": ("state_ms_max", "{:.2f}"),
    "encode ms": ("encode_ms_p50", "{:.2f}"),
    "decode ms": ("decode_ms_p50", "{:.2f}"),
    "bytes": ("bytes", "{}"),
    "save ms": ("redis_save_ms_p50", "{:.2f}"),
    "state / s": ("share_at_1s_state", "{:.3%}"),
    "all / s": ("share_at_1s_all", "{:.3%}"),
}


@dataclass
class Kill:
    """One job's worker SIGKILLed mid-job, and what followed, in seconds from the kill."""

    side: str
    worker: int  # its place in the fleet
    killed_at_step: int  # the newest step its first attempt reported
    to_requeued_s: float
    to_started_s: float
    reason: str
    resumed_from_step: int  # the next attempt's ``started`` (0: from the start, or the old code)
    to_completed_s: float | None = None

    @property
    def steps_again(self) -> int:
        return self.killed_at_step - self.resumed_from_step


def defaults() -> dict[str, float]:
    """The failover settings every leg runs with (none is overridden here)."""
    fields = WorkerSettings.model_fields
    names = ("lease_s", "heartbeat_s", "recovery_interval_s", "session_check_s", "session_confirm_s",
             "checkpoint_every_s")  # fmt: skip
    return {name: fields[name].default for name in names}


def spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(stack.percentile(values, 0.5), 2),
        "p90": round(stack.percentile(values, 0.9), 2),
        "max": round(max(values), 2),
    }


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def wait_ready(log_path: Path, process: subprocess.Popen[bytes], since: int) -> None:
    """Until ``process`` logs "worker ready" (in ``log_path``, after byte ``since``)."""
    marker = f"-{process.pid}-"  # worker ids are host-pid-random
    deadline = time.monotonic() + READY_S
    rest = b""
    with log_path.open("rb") as log:
        log.seek(since)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}; see {log_path}")
            *lines, rest = (rest + log.read()).split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("msg") == "worker ready" and marker in str(entry.get("worker")):
                        return
            time.sleep(0.1)
    raise TimeoutError(f"worker {process.pid} not ready after {READY_S} s; see {log_path}")


@contextlib.contextmanager
def fleet(name: str, env: dict[str, str], workers: int = 2) -> Iterator[stack.Running]:
    """One server and ``workers`` workers on their own Postgres and Redis, every worker ready."""
    with stack.services(name) as (postgres, redis):
        since = log_size(stack.BENCH_DIR / name / "processes.log")
        with stack.stepcast(name, postgres, redis, workers=workers, env=env) as running:
            assert running.log_path is not None
            for process in running.workers:
                wait_ready(running.log_path, process, since)
            yield running


def replace(running: stack.Running, index: int) -> None:
    """Reap killed worker ``index`` and start another; returns once it is ready."""
    assert running.log_path is not None
    running.workers[index].wait(30)
    since = log_size(running.log_path)
    running.workers[index] = running.start_worker()
    wait_ready(running.log_path, running.workers[index], since)


def worker_index(running: stack.Running, worker: str) -> int:
    pid = int(worker.rsplit("-", 2)[1])
    return [process.pid for process in running.workers].index(pid)


class Watch:
    """One job's events over a WebSocket, read in order; remembers the newest step heard."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.step = 0

    async def next(
        self, kind: str, test: Callable[[Event], bool] = lambda _: True, timeout_s: float = 120
    ) -> tuple[float, Event]:
        """The next message of type ``kind`` that passes ``test``, and when it arrived
        (perf_counter). A job that ends otherwise, or an error, raises."""
        async with asyncio.timeout(timeout_s):
            while True:
                message: Event = json.loads(await self.ws.recv())
                arrived = time.perf_counter()
                if message["type"] == "progress":
                    self.step = max(self.step, message["step"])
                if message["type"] == kind and test(message):
                    return arrived, message
                if message["type"] in {"completed", "failed", "canceled", "error"}:
                    raise RuntimeError(f"waiting for {kind}: {message}")


async def kill_during(
    running: stack.Running, side: str, params: dict[str, Any], kill_step: int, *, finish: bool
) -> Kill:
    """Submit a job, SIGKILL its worker at ``kill_step``, follow it to its next ``started``,
    then to ``completed`` (``finish``) or cancel it. Leaves the dead worker's place empty."""
    async with connect(running.ws_url) as ws:
        watch = Watch(ws)
        await ws.send(json.dumps({"type": "submit", "params": params}))
        _, accepted = await watch.next("accepted")
        _, started = await watch.next("started")
        await watch.next("progress", lambda event: event["step"] >= kill_step)
        index = worker_index(running, started["worker"])
        killed = time.perf_counter()
        running.workers[index].kill()
        # Once its session's end is confirmed; with the old code, once its lease (30 s) ran out.
        requeued_at, requeued = await watch.next("requeued")
        restarted_at, restarted = await watch.next("started")
        kill = Kill(
            side=side,
            worker=index,
            killed_at_step=watch.step,  # every step it sent came before the requeue
            to_requeued_s=round(requeued_at - killed, 3),
            to_started_s=round(restarted_at - killed, 3),
            reason=requeued["reason"],
            resumed_from_step=restarted.get("resumed_from_step") or 0,
        )
        if finish:
            completed_at, _ = await watch.next("completed", timeout_s=600)
            kill.to_completed_s = round(completed_at - killed, 3)
        else:
            await ws.send(json.dumps({"type": "cancel", "job_id": accepted["job_id"]}))
            await watch.next("canceled")
    return kill


def job_params(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {"prompt": f"a red fox {seed}", "seed": seed, "steps": args.steps,
            "width": args.size, "height": args.size}  # fmt: skip


def stack_env(model_dir: Path, code: Path | None = None) -> dict[str, str]:
    """Every process's settings: the tiny model, JSON logs at INFO (for "worker ready"); with
    ``code``, the processes import from that checkout, not this one."""
    env = {
        "STEPCAST_MODEL_DIR": str(model_dir),
        "STEPCAST_LOG_LEVEL": "INFO",
        "STEPCAST_LOG_FORMAT": "json",
        "STEPCAST_JOB_TIMEOUT_S": "3600",
    }
    if code is not None:
        # PYTHONSAFEPATH: `python -m` puts no working directory (this checkout) before it.
        env |= {"PYTHONPATH": str(code), "PYTHONSAFEPATH": "1"}
    return env


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print ``rows`` under ``header``, each column as wide as its widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    for row in [header, *rows]:
        first, *others = zip(row, widths, strict=True)
        print("  ".join([first[0].ljust(first[1]), *(cell.rjust(width) for cell, width in others)]))


def detection(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    kills: list[Kill] = []
    with fleet("failover-detection", stack_env(model_dir)) as running:
        for run in range(args.runs):
            params = job_params(args, run)
            kill = asyncio.run(kill_during(running, "after", params, args.kill_step, finish=False))
            kills.append(kill)
            print(f"  run {run + 1}: {json.dumps(asdict(kill))}", flush=True)
            replace(running, kill.worker)
    figures = {
        "kill_to_requeued_s": spread([kill.to_requeued_s for kill in kills]),
        "kill_to_started_s": spread([kill.to_started_s for kill in kills]),
    }
    rows = []
    goals = {"kill → requeued (s)": 2.0, "kill → started (s)": 3.0}
    for (name, goal), values in zip(goals.items(), figures.values(), strict=True):
        met = "met" if values["p50"] <= goal else f"missed by {values['p50'] - goal:.2f} s"
        rows.append([name, *(f"{values[q]:.2f}" for q in ("p50", "p90", "max")), f"p50 ≤ {goal} s: {met}"])
    title = f"detection: {args.runs} kills, {args.steps} steps at {args.size}², at step ≥ {args.kill_step}"
    table(title, ["", "p50", "p90", "max", "goal"], rows)
    return {
        "runs": args.runs,
        **figures,
        "reasons": dict(Counter(kill.reason for kill in kills)),
        "kills": [asdict(kill) for kill in kills],
    }


def resume(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    codes = {"before": args.before, "after": None} if args.before else {"after": None}
    kills: dict[str, list[Kill]] = {side: [] for side in codes}
    with contextlib.ExitStack() as fleets:
        sides = {
            side: fleets.enter_context(fleet(f"failover-{side}", stack_env(model_dir, code)))
            for side, code in codes.items()
        }
        # Alternating, so that a machine whose speed drifts slows both sides alike.
        for run in range(args.pairs):
            for side, running in sides.items():
                params = job_params(args, 1000 + run)
                kill = asyncio.run(kill_during(running, side, params, args.resume_kill_step, finish=True))
                kills[side].append(kill)
                print(f"  {side} {run + 1}: {json.dumps(asdict(kill))}", flush=True)
                replace(running, kill.worker)

    def each(runs: list[Kill], figure: Callable[[Kill], object]) -> str:
        values = [figure(kill) for kill in runs]
        return " ".join(f"{value:.1f}" if isinstance(value, float) else str(value) for value in values)

    table(
        f"resume: {args.steps} steps at {args.size}², killed at step ≥ {args.resume_kill_step}",
        ["", "kill → completed (s)", "steps again", "resumed from", "kill → started (s)", "requeued"],
        [
            [
                side,
                each(runs, lambda k: k.to_completed_s),
                each(runs, lambda k: k.steps_again),
                each(runs, lambda k: k.resumed_from_step),
                each(runs, lambda k: k.to_started_s),
                each(runs, lambda k: k.reason),
            ]
            for side, runs in kills.items()
        ],
    )
    result: dict[str, Any] = {"pairs": args.pairs, "before_code": str(args.before) if args.before else None}
    for side, runs in kills.items():
        result[side] = {
            "kill_to_completed_s_p50": statistics.median(k.to_completed_s or 0.0 for k in runs),
            "steps_again_p50": statistics.median(k.steps_again for k in runs),
            "runs": [{**asdict(k), "steps_again": k.steps_again} for k in runs],
        }
    return result


def states(pipeline: DiffusersPipeline, params: JobParams) -> tuple[list[float], list[Snapshot]]:
    """One run taking the job's state at every step: the seconds each ``state()`` took, the states."""
    seconds: list[float] = []
    snapshots: list[Snapshot] = []

    def on_step(step: int, total: int, latents: Any, state: Callable[[], Snapshot]) -> None:
        started = time.perf_counter()
        snapshots.append(state())
        seconds.append(time.perf_counter() - started)

    pipeline.generate([Request(params, on_step, lambda: False)])
    return seconds, snapshots


def cost(args: argparse.Namespace, model_dir: Path) -> list[dict[str, Any]]:
    pipeline = DiffusersPipeline.load(model_dir, name="tiny")
    taken = {}
    for size in args.cost_sizes:
        for images in (1, 4):
            for scheduler in SCHEDULERS:
                params = JobParams(
                    prompt="a red fox",
                    negative_prompt=None,
                    model="tiny",
                    steps=args.cost_steps,
                    width=size,
                    height=size,
                    guidance_scale=7.5,
                    seed=1,
                    num_images=images,
                    scheduler=scheduler,
                )
                taken[size, images, scheduler] = states(pipeline, params)
    redis = processes.LocalRedis(
        stack.BENCH_DIR / "failover-cost" / "redis", processes.free_port(), durable=False
    )
    with processes.running(redis):
        saves = asyncio.run(save_times(redis.url(), pipeline.revision, taken))
    rows = []
    for (size, images, scheduler), (seconds, snapshots) in taken.items():
        encoded, encode_s, decode_s = [], [], []
        for snapshot in snapshots:
            started = time.perf_counter()
            encoded.append(checkpoints.encode(snapshot))
            encode_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            checkpoints.decode(encoded[-1])
            decode_s.append(time.perf_counter() - started)
        state_ms = statistics.median(seconds) * 1000
        encode_ms = statistics.median(encode_s) * 1000
        save_ms = saves[size, images, scheduler]
        rows.append(
            {
                "size": size,
                "images": images,
                "scheduler": scheduler,
                "state_ms_p50": round(state_ms, 3),
                "state_ms_max": round(max(seconds) * 1000, 3),
                "encode_ms_p50": round(encode_ms, 3),
                "decode_ms_p50": round(statistics.median(decode_s) * 1000, 3),
                "bytes": max(len(data) for data in encoded),
                "redis_save_ms_p50": round(save_ms, 3),
                # At one checkpoint a second: the pipeline thread's share of it, and every part's.
                "share_at_1s_state": round(state_ms / 1000, 6),
                "share_at_1s_all": round((state_ms + encode_ms + save_ms) / 1000, 6),
            }
        )
    table(
        f"checkpoint cost: {args.cost_steps} steps, a state taken every step (the worker: one a second)",
        list(COST_COLUMNS),
        [[form.format(row[key]) for key, form in COST_COLUMNS.values()] for row in rows],
    )
    return rows


async def save_times(
    redis_url: str, revision: str, taken: dict[tuple[int, int, str], tuple[list[float], list[Snapshot]]]
) -> dict[tuple[int, int, str], float]:
    """Each case's checkpoints saved as a worker saves them, one after another: the p50 in ms."""
    redis = Redis.from_url(redis_url)
    store = Checkpoints(redis, ttl_s=3600)
    times: dict[tuple[int, int, str], float] = {}
    try:
        for key, (_, snapshots) in taken.items():
            job_id, seconds = str(uuid.uuid4()), []
            for snapshot in snapshots:
                data = checkpoints.encode(snapshot)
                started = time.perf_counter()
                await store.save(job_id, attempt=1, step=snapshot.step, revision=revision, data=data)
                seconds.append(time.perf_counter() - started)
            times[key] = statistics.median(seconds) * 1000
    finally:
        await redis.aclose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--legs", nargs="+", choices=LEGS, default=list(LEGS))
    parser.add_argument("--size", type=int, default=256, help="of the killed jobs")
    parser.add_argument("--steps", type=int, default=150, help="of the killed jobs")
    parser.add_argument("--runs", type=int, default=10, help="detection: kills")
    parser.add_argument("--kill-step", type=int, default=5, help="detection: kill once this step is heard")
    parser.add_argument("--pairs", type=int, default=3, help="resume: runs of each side")
    parser.add_argument("--resume-kill-step", type=int, default=100)
    parser.add_argument("--before", type=Path, help="resume: a checkout of the code before (a git worktree)")
    parser.add_argument("--cost-steps", type=int, default=6)
    parser.add_argument("--cost-sizes", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()
    if args.before is not None and not (args.before / "gpu_worker" / "worker.py").is_file():
        parser.error(f"{args.before} is not a stepcast checkout")
    model_dir = ensure(DATA_DIR / "models" / "tiny")
    result: dict[str, Any] = {"settings": defaults(), "size": args.size, "steps": args.steps}
    if "detection" in args.legs:
        result["detection"] = detection(args, model_dir)
    if "resume" in args.legs:
        result["resume"] = resume(args, model_dir)
    if "cost" in args.legs:
        result["checkpoint_cost"] = cost(args, model_dir)
    stack.write_result("failover", result)


if __name__ == "__main__":
    main()
