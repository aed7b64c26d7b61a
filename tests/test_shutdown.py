"""Graceful shutdown with real processes and real SIGTERMs: a worker finishes its
job within the grace period or hands it back; a server closes its sockets with
1012, ends its SSE streams, and clients resume on the next server."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from gpu_worker.pipeline import Pipeline
from gpu_worker.worker import create_worker
from stepcast import arq_bridge
from stepcast.settings import Settings
from tests.conftest import StepcastProcess, eventually, model_queue
from tests.test_recovery import LONG_JOB, events_of, job_row, wait_for

SHORT_JOB = {"prompt": "a short night", "steps": 40, "width": 256, "height": 256}  # ~2 s here
MEDIUM_JOB = {**SHORT_JOB, "steps": 80}  # ~4 s here

Spawn = Callable[[str, Settings], Awaitable[StepcastProcess]]


def terminate(child: StepcastProcess) -> None:
    assert child.process is not None
    child.process.send_signal(signal.SIGTERM)


async def exit_code(child: StepcastProcess, timeout_s: float) -> int:
    assert child.process is not None
    return await asyncio.to_thread(child.process.wait, timeout_s)


# Batch size 1: the second job waits, held by the worker but not started.
@pytest.mark.parametrize("settings", [{"shutdown_grace_s": 60, "batch_size": 1}], indirect=True)
async def test_sigterm_lets_the_running_job_finish(
    settings: Settings, serve: Callable[[Settings], Awaitable[str]], spawn: Spawn
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        worker = await spawn("gpu_worker.worker", settings)
        job_id = (await client.post("/v1/jobs", json=SHORT_JOB)).json()["id"]
        queued_after = (await client.post("/v1/jobs", json=SHORT_JOB)).json()["id"]
        await wait_for(client, job_id, lambda job: job["progress"]["step"] >= 3)
        terminate(worker)
        assert await exit_code(worker, 60) == 0
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        waiting = (await client.get(f"/v1/jobs/{queued_after}")).json()
    assert job["status"] == "completed" and job["attempt"] == 1, job
    assert "requeued" not in [e["type"] for e in await events_of(settings, job_id)]
    assert waiting["status"] == "pending" and waiting["attempt"] == 0  # not taken after the signal
    # Released, not dropped: still on the queue, and free for the next worker at once.
    redis = Redis.from_url(settings.redis_url)
    try:
        assert await redis.zscore(model_queue(settings), queued_after) is not None
        assert not await redis.exists(arq_bridge.in_progress_key(queued_after))
    finally:
        await redis.aclose()
    row = await job_row(settings, job_id)
    assert row["status"] == "completed" and row["handoffs"] == 0 and row["lease_expires_at"] is None


# Grace 0: the job cannot finish in time. max_attempts 1: a hand-back must not count as a failure.
@pytest.mark.parametrize("settings", [{"shutdown_grace_s": 0, "max_attempts": 1}], indirect=True)
async def test_sigterm_hands_back_a_job_it_cannot_finish(
    settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Spawn,
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        worker = await spawn("gpu_worker.worker", settings)
        job_id = (await client.post("/v1/jobs", json=MEDIUM_JOB)).json()["id"]
        await wait_for(client, job_id, lambda job: job["progress"]["step"] >= 5)
        signalled = time.monotonic()
        terminate(worker)
        assert await exit_code(worker, 30) == 0
        assert time.monotonic() - signalled < 10  # stopped at the next step, not at the end
        row = await job_row(settings, job_id)
        assert (row["status"], row["attempt"], row["handoffs"]) == ("pending", 1, 1)
        # It saved its state at the step it stopped on: the next attempt resumes there.
        kept = row["resumed_from_step"]
        assert row["worker"] is None and kept >= 5 and row["progress_step"] == kept
        await run_worker(settings)
        job = await wait_for(client, job_id, lambda job: job["status"] != "pending" and job["attempt"] == 2)
        job = await wait_for(client, job_id, lambda job: job["status"] in {"completed", "failed"})
    assert job["status"] == "completed" and job["attempt"] == 2, job
    events = await events_of(settings, job_id)
    requeued = [e for e in events if e["type"] == "requeued"]
    assert [(e["attempt"], e["reason"], e["resumed_from_step"]) for e in requeued] == [
        (2, "worker_shutdown", kept)
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    started = [e for e in events if e["type"] == "started"]
    assert [e.get("resumed_from_step") for e in started] == [None, kept]
    after = events[events.index(started[1]) + 1 :]
    assert next(e["step"] for e in after if e["type"] == "progress") == kept + 1  # nothing run twice
    row = await job_row(settings, job_id)
    assert (row["status"], row["attempt"], row["handoffs"]) == ("completed", 2, 1)


async def test_sigterm_closes_sockets_with_1012_and_clients_resume(
    settings: Settings, spawn: Spawn, run_worker: Callable[..., Awaitable[None]]
) -> None:
    server = await spawn("server.app", settings)
    await run_worker(settings)
    seen: list[dict[str, Any]] = []
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "submit", "params": LONG_JOB}))
        while not (seen and seen[-1].get("type") == "progress" and seen[-1]["step"] >= 5):
            seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        job_id = seen[0]["job_id"]

        sse_lines: list[str] = []
        sse_open = asyncio.Event()

        async def read_sse() -> None:
            async with (
                httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
                client.stream("GET", f"/v1/jobs/{job_id}/events") as response,
            ):
                async for line in response.aiter_lines():
                    sse_lines.append(line)
                    if line.startswith("event: snapshot"):
                        sse_open.set()

        sse = asyncio.create_task(read_sse())
        await asyncio.wait_for(sse_open.wait(), 10)
        signalled = time.monotonic()
        terminate(server)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                seen.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012  # service restart
    await asyncio.wait_for(sse, 5)  # the SSE stream ended too, cleanly
    await exit_code(server, 15)
    assert time.monotonic() - signalled < 5

    server.start()  # the next server; the client resumes where it stopped
    events = [m for m in seen if "seq" in m]
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "subscribe", "job_id": job_id, "after_seq": events[-1]["seq"]}))
        while events[-1]["type"] != "completed":
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if "seq" in message:
                events.append(message)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
    row = await job_row(settings, job_id)
    assert (row["status"], row["attempt"], row["last_seq"]) == ("completed", 1, events[-1]["seq"])


async def test_a_worker_closes_fully_with_a_job_cancelled_before_it_started(
    settings: Settings, pipeline: Pipeline
) -> None:
    worker = create_worker(settings, pipeline=pipeline, handle_signals=False)
    running = asyncio.create_task(worker.async_run())

    async def started() -> bool:
        return worker.runner is not None

    await eventually(started)
    # A job taken a moment ago, not yet in the runner when the worker closes.
    reading = await worker.start_job_task("taken", asyncio.Event().wait())
    await worker.close()  # arq's own raised CancelledError here, before its on_shutdown
    assert reading.cancelled()
    assert worker.runner.dispatcher.stopped  # runner shut
    await asyncio.gather(running, return_exceptions=True)
