"""The whole path on real components: REST submit -> arq -> the tiny diffusers
model -> storage -> Postgres -> REST and the image, plus the events it left."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any

import numpy as np
import pytest
from PIL import Image
from redis.asyncio import Redis

from gpu_worker.pipeline import DiffusersPipeline
from stepcast.events import EventLog
from tests.conftest import MODEL_IDS, MODELS, Stack


async def fetch_png(stack: Stack, url: str) -> Image.Image:
    response = await stack.client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    image.load()
    return image


async def events_of(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    redis = Redis.from_url(stack.settings.redis_url)
    try:
        return (await EventLog(redis, stream_max=1000, ttl_s=60).read(job_id)).events
    finally:
        await redis.aclose()


@pytest.mark.parametrize("settings", MODELS, indirect=True, ids=MODEL_IDS)
async def test_prompt_in_image_out(stack: Stack) -> None:
    submitted = await stack.submit(steps=20, seed=7, width=64, height=96)
    job = await stack.wait(submitted["id"])
    assert job["status"] == "completed", job
    assert job["attempt"] == 1 and job["error"] is None
    assert job["progress"] == {"step": 20, "total": 20}
    assert job["started_at"] and job["finished_at"] and job["queue_position"] is None
    assert job["timings"]["run_s"] > 0 and job["timings"]["queue_s"] >= 0
    assert job["params"]["model"] == job["provenance"]["model"] == stack.settings.model_name
    assert len(job["provenance"]["model_revision"]) == 16
    [image] = job["result"]["images"]
    assert image == {
        "url": f"/v1/images/{job['id']}/1/0.png",
        "width": 64,
        "height": 96,
        "seed": 7,
        "content_type": "image/png",
    }
    png = await fetch_png(stack, image["url"])
    assert png.size == (64, 96) and png.mode == "RGB"


@pytest.mark.parametrize("settings", MODELS, indirect=True, ids=MODEL_IDS)
async def test_events_tell_the_whole_story_in_order(stack: Stack) -> None:
    job = await stack.wait((await stack.submit(steps=6))["id"])
    events = await events_of(stack, job["id"])
    assert [e["type"] for e in events] == ["queued", "started"] + ["progress"] * 6 + ["completed"]
    assert [e["seq"] for e in events] == list(range(1, 10))
    assert job["last_seq"] == 9
    assert all(e["job_id"] == job["id"] for e in events)
    queued, started, *progress, completed = events
    assert queued["position"] == 1
    assert started["attempt"] == 1 and started["worker"]
    assert [(p["step"], p["total"]) for p in progress] == [(i, 6) for i in range(1, 7)]
    assert all(p["eta_s"] >= 0 for p in progress) and progress[-1]["eta_s"] == 0
    assert completed["images"] == job["result"]["images"]
    assert completed["timings"] == job["timings"]
    # Flat wire shape: type, job_id, seq first, then the type's own fields.
    assert list(started) == ["type", "job_id", "seq", "attempt", "worker"]


@pytest.mark.parametrize("settings", MODELS, indirect=True, ids=MODEL_IDS)
async def test_same_seed_same_image_and_batch_mates_do_not_matter(stack: Stack) -> None:
    first = await stack.wait((await stack.submit(seed=1234, steps=4))["id"])
    again = await stack.wait((await stack.submit(seed=1234, steps=4))["id"])
    other = await stack.wait((await stack.submit(seed=1235, steps=4))["id"])
    batch = await stack.wait((await stack.submit(seed=1234, steps=4, num_images=2))["id"])

    def pixels(job: dict[str, Any], index: int = 0) -> Any:
        return fetch_png(stack, job["result"]["images"][index]["url"])

    a, b, c = await pixels(first), await pixels(again), await pixels(other)
    assert a.tobytes() == b.tobytes()  # same shape of work: bit for bit
    assert levels_apart(a, c) > 20
    assert [image["seed"] for image in batch["result"]["images"]] == [1234, 1235]
    # Image i of a batch uses seed + i, as if it ran alone. Batched float
    # kernels may round differently than single ones on some CPUs, so "the
    # same picture" allows one 8-bit level here and there, never more.
    assert levels_apart(await pixels(batch, 0), a) <= 1
    assert levels_apart(await pixels(batch, 1), c) <= 1


def levels_apart(x: Image.Image, y: Image.Image) -> int:
    """The largest difference between two images' pixels, in 8-bit levels."""
    return int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max())


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim", "dpmpp_2m", "unipc"])
async def test_every_scheduler_runs_exactly_its_steps(stack: Stack, scheduler: str) -> None:
    job = await stack.wait((await stack.submit(steps=3, scheduler=scheduler))["id"])
    assert job["status"] == "completed", job
    progress = [e for e in await events_of(stack, job["id"]) if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3]


