"""Dynamic batching and the worker's hold on its queue: compatible jobs share a
pipeline call yet keep their own seeds, events, results, failures and cancels;
an idle worker starts a job on a wake-up rather than at its next poll; jobs a
dead worker had taken but not started are free again within a lease."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from redis.asyncio import Redis

from gpu_worker.batching import take_batch
from gpu_worker.checkpoints import Snapshot
from gpu_worker.pipeline import DiffusersPipeline, Generation, Pipeline, Request
from stepcast import arq_bridge, queue
from stepcast.db import Completion
from stepcast.db.runs import RunStore
from stepcast.jobs import Job
from stepcast.params import JobParams, Preview
from stepcast.settings import Settings
from tests.conftest import MODEL_IDS, TINY_XL, Stack, StepcastProcess, eventually, model_queue
from tests.test_recovery import FAST_RECOVERY, LONG_JOB, events_of, job_row, wait_for

BATCHED = {"batch_size": 4, "batch_wait_s": 1.0}  # jobs submitted together meet in one batch


def params(prompt: str = "a red fox", *, seed: int = 1, **overrides: Any) -> JobParams:
    values: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": None, "model": "tiny", "steps": 4, "width": 64, "height": 64,
        "guidance_scale": 7.5, "seed": seed, "num_images": 1, "scheduler": None,
    }  # fmt: skip
    return JobParams(**{**values, **overrides})


def request(p: JobParams) -> Request:
    return Request(p, lambda *_: None, lambda: False)


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_batch_is_the_oldest_job_and_the_compatible_ones_behind_it() -> None:
    waiting = [
        params("a", steps=4),
        params("b", steps=8),  # other steps: not compatible
        params("c", steps=4, num_images=2),
        params("d", steps=4, guidance_scale=3.0),  # other guidance: not compatible
        params("e", steps=4, num_images=2),  # would make 5 images: over the batch size
        params("f", steps=4),
    ]
    batch = take_batch(waiting, lambda p: p, batch_size=4)
    assert [p.prompt for p in batch] == ["a", "c", "f"]
    assert [p.prompt for p in waiting] == ["b", "d", "e"]  # in their order, for the next batches
    assert [p.prompt for p in take_batch(waiting, lambda p: p, batch_size=4)] == ["b"]
    big = [params("g", num_images=4), params("h")]
    assert [p.prompt for p in take_batch(big, lambda p: p, batch_size=2)] == ["g"]  # the oldest always goes


def test_an_image_does_not_depend_on_what_it_was_batched_with(pipeline: DiffusersPipeline) -> None:
    fox = params("a red fox", seed=5)
    [alone] = pipeline.generate([request(fox)])
    mates = [params("a blue sea", seed=9, num_images=2), fox, params("night", seed=7, negative_prompt="day")]
    batched = pipeline.generate([request(p) for p in mates])
    assert [len(g.images) for g in batched] == [2, 1, 1]
    # The same picture; a batched matmul may round differently by one level.
    assert np.abs(pixels(alone.images[0]) - pixels(batched[1].images[0])).max() <= 1
    # ...and the comparison can tell pictures apart.
    assert np.abs(pixels(alone.images[0]) - pixels(batched[0].images[0])).mean() > 5


@pytest.mark.parametrize("settings", [BATCHED, {**BATCHED, **TINY_XL}], indirect=True, ids=MODEL_IDS)
async def test_compatible_jobs_share_a_pipeline_call_with_their_own_events_and_results(
    stack: Stack, pipelines: Callable[[str], Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = stack.settings.model_name
    recorded: list[set[str]] = []  # the jobs of each statement recording completions
    record = RunStore.complete

    async def recording(runs: RunStore, completions: list[Completion]) -> list[Job | None]:
        recorded.append({str(completion.job_id) for completion in completions})
        return await record(runs, completions)

    monkeypatch.setattr(RunStore, "complete", recording)
    seeds = [11, 12, 13]
    jobs = await asyncio.gather(*(stack.submit(prompt=f"fox {s}", seed=s, steps=8) for s in seeds))
    other = await stack.submit(prompt="other steps", steps=6)
    done = [await stack.wait(job["id"]) for job in [*jobs, other]]
    assert [job["status"] for job in done] == ["completed"] * 4
    batched, alone = done[:3], done[3]
    assert {job["timings"]["batch_size"] for job in batched} == {3}
    assert len({job["timings"]["pipeline_s"] for job in batched}) == 1  # one call
    assert alone["timings"]["batch_size"] == 1
    assert sorted(recorded, key=len) == [{alone["id"]}, {job["id"] for job in batched}]  # one statement
    for job, seed in zip(batched, seeds, strict=True):
        events = await events_of(stack.settings, job["id"])
        types = [e["type"] for e in events]
        # Submitted together, the three may first be told the same position; the announcer
        # corrects it with another `queued` before the job starts.
        waiting = types[: types.index("started")]
        assert waiting and set(waiting) == {"queued"}
        assert types[len(waiting) :] == ["started", *["progress"] * 8, "completed"]
        assert [e["step"] for e in events if e["type"] == "progress"] == list(range(1, 9))
        assert job["result"]["images"][0]["seed"] == seed
        solo_params = params(f"fox {seed}", seed=seed, steps=8, model=model)
        [solo] = pipelines(model).generate([request(solo_params)])
        stored = Image.open(stack.settings.storage_dir / job["id"] / "1" / "0.png")
        assert np.abs(pixels(stored) - pixels(solo.images[0])).max() <= 1


@pytest.mark.parametrize("settings", [BATCHED], indirect=True)
async def test_canceling_one_job_of_a_batch_leaves_the_others_running(stack: Stack) -> None:
    jobs = await asyncio.gather(*(stack.submit(prompt=f"long {i}", seed=i, steps=150) for i in range(3)))
    victim = jobs[1]["id"]

    async def under_way() -> bool:
        job = (await stack.client.get(f"/v1/jobs/{victim}")).json()
        return bool(job["progress"]["step"] >= 3)

    await eventually(under_way)
    assert (await stack.client.post(f"/v1/jobs/{victim}/cancel")).status_code == 202
    canceled = await stack.wait(victim)
    others = [await stack.wait(job["id"], timeout_s=60) for job in (jobs[0], jobs[2])]
    assert canceled["status"] == "canceled" and canceled["progress"]["step"] < 150
    assert [job["status"] for job in others] == ["completed", "completed"]
    assert {job["timings"]["batch_size"] for job in others} == {3}
    assert all(canceled["finished_at"] < job["finished_at"] for job in others)  # it did not wait for them
    events = await events_of(stack.settings, victim)
    assert events[-1]["type"] == "canceled" and all(e["type"] != "completed" for e in events)


class ExplodingPipeline:
    """The real pipeline, except that a batch holding an "explode" prompt raises."""

    def __init__(self, inner: DiffusersPipeline) -> None:
        self.inner = inner
        self.name = inner.name
        self.revision = inner.revision

    def __getattr__(self, name: str) -> Any:  # the rest of the Pipeline: the inner one's
        return getattr(self.inner, name)

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        if any("explode" in r.params.prompt for r in requests):
            raise RuntimeError("out of memory (injected)")
        return self.inner.generate(requests)


@pytest.mark.parametrize("settings", [BATCHED], indirect=True)
async def test_a_failing_job_fails_alone(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
    pipeline: DiffusersPipeline,
) -> None:
    await run_worker(settings, with_pipeline=ExplodingPipeline(pipeline))
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        prompts = ["calm", "explode", "quiet"]
        jobs = await asyncio.gather(
            *(client.post("/v1/jobs", json={"prompt": p, "steps": 4}) for p in prompts)
        )
        ids = [job.json()["id"] for job in jobs]
        done = [await wait_for(client, i, lambda j: j["status"] in {"completed", "failed"}) for i in ids]
    assert [job["status"] for job in done] == ["completed", "failed", "completed"]
    assert done[1]["error"] == {"code": "pipeline_error", "message": "RuntimeError: out of memory (injected)"}
    for job in (done[0], done[2]):
        events = await events_of(settings, job["id"])
        steps = [e["step"] for e in events if e["type"] == "progress"]
        assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # re-run alone, reported once


@pytest.mark.parametrize("settings", [{"poll_delay_s": 5.0}], indirect=True)
async def test_an_idle_worker_starts_a_job_on_a_wake_up_not_at_its_next_poll(stack: Stack) -> None:
    await asyncio.sleep(1)  # the worker has polled and is idle, 5 s from its next poll
    for _ in range(3):
        job = await stack.wait((await stack.submit(steps=1))["id"])
        assert job["timings"]["queue_s"] < 0.5, job["timings"]


Log = list[tuple[str, str]]  # (what, prompt or job id), in order


class SlowClaims:
    """Claims that take ``delay_s`` to come back (a loaded Postgres), and a worker whose
    pipeline notes its steps: what the pipeline ran and when each claim returned, in order."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        delay_s: float,
        start: Callable[[list[tuple[str, str]]], Awaitable[None]],
    ) -> None:
        self.log: Log = []
        self._start = start
        claim = RunStore.claim

        async def slow(runs: RunStore, job_ids: Sequence[uuid.UUID], **kwargs: Any) -> dict[uuid.UUID, Job]:
            await asyncio.sleep(delay_s)
            jobs = await claim(runs, job_ids, **kwargs)
            self.log.extend(("claimed", str(job_id)) for job_id in job_ids)
            return jobs

        monkeypatch.setattr(RunStore, "claim", slow)

    async def start_worker(self) -> None:
        await self._start(self.log)


