"""The Python client (async and sync) and the CLI built on it, against a real server."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stepcast.client import ApiError, AsyncClient, Client
from stepcast.settings import Settings
from tests.conftest import Stack, StepcastProcess


async def test_submit_watch_get_download_list(stack: Stack) -> None:
    async with AsyncClient(str(stack.client.base_url)) as client:
        job = await client.submit("a red fox", steps=4, seed=7)
        assert job.status == "pending" and job.params["seed"] == 7
        events = [event async for event in client.watch(job.id)]
        assert events[0].type == "snapshot" and events[-1].type == "completed" and events[-1].terminal
        after = events[0].data["job"]["last_seq"]
        assert [e.seq for e in events[1:]] == list(range(after + 1, after + len(events)))
        done = await client.get(job.id)
        assert done.finished and done.status == "completed" and done.images[0].seed == 7
        with Image.open(io.BytesIO(await client.download(done.images[0]))) as picture:
            assert picture.size == (64, 64)
        page = await client.list(status="completed")
        assert [j.id for j in page.jobs] == [job.id] and page.next_cursor is None
        with pytest.raises(ApiError) as refused:
            await client.submit("a red fox", steps=0)
        assert refused.value.status == 422 and refused.value.errors[0]["field"] == "steps"
        with pytest.raises(ApiError) as finished:
            await client.cancel(job.id)
        assert finished.value.status == 409


async def test_watch_resumes_across_a_server_restart(
    settings: Settings,
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    server = await spawn("server.app", settings)
    await run_worker(settings)
    async with AsyncClient(server.base_url) as client:
        job = await client.submit("a long night", steps=150, width=256, height=256)
        seqs: list[int] = []
        async for event in client.watch(job.id, after_seq=0):
            if event.seq is not None:
                seqs.append(event.seq)
            if event.type == "progress" and event.data["step"] == 5:
                server.kill()  # SIGKILL: no close frame, the socket just dies
                await asyncio.to_thread(server.start)
        done = await client.get(job.id)
    assert done.status == "completed"
    assert seqs == list(range(1, done.last_seq + 1))  # resumed with no gap and no duplicate


async def test_the_sync_client_blocks_until_done(stack: Stack) -> None:
    def use() -> tuple[str, bytes]:
        with Client(str(stack.client.base_url)) as client:
            job = client.submit("a red fox", steps=3, wait_s=30)
            steps = [e.data["step"] for e in client.watch(job.id, after_seq=0) if e.type == "progress"]
            assert steps == [1, 2, 3]  # the finished job's whole log, replayed
            done = client.wait(job.id)
            return done.status, client.download(done.images[0])

    status, png = await asyncio.to_thread(use)
    assert status == "completed" and png.startswith(b"\x89PNG")


def cli(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``stepcast …`` as a user runs it, against the test's server."""
    env = {**os.environ, "STEPCAST_URL": f"http://127.0.0.1:{settings.port}", "COLUMNS": "200"}
    command = [sys.executable, "-m", "stepcast.cli", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


async def test_the_cli_generates_lists_and_cancels(stack: Stack, tmp_path: Path) -> None:
    def stepcast(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(stack.settings, tmp_path, *args)

    run = await asyncio.to_thread(
        stepcast, "generate", "a red fox", "--steps", "5", "--seed", "11", "-o", "fox.png"
    )
    assert run.returncode == 0, run.stderr
    assert "fox.png (64x64, seed 11)" in run.stdout and "5/5" in run.stderr  # the progress bar got there
    with Image.open(tmp_path / "fox.png") as fox:
        assert fox.size == (64, 64)
    job_id = run.stderr.split("job ", 1)[1].split()[0]
    listed = await asyncio.to_thread(stepcast, "jobs", "--status", "completed")
    assert listed.returncode == 0 and job_id in listed.stdout and "a red fox" in listed.stdout
    refused = await asyncio.to_thread(stepcast, "cancel", job_id)
    assert refused.returncode == 1 and f"job {job_id} is already completed" in refused.stderr
    invalid = await asyncio.to_thread(stepcast, "generate", "p", "--steps", "0")
    assert invalid.returncode == 1 and "steps: steps must be between 1 and 150" in invalid.stderr
    # The worker is idle: it starts now. Then a backlog, and a start asked within 1 ms: refused.
    soon = await asyncio.to_thread(stepcast, "generate", "p", "--steps", "2", "--start-within", "60")
    assert soon.returncode == 0 and "starts at about" in soon.stderr, soon.stderr
    await asyncio.gather(*(stack.submit(steps=60) for _ in range(3)))
    late = await asyncio.to_thread(stepcast, "generate", "p", "--steps", "60", "--start-within", "0.001")
    assert late.returncode == 1 and "later than the 0.001 s asked; nothing was queued" in late.stderr, (
        late.stderr
    )


async def test_the_client_and_the_cli_list_the_models(stack: Stack, tmp_path: Path) -> None:
    def use() -> list[Any]:
        with Client(str(stack.client.base_url)) as client:
            return client.models()

    [tiny] = await asyncio.to_thread(use)
    assert (tiny.name, tiny.family, tiny.workers, tiny.default) == ("tiny", "sd1", 1, True)
    assert tiny.limits["size_px"]["default"] == 64 and tiny.pending == 0
    listed = await asyncio.to_thread(cli, stack.settings, tmp_path, "models")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["MODEL", "FAMILY", "WORKERS", "WAITING", "SIZE", "STEPS", "ETA"]
    assert row.split()[:7] == ["tiny", "*", "sd1", "1", "0", "64x64", "20"]
