"""Many models behind one API: workers announce what they serve, GET /v1/models and /v1/limits
tell clients, a submit goes to its model's queue and workers, and a model without a live worker
still takes jobs and says why they wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httpx
import pytest
import torch

from gpu_worker.pipeline import DiffusersPipeline
from gpu_worker.tiny_model import build_preview_decoder
from gpu_worker.worker import create_worker
from stepcast import queue
from stepcast.db import Database
from stepcast.models import ModelCard
from stepcast.settings import DATA_DIR, Settings
from tests.conftest import (
    TINY_XL,
    Stack,
    StepcastProcess,
    assert_problem,
    eventually,
    finish_within,
    fox_params,
    model_queue,
)
from tests.test_recovery import events_of

FRESH = {"catalog_cache_s": 0}  # each read of the models sees the workers as they are now


async def models(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    answer = await client.get("/v1/models")
    assert answer.status_code == 200, answer.text
    return {model["name"]: model for model in answer.json()["models"]}


@pytest.mark.parametrize("settings", [FRESH], indirect=True)
async def test_a_worker_announces_its_model_and_withdraws_it_when_it_stops(
    settings: Settings, serve: Callable[[Settings], Awaitable[str]], pipeline: Any
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        before = await models(client)
        # The server's default model is there before any worker: its limits are the server's.
        assert (
            list(before) == ["tiny"] and before["tiny"]["workers"] == [] and before["tiny"]["family"] is None
        )
        worker = create_worker(settings, pipeline=pipeline, handle_signals=False)
        running = asyncio.create_task(worker.async_run())
        try:
            await asyncio.wait_for(worker.ready.wait(), 60)
            tiny = (await models(client))["tiny"]
            assert (tiny["family"], tiny["previews"], tiny["revision"]) == (
                "sd1",
                "latent",
                pipeline.revision,
            )
            [live] = tiny["workers"]
            assert (live["device"], live["dtype"], live["batch_size"]) == (
                "cpu",
                "float32",
                settings.batch_size,
            )
            assert "id" not in live  # a worker's id names its host: not for anyone who asks
            assert tiny["limits"]["size_px"] == {"min": 64, "max": 1024, "default": 64, "multiple_of": 8}
            assert tiny["limits"]["steps"] == {"min": 1, "max": 150, "default": 20}
            assert tiny["queue"] == {"pending": 0}
        finally:
            await finish_within(worker.close(), 30, "a worker's close")
            await finish_within(asyncio.gather(running, return_exceptions=True), 10, "a worker")
        after = (await models(client))["tiny"]
        assert after["workers"] == [] and after["family"] == "sd1"  # gone, its card kept
        assert after["eta_s"] is None


@pytest.mark.parametrize("settings", [FRESH], indirect=True)
async def test_a_killed_workers_registration_lapses_with_its_session(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        worker = await spawn("gpu_worker.worker", settings)

        async def live() -> int:
            return len((await models(client))["tiny"]["workers"])

        await eventually(live, timeout_s=60)
        worker.kill()  # SIGKILL: no withdrawal; its Postgres session ends with it
        killed = time.monotonic()
        await eventually(lambda: _none(live), timeout_s=10)
        assert time.monotonic() - killed < 5


async def _none(count: Callable[[], Awaitable[int]]) -> bool:
    return await count() == 0


async def test_an_unknown_model_is_refused_naming_the_models_there_are(
    settings: Settings, serve: Callable[[Settings], Awaitable[str]]
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        answer = await client.post("/v1/jobs", json={"prompt": "a fox", "model": "sdxl-turbo"})
        assert_problem(answer, 422, {"model": "model must be one of: tiny"})
        limits = await client.get("/v1/limits", params={"model": "sdxl-turbo"})
        assert_problem(limits, 422, {"model": "model must be one of: tiny"})
        assert (await client.get("/v1/limits")).json()["model"] == "tiny"


@pytest.mark.parametrize("settings", [FRESH], indirect=True)
async def test_two_models_behind_one_server_each_job_on_a_worker_of_its_own_model(
    stack: Stack, run_worker: Callable[..., Awaitable[None]], pipelines: Callable[[str], Any]
) -> None:
    xl = stack.settings.model_copy(update=TINY_XL)
    await run_worker(xl)
    served = await models(stack.client)
    assert sorted(served) == ["tiny", "tiny-xl"]
    assert (served["tiny-xl"]["family"], served["tiny-xl"]["previews"]) == ("sdxl", "latent")
    limits = (await stack.client.get("/v1/limits", params={"model": "tiny-xl"})).json()
    assert limits["model"] == "tiny-xl" and limits["models"] == ["tiny", "tiny-xl"]
    # Each job on its own model's queue, whatever the order they come in.
    preview = {"every": 2, "max_px": 32}
    submitted = await asyncio.gather(
        *(
            stack.submit(model=model, steps=4, seed=i, preview=preview)
            for i, model in enumerate(["tiny-xl", "tiny"] * 3)
        )
    )
    done = [await stack.wait(job["id"]) for job in submitted]
    assert [job["status"] for job in done] == ["completed"] * 6
    for job in done:
        model = job["params"]["model"]
        assert job["provenance"]["model"] == model
        assert job["provenance"]["model_revision"] == pipelines(model).revision
        events = await events_of(stack.settings, job["id"])
        [started] = [e for e in events if e["type"] == "started"]
        row = await stack.db.jobs.get(job["id"])
        assert row is not None and row.queue == model_queue(
            stack.settings.model_copy(update={"model_name": model})
        )
        assert started["worker"] == row.worker
        previews = [e for e in events if e["type"] == "progress" and "preview" in e]
        assert [e["step"] for e in previews] == [2, 4]  # each family's own projection
    by_worker: dict[str, set[str]] = {}
    for job in done:
        row = await stack.db.jobs.get(job["id"])
        assert row is not None and row.worker is not None
        by_worker.setdefault(row.worker, set()).add(job["params"]["model"])
    assert sorted(map(sorted, by_worker.values())) == [["tiny"], ["tiny-xl"]]  # no worker ran both


@pytest.mark.parametrize("settings", [{**FRESH, "queue_update_s": 0.2}], indirect=True)
async def test_a_job_for_a_model_with_no_worker_is_taken_and_says_why_it_waits(
    stack: Stack, run_worker: Callable[..., Awaitable[None]], pipelines: Callable[[str], Any]
) -> None:
    xl = stack.settings.model_copy(update=TINY_XL)
    # A pool of tiny-xl workers that scaled to zero: the model's card stays.
    worker = create_worker(xl, pipeline=pipelines("tiny-xl"), handle_signals=False)
    running = asyncio.create_task(worker.async_run())
    await asyncio.wait_for(worker.ready.wait(), 60)
    await finish_within(worker.close(), 30, "a worker's close")
    await finish_within(asyncio.gather(running, return_exceptions=True), 10, "a worker")

    job = await stack.submit(model="tiny-xl", steps=3)
    assert job["status"] == "pending"
    [queued] = (await events_of(stack.settings, job["id"]))[:1]
    assert (queued["type"], queued["position"], queued["eta_s"], queued["reason"]) == (
        "queued",
        1,
        None,
        "no_worker",
    )
    assert (await models(stack.client))["tiny-xl"]["queue"] == {"pending": 1}
    tiny = await stack.wait((await stack.submit(steps=3))["id"])  # the other model's jobs go on
    assert tiny["status"] == "completed"
    assert (await stack.client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "pending"

    # The announcer has read the waiting job (its position said nothing new); then a worker
    # of tiny-xl registers (one that takes nothing yet): the announcer tells the waiting job,
    # whose newest queued event has no reason any more.
    await asyncio.sleep(3 * stack.settings.queue_update_s)
    card = ModelCard.from_json(await stack.db.pool.fetchval("SELECT card FROM models WHERE name = 'tiny-xl'"))
    await stack.db.models.announce("coming-up", None, card, lapse_s=60)

    async def told_a_worker_runs() -> bool:
        told = [e for e in await events_of(stack.settings, job["id"]) if e["type"] == "queued"]
        return len(told) == 2 and "reason" not in told[-1] and told[-1]["position"] == 1

    await eventually(told_a_worker_runs, timeout_s=15)
    await stack.db.models.leave("coming-up")

    await run_worker(xl)  # a worker starts (KEDA scales the pool up from zero)
    done = await stack.wait(job["id"])
    assert done["status"] == "completed"


async def test_queue_positions_and_defaults_are_per_model(
    settings: Settings, serve: Callable[[Settings], Awaitable[str]]
) -> None:
    """No worker runs: jobs of two models wait in two lines, each numbered from 1, each job
    with its own model's defaults."""
    card = ModelCard(
        name="tiny-xl", revision="r", family="sdxl", device="cpu", dtype="float32",
        schedulers=("euler",), min_size_px=64, max_size_px=256, default_size_px=128,
        max_steps=50, default_steps=10, batch_size=1, previews="latent",
    )  # fmt: skip
    db = await Database.connect(settings.database_url, max_size=1)
    try:
        await db.models.announce("a-worker-that-went", None, card, lapse_s=0.0)
        assert await db.models.forget_lapsed(0.0) == 1  # its registration goes (retention)…
        assert list((await db.models.known(3600))["tiny-xl"].workers) == []  # …its model's card stays
    finally:
        await db.close()
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        positions: dict[str, list[int]] = {"tiny": [], "tiny-xl": []}
        for model in ["tiny", "tiny-xl", "tiny", "tiny-xl", "tiny-xl"]:
            answer = await client.post("/v1/jobs", json={"prompt": "a fox", "model": model})
            assert answer.status_code == 202, answer.text
            job = answer.json()
            positions[model].append(job["queue_position"])
            defaults = (128, 10) if model == "tiny-xl" else (64, 20)
            assert (job["params"]["width"], job["params"]["steps"]) == defaults
        assert positions == {"tiny": [1, 2], "tiny-xl": [1, 2, 3]}