@pytest.fixture
def slow_claims(
    settings: Settings,
    run_worker: Callable[..., Awaitable[None]],
    pipeline: DiffusersPipeline,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[float], SlowClaims]:
    def make(delay_s: float) -> SlowClaims:
        return SlowClaims(
            monkeypatch, delay_s, lambda log: run_worker(settings, with_pipeline=StepNoting(pipeline, log))
        )

    return make


class StepNoting:
    """The real pipeline, noting each step it runs (the pipeline thread appends to ``log``)."""

    def __init__(self, inner: DiffusersPipeline, log: Log) -> None:
        self.inner, self.log = inner, log
        self.name, self.revision = inner.name, inner.revision

    def __getattr__(self, name: str) -> Any:  # the rest of the Pipeline: the inner one's
        return getattr(self.inner, name)

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        def noting(request: Request) -> Request:
            def on_step(step: int, total: int, latents: Any, state: Callable[[], Snapshot]) -> None:
                if not request.should_stop():  # (a stopped job's steps do not count)
                    self.log.append(("step", request.params.prompt))
                request.on_step(step, total, latents, state)

            return Request(request.params, on_step, request.should_stop)

        return self.inner.generate([noting(r) for r in requests])


async def test_a_job_starts_on_the_pipeline_while_its_claim_is_in_flight(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    slow_claims: Callable[[float], SlowClaims],
    pipeline: DiffusersPipeline,
) -> None:
    claims = slow_claims(0.5)
    await claims.start_worker()
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        job_id = (await client.post("/v1/jobs", json={"prompt": "early", "steps": 4, "seed": 3})).json()["id"]
        job = await wait_for(client, job_id, lambda j: j["status"] == "completed")
    # Its ticket came with it from the queue: the pipeline ran while Postgres was claiming it.
    assert claims.log.index(("step", "early")) < claims.log.index(("claimed", job_id))
    events = await events_of(settings, job_id)
    assert [e["type"] for e in events] == ["queued", "started", *["progress"] * 4, "completed"]
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4]
    assert job["result"]["images"][0]["seed"] == 3 and job["attempt"] == 1
    [alone] = pipeline.generate([request(params("early", seed=3))])
    stored = Image.open(settings.storage_dir / job_id / "1" / "0.png")
    assert np.abs(pixels(stored) - pixels(alone.images[0])).max() <= 1  # the job's own params


