"""Resuming: a run continued from a checkpoint paints the picture the uninterrupted run paints,
without running the UNet for the steps it holds; a job whose checkpoint Redis lost starts again
and says so; and a worker that lost its session (but lives) stops publishing and writing at
once when its job is taken back."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import httpx
import numpy as np
import pytest
from redis.asyncio import Redis

from gpu_worker import checkpoints
from gpu_worker.checkpoints import Snapshot
from gpu_worker.pipeline import DiffusersPipeline, Request
from server.positions import EtaEstimator
from stepcast.db import Pace, Place
from stepcast.models import SCHEDULERS
from stepcast.params import JobParams
from stepcast.redis_keys import checkpoint_key
from stepcast.settings import Settings
from tests.conftest import StepcastProcess, fox_params
from tests.test_recovery import SESSION_RECOVERY, events_of, job_row, kill_worker_mid_job, wait_for

STEPS = 8
JOB = {"prompt": "a slow river", "steps": 150, "width": 256, "height": 256, "seed": 11}  # ~7 s here


def _run(
    pipeline: DiffusersPipeline,
    params: list[JobParams],
    *,
    keep: dict[int, set[int]] | None = None,
    resume: Snapshot | None = None,
) -> tuple[list[np.ndarray], dict[tuple[int, int], bytes], list[int]]:
    """One pipeline call: each job's pixels, the checkpoints kept ((job, step) -> encoded, at
    the steps ``keep`` asks for each job), and the steps the first job reported."""
    kept: dict[tuple[int, int], bytes] = {}
    reported: list[int] = []

    def on_step(job: int) -> Callable[[int, int, Any, Callable[[], Snapshot]], None]:
        def report(step: int, total: int, latents: Any, state: Callable[[], Snapshot]) -> None:
            if job == 0:
                reported.append(step)
            if keep and step in keep.get(job, set()):
                kept[job, step] = checkpoints.encode(state())

        return report

    requests = [Request(p, on_step(i), lambda: False, resume) for i, p in enumerate(params)]
    generations = pipeline.generate(requests)
    pixels = [np.asarray(image, dtype=np.int16) for g in generations for image in g.images]
    return pixels, kept, reported


@contextlib.contextmanager
def unet_calls(pipeline: DiffusersPipeline) -> Iterator[list[int]]:
    """The UNet's real runs (its first layer's: a skipped step never reaches it)."""
    calls: list[int] = []
    hook = pipeline.pipe.unet.conv_in.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


@pytest.mark.parametrize("scheduler", [None, *SCHEDULERS])
def test_a_resumed_run_paints_the_uninterrupted_picture(
    pipeline: DiffusersPipeline, scheduler: str | None
) -> None:
    params = fox_params(steps=STEPS, scheduler=scheduler, seed=5)
    at = {1, 3, 6, STEPS - 1}
    (whole,), kept, _ = _run(pipeline, [params], keep={0: at})
    for k in sorted(at):
        resume = checkpoints.decode(kept[0, k])
        with unet_calls(pipeline) as calls:
            (resumed,), _, reported = _run(pipeline, [params], resume=resume)
        # Bit for bit: the state restored is the state the uninterrupted run had at step k.
        assert int(np.abs(resumed - whole).max()) == 0, (scheduler, k)
        assert reported == list(range(k + 1, STEPS + 1))  # only the steps it had left
        assert len(calls) == STEPS - k  # the UNet ran for those only


def test_each_job_of_a_batch_resumes_from_its_own_checkpoint(pipeline: DiffusersPipeline) -> None:
    fox = fox_params(steps=STEPS, scheduler="dpmpp_2m", seed=5, num_images=2)
    cat = fox_params(steps=STEPS, scheduler="dpmpp_2m", seed=9, prompt="a cat")
    batched, kept, _ = _run(pipeline, [fox, cat], keep={0: {3}, 1: {5}})
    for job, params, step, whole in [(0, fox, 3, batched[:2]), (1, cat, 5, batched[2:])]:
        resume = checkpoints.decode(kept[job, step])
        assert (
            resume.latents is not None and resume.latents.values.shape[0] == params.num_images
        )  # its own rows of the batch, only
        resumed, _, reported = _run(pipeline, [params], resume=resume)
        assert reported == list(range(step + 1, STEPS + 1))
        # Alone now, not in a batch of 3 images: the CPU's sums may round apart in the last bit.
        for image, original in zip(resumed, whole, strict=True):
            assert int(np.abs(image - original).max()) <= 1


def test_a_checkpoint_is_data_never_code(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoints.decode(b"\x80\x04cos\nsystem\n(S'touch " + str(tmp_path / "owned").encode() + b"'\ntR.")
    assert not (tmp_path / "owned").exists()
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoints.decode(b"garbage")


@pytest.mark.parametrize("settings", [SESSION_RECOVERY], indirect=True)
async def test_a_job_whose_checkpoint_redis_lost_starts_again_and_says_so(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        job_id = await kill_worker_mid_job(settings, spawn, client, job=JOB, at_step=10)
        back = await wait_for(client, job_id, lambda job: job["status"] == "pending")
        assert back["resumed_from_step"] > 0  # what the requeue promised
        async with Redis.from_url(settings.redis_url) as redis:
            assert await redis.delete(checkpoint_key(job_id)) == 1  # and then Redis lost it
        await run_worker(settings)
        job = await wait_for(client, job_id, lambda job: job["status"] in {"completed", "failed"})
    assert (job["status"], job["attempt"], job["resumed_from_step"]) == ("completed", 2, 0)
    events = await events_of(settings, job_id)
    started = [e for e in events if e["type"] == "started"][-1]
    assert (started["resumed_from_step"], started["checkpoint_lost"]) == (0, True)
    after = [e["step"] for e in events[events.index(started) :] if e["type"] == "progress"]
    assert after == list(range(1, JOB["steps"] + 1))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no seq given twice


def _as_role(url: str, role: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))


@pytest.mark.parametrize("settings", [{**SESSION_RECOVERY, "session_confirm_s": 0.3}], indirect=True)
async def test_a_worker_whose_session_was_cut_stops_publishing_and_writing_at_once(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    """The worker lives and its pool's connections work; only its session is cut, and it cannot
    open another (its role may no longer log in): recovery takes its job back."""
    role = f"stepcast_cut_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(settings.database_url)
    await admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
    old: StepcastProcess | None = None
    try:
        async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
            cut = settings.model_copy(update={"database_url": _as_role(settings.database_url, role)})
            old = await spawn("gpu_worker.worker", cut)
            job_id = (await client.post("/v1/jobs", json=JOB)).json()["id"]
            await wait_for(client, job_id, lambda job: job["progress"]["step"] >= 10)
            await admin.execute(f"ALTER ROLE {role} NOLOGIN")
            cut_at = time.monotonic()
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE usename = $1 AND application_name LIKE 'stepcast-worker %'",
                role,
            )
            assert killed == 1
            back = await wait_for(client, job_id, lambda job: job["status"] == "pending")
            requeued_in = time.monotonic() - cut_at
            await asyncio.sleep(1.5)  # what the old attempt does now that the job is not its own
            row = await job_row(settings, uuid.UUID(job_id))
            assert (row["status"], row["attempt"]) == ("pending", 1)
            assert row["progress_step"] == back["progress"]["step"]  # it wrote nothing more
            events = await events_of(settings, job_id)
            assert events[-1]["type"] == "requeued" and events[-1]["reason"] == "worker_lost"
            assert old.process is not None and old.process.poll() is None  # it lives
            await run_worker(settings)
            job = await wait_for(client, job_id, lambda job: job["status"] in {"completed", "failed"})
        assert (job["status"], job["attempt"]) == ("completed", 2)
        assert requeued_in < 5
        stored = settings.storage_dir / job_id
        assert [str(p.relative_to(stored)) for p in stored.rglob("*.png")] == ["2/0.png"]
        assert "job lost to another attempt" in old.log.read_text()
    finally:
        if old is not None:
            old.kill()
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_a_resumed_jobs_eta_counts_only_the_steps_it_has_left() -> None:
    params = fox_params(steps=20)
    step_work = params.megapixel_steps / params.steps

    class Counts:
        async def pace(self, queue: str) -> Pace:
            return Pace(megapixel_step_s=0.1 / step_work, workers=1)  # 0.1 s a step

    estimator = EtaEstimator(cast(Any, SimpleNamespace(counts=Counts())), cast(Any, None), max_age_s=60)
    fresh = SimpleNamespace(params=params, queue="q", resumed_from_step=None)
    resumed = SimpleNamespace(params=params, queue="q", resumed_from_step=15)
    first, behind_two = Place(1, 0.0), Place(3, 2 * params.megapixel_steps)
    assert (await estimator.estimate(cast(Any, fresh), first)).done_in_s == pytest.approx(2.0)
    assert (await estimator.estimate(cast(Any, resumed), first)).done_in_s == pytest.approx(
        0.5
    )  # 5 steps left
    estimate = await estimator.estimate(cast(Any, resumed), behind_two)  # two whole jobs ahead
    assert (estimate.start_in_s, estimate.done_in_s) == (pytest.approx(4.0), pytest.approx(4.5))


BATCH_OF_TWO = {**SESSION_RECOVERY, "batch_size": 2, "batch_wait_s": 1.0}
SMALL = {**JOB, "steps": 80, "width": 128, "height": 128}


@pytest.mark.parametrize("settings", [BATCH_OF_TWO], indirect=True)
async def test_each_job_of_a_killed_batch_resumes_from_its_own_checkpoint(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        worker = await spawn("gpu_worker.worker", settings)
        ids = [(await client.post("/v1/jobs", json={**SMALL, "seed": seed})).json()["id"] for seed in (1, 2)]
        for job_id in ids:
            await wait_for(client, job_id, lambda job: job["progress"]["step"] >= 20)
        worker.kill()
        await run_worker(settings)
        jobs = [
            await wait_for(client, job_id, lambda job: job["status"] in {"completed", "failed"})
            for job_id in ids
        ]
    for job in jobs:
        assert (job["status"], job["attempt"]) == ("completed", 2)
        assert job["timings"]["batch_size"] == 1  # a resumed job runs alone
        events = await events_of(settings, job["id"])
        started = [e for e in events if e["type"] == "started"]
        assert [e["attempt"] for e in started] == [1, 2]
        batched = [e["step"] for e in events[: events.index(started[1])] if e["type"] == "progress"]
        resumed = started[1]["resumed_from_step"]
        assert 0 < resumed <= batched[-1]  # its own checkpoint, from the batched run
        again = [e["step"] for e in events[events.index(started[1]) :] if e["type"] == "progress"]
        assert again == list(range(resumed + 1, SMALL["steps"] + 1))