@pytest.mark.parametrize("settings", [{"enqueue_grace_s": 0.0, "recovery_interval_s": 0.2}], indirect=True)
async def test_a_job_an_older_version_left_on_the_one_queue_of_before_runs_on_its_models(
    settings: Settings, run_worker: Callable[..., Awaitable[None]]
) -> None:
    """A rolling update: an older server put a job on the one queue of before (STEPCAST_QUEUE_NAME
    alone), and no older worker remains to take it from there. The recovery pass moves it to its
    model's queue, and a worker runs it."""
    db = await Database.connect(settings.database_url, max_size=2)
    arq = queue.connect(settings.redis_url)
    try:
        params = fox_params(model=settings.model_name, steps=2)
        old = await db.jobs.insert(
            owner="o", params=params, preview=None, queue=settings.queue_name, model_name=params.model,
            version="0.1.0", queue_ttl_s=0,
        )  # fmt: skip
        assert old.job is not None
        assert await queue.enqueue(arq, old.job.id, settings.queue_name)  # where older versions did
        await run_worker(settings)
        job = await eventually(lambda: _finished(db, old.job.id), timeout_s=30)
        assert (job.status, job.queue) == ("completed", model_queue(settings))
        assert (await db.counts.kept()).pending_by_queue.get(settings.queue_name, 0) == 0
    finally:
        await arq.aclose(close_connection_pool=True)
        await db.close()