async def test_a_job_alone_its_claim_does_not_return_stops_at_once(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    slow_claims: Callable[[float], SlowClaims],
) -> None:
    claims = slow_claims(0.3)
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        # Canceled while it waits in the queue, before any worker runs.
        doomed = (await client.post("/v1/jobs", json={"prompt": "doomed", "steps": 150})).json()["id"]
        assert (await client.post(f"/v1/jobs/{doomed}/cancel")).json()["status"] == "canceled"
        await claims.start_worker()
        after = (await client.post("/v1/jobs", json={"prompt": "after", "steps": 2})).json()["id"]
        await wait_for(client, after, lambda job: job["status"] == "completed")
    # It went to the pipeline with its ticket; the claim came back without it, and it stopped
    # (at most the step under way then): never started, no event, no image.
    claimed_at = claims.log.index(("claimed", doomed))
    assert ("step", "doomed") in claims.log[:claimed_at]
    assert claims.log[claimed_at:].count(("step", "doomed")) <= 1
    row = await job_row(settings, uuid.UUID(doomed))
    assert (row["status"], row["attempt"], row["started_at"]) == ("canceled", 0, None)
    assert [e["type"] for e in await events_of(settings, doomed)] == ["queued", "canceled"]
    assert not (settings.storage_dir / doomed).exists()