async def test_pipeline_exception_fails_the_job_with_its_message(
    stack: Stack, pipeline: DiffusersPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_unet(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(pipeline.pipe.unet, "forward", broken_unet)
    job = await stack.wait((await stack.submit())["id"])
    assert job["status"] == "failed"
    assert job["error"] == {
        "code": "pipeline_error",
        "message": "RuntimeError: CUDA out of memory (injected)",
    }
    assert job["result"] is None and job["finished_at"]
    last = (await events_of(stack, job["id"]))[-1]
    assert last["type"] == "failed" and last["error"] == job["error"] and last["seq"] == job["last_seq"]


async def test_cancel_stops_a_running_job_at_the_next_step(stack: Stack) -> None:
    job_id = (await stack.submit(steps=150))["id"]
    for _ in range(500):
        if any(e["type"] == "progress" for e in await events_of(stack, job_id)):
            break
        await asyncio.sleep(0.01)
    response = await stack.client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = await stack.wait(job_id)
    assert job["status"] == "canceled" and job["result"] is None
    events = await events_of(stack, job_id)
    assert events[-1]["type"] == "canceled" and events[-1]["seq"] == job["last_seq"]
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] < 150
    assert not (stack.settings.storage_dir / job_id).exists()  # no image stored


async def test_canceled_pending_job_never_starts(stack: Stack) -> None:
    # One long job holds the only worker, so the second stays pending.
    running = (await stack.submit(steps=150))["id"]
    waiting = (await stack.submit(steps=2))["id"]
    assert (await stack.client.post(f"/v1/jobs/{waiting}/cancel")).json()["status"] == "canceled"
    await stack.client.post(f"/v1/jobs/{running}/cancel")
    await stack.wait(running)
    await asyncio.sleep(0.3)  # give the worker time to (not) pick up the canceled job
    job = (await stack.client.get(f"/v1/jobs/{waiting}")).json()
    assert job["status"] == "canceled" and job["attempt"] == 0 and job["started_at"] is None
    assert [e["type"] for e in await events_of(stack, waiting)] == ["queued", "canceled"]


@pytest.mark.parametrize("settings", MODELS, indirect=True, ids=MODEL_IDS)
async def test_previews_arrive_every_k_steps(stack: Stack) -> None:
    job = await stack.wait((await stack.submit(steps=6, preview={"every": 2, "max_px": 32}))["id"])
    progress = [e for e in await events_of(stack, job["id"]) if e["type"] == "progress"]
    with_preview = [e["step"] for e in progress if "preview" in e]
    assert with_preview == [2, 4, 6]
    data = progress[1]["preview"]
    assert data.startswith("data:image/webp;base64,")
    import base64

    image = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1])))
    assert image.format == "WEBP" and max(image.size) == 32


async def test_wire_shape_of_a_finished_job(stack: Stack) -> None:
    """docs/design.md, "Wire shapes": these names and types are the contract; extend, never rename."""
    job = await stack.wait((await stack.submit(steps=2, seed=7))["id"])
    expected = {
        "id": str, "status": str, "attempt": int, "owner": str, "params": dict, "progress": dict,
        "queue_position": type(None), "created_at": str, "started_at": str, "finished_at": str,
        "result": dict, "error": type(None), "timings": dict, "last_seq": int,
        "resumed_from_step": type(None),
    }  # fmt: skip
    for name, kind in expected.items():
        assert isinstance(job[name], kind), name
    assert set(job["params"]) >= {
        "prompt",
        "steps",
        "width",
        "height",
        "seed",
        "num_images",
        "guidance_scale",
        "model",
    }
    assert set(job["timings"]) == {"queue_s", "run_s", "pipeline_s", "batch_size"}
    assert 0 < job["timings"]["pipeline_s"] <= job["timings"]["run_s"] and job["timings"]["batch_size"] == 1
    assert set(job["result"]["images"][0]) == {"url", "width", "height", "seed", "content_type"}
    json.dumps(job)
    uuid.UUID(job["id"])