async def _finished(db: Database, job_id: Any) -> Any:
    job = await db.jobs.get(job_id)
    return job if job is not None and job.status in {"completed", "failed"} else None


@pytest.mark.parametrize("settings", [FRESH], indirect=True)
async def test_a_preview_decoder_paints_the_previews_and_the_card_says_so(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
    pipeline: DiffusersPipeline,
) -> None:
    decoder = build_preview_decoder(DATA_DIR / "models" / "tiny-taesd")
    decoded = DiffusersPipeline(pipeline.pipe, pipeline.name, pipeline.revision, preview_decoder=decoder)
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        await run_worker(settings, with_pipeline=decoded)
        assert (await models(client))["tiny"]["previews"] == "taesd"
        stack = Stack(settings, client, cast(Database, None))
        job = await stack.wait((await stack.submit(steps=4, preview={"every": 2, "max_px": 64}))["id"])
    assert job["status"] == "completed"
    events = await events_of(settings, job["id"])
    previews = [e["preview"] for e in events if e["type"] == "progress" and "preview" in e]
    assert len(previews) == 2 and all(p.startswith("data:image/webp;base64,") for p in previews)
    # The decoder paints the image at its size; the projection, the latent grid (1/8 of it).
    latents = torch.randn(4, 8, 8)
    assert decoded.preview_pixels(latents, 64, 64, 64).result().shape == (64, 64, 3)
    assert decoded.preview_pixels(latents, 64, 64, 32).result().shape == (32, 32, 3)  # at its size
    assert pipeline.preview_pixels(latents, 64, 64, 64).shape == (8, 8, 3)