@pytest.mark.parametrize("settings", [BATCHED], indirect=True)
async def test_a_job_canceled_in_the_queue_takes_no_place_in_a_batch(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    slow_claims: Callable[[float], SlowClaims],
) -> None:
    claims = slow_claims(0)
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        ids = [
            (await client.post("/v1/jobs", json={"prompt": prompt, "steps": 4})).json()["id"]
            for prompt in ("doomed", "kept")
        ]
        assert (await client.post(f"/v1/jobs/{ids[0]}/cancel")).json()["status"] == "canceled"
        await claims.start_worker()
        kept = await wait_for(client, ids[1], lambda job: job["status"] == "completed")
    # Taken together, claimed before their batch ran: the kept one ran alone.
    assert ("claimed", ids[0]) in claims.log and ("step", "doomed") not in claims.log
    assert kept["timings"]["batch_size"] == 1
    assert [e["type"] for e in await events_of(settings, ids[0])] == ["queued", "canceled"]


@pytest.mark.parametrize("settings", [{}, BATCHED], indirect=True, ids=["alone", "batched"])
async def test_jobs_queued_without_a_ticket_are_claimed_first_then_run(stack: Stack) -> None:
    # As enqueued by a server from before tickets: the claim (or the batch window's read)
    # gives their params and preview settings from their rows.
    settings = stack.settings
    redis = queue.connect(settings.redis_url)
    ids = []
    try:
        for seed in (4, 5):
            insertion = await stack.db.jobs.insert(
                owner="anonymous", params=params("no ticket", seed=seed),
                preview=Preview(every=2, max_px=64), queue=model_queue(settings), model_name="tiny",
                version="test", queue_ttl_s=60,
            )  # fmt: skip
            ids.append(str(insertion.job.id))
            assert await queue.enqueue(redis, insertion.job.id, model_queue(settings))
            assert arq_bridge.job_kwargs(await redis.get(arq_bridge.job_key(ids[-1]))) == {}  # no ticket
    finally:
        await redis.aclose(close_connection_pool=True)
    jobs = [await stack.wait(job_id) for job_id in ids]
    assert [job["result"]["images"][0]["seed"] for job in jobs] == [4, 5]
    if settings.batch_wait_s:
        assert {job["timings"]["batch_size"] for job in jobs} == {2}
    for job_id in ids:
        events = await events_of(settings, job_id)
        assert [e["type"] for e in events] == ["started", *["progress"] * 4, "completed"]
        assert ["preview" in e for e in events if e["type"] == "progress"] == [False, True, False, True]


@pytest.mark.parametrize("settings", [{**FAST_RECOVERY, "batch_size": 1}], indirect=True)
async def test_jobs_a_dead_worker_held_but_never_started_are_free_within_a_lease(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    long_job = {"prompt": "a long night", "steps": 150}
    worker = await spawn("gpu_worker.worker", settings)
    redis = Redis.from_url(settings.redis_url)
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        first, second = [(await client.post("/v1/jobs", json=long_job)).json()["id"] for _ in range(2)]
        await wait_for(client, first, lambda job: job["progress"]["step"] >= 3)
        # The worker holds the second job (arq's in-progress key) while the first runs.
        assert await eventually(lambda: redis.exists(arq_bridge.in_progress_key(second)), timeout_s=5)
        assert (await client.get(f"/v1/jobs/{second}")).json()["status"] == "pending"
        worker.kill()
        await run_worker(settings)
        for job_id in (first, second):
            await wait_for(client, job_id, lambda job: job["status"] == "completed")
    await redis.aclose()
    assert (await job_row(settings, uuid.UUID(second)))["attempt"] == 1  # never claimed by the dead one
    assert (await job_row(settings, uuid.UUID(first)))["attempt"] == 2


@pytest.mark.parametrize("settings", [{"batch_size": 1}], indirect=True)
async def test_a_busy_worker_leaves_the_jobs_it_cannot_start_soon_to_an_idle_one(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
) -> None:
    short = {"prompt": "a short nap", "steps": 4}
    await spawn("gpu_worker.worker", settings.model_copy(update={"worker_id": "busy"}))
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        long_id = (await client.post("/v1/jobs", json=LONG_JOB)).json()["id"]
        held, left = [(await client.post("/v1/jobs", json=short)).json()["id"] for _ in range(2)]
        await wait_for(client, long_id, lambda job: job["progress"]["step"] >= 3)
        # It runs the long job and holds one job for its next batch; the other is left alone.
        await spawn("gpu_worker.worker", settings.model_copy(update={"worker_id": "idle"}))
        await wait_for(client, left, lambda job: job["status"] == "completed")
        assert (await client.get(f"/v1/jobs/{long_id}")).json()["status"] == "processing"
        await client.post(f"/v1/jobs/{long_id}/cancel")
        await wait_for(client, held, lambda job: job["status"] == "completed")
    rows = [await job_row(settings, uuid.UUID(job_id)) for job_id in (long_id, held, left)]
    assert [row["worker"] for row in rows] == ["busy", "busy", "idle"]


@pytest.mark.parametrize("settings", [{"heartbeat_s": 30.0, "lease_s": 60.0}], indirect=True)
async def test_a_cancel_while_the_claims_reply_is_on_its_way_stops_the_job_within_a_step(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
    pipeline: DiffusersPipeline,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log: Log = []
    steps_when_returned: list[int] = []
    claim = RunStore.claim

    async def slow_reply(runs: RunStore, job_ids: Sequence[uuid.UUID], **kwargs: Any) -> dict[uuid.UUID, Job]:
        jobs = await claim(runs, job_ids, **kwargs)
        await asyncio.sleep(1.0)  # committed: the job is processing, the worker does not know yet
        steps_when_returned.append(log.count(("step", "cancel me")))
        return jobs

    monkeypatch.setattr(RunStore, "claim", slow_reply)
    await run_worker(settings, with_pipeline=StepNoting(pipeline, log))
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        job_id = (await client.post("/v1/jobs", json={**LONG_JOB, "prompt": "cancel me"})).json()["id"]
        await wait_for(client, job_id, lambda job: job["status"] == "processing")
        assert (await client.post(f"/v1/jobs/{job_id}/cancel")).json()["status"] == "processing"
        job = await wait_for(client, job_id, lambda job: job["status"] == "canceled")
    # Heard while the claim was in flight: stopped as it returned, not at the next heartbeat.
    [returned] = steps_when_returned
    assert log.count(("step", "cancel me")) <= returned + 2 < LONG_JOB["steps"]
    assert job["attempt"] == 1
