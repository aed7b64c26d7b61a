"""How a worker process runs its model: on the main thread (gpu_worker.main_thread), with
glibc's allocator reusing freed memory (gpu_worker.allocator), torch on no other thread."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gpu_worker.main_thread import MainThreadExecutor
from gpu_worker.previews import encode_preview
from stepcast.settings import Settings
from tests.conftest import StepcastProcess
from tests.test_recovery import wait_for

Spawn = Callable[[str, Settings], Awaitable[StepcastProcess]]


def test_calls_run_on_the_serving_thread_until_shutdown() -> None:
    executor = MainThreadExecutor()
    results: list[Any] = []

    def client() -> None:
        results.append(executor.submit(threading.get_ident).result())
        failing = executor.submit(int, "not a number")
        results.append(type(failing.exception()))
        pending = [executor.submit(lambda n=n: n * n) for n in range(3)]
        executor.shutdown(wait=True)  # the calls already submitted still run
        results.append([future.result() for future in pending])
        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(int, "1")

    caller = threading.Thread(target=client)
    caller.start()
    executor.serve()  # returns once the client has shut it down
    caller.join()
    assert results == [threading.get_ident(), ValueError, [0, 1, 4]]


def _cpu_ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def test_a_worker_process_denoises_on_its_main_thread(
    settings: Settings, serve: Callable[[Settings], Awaitable[str]], spawn: Spawn
) -> None:
    async with httpx.AsyncClient(base_url=await serve(settings), timeout=10) as client:
        worker = await spawn("gpu_worker.worker", settings)
        assert worker.process is not None
        pid = worker.process.pid
        warm = (await client.post("/v1/jobs", json={"prompt": "warm", "steps": 2})).json()["id"]
        await wait_for(client, warm, lambda job: job["status"] == "completed")
        process, main = Path(f"/proc/{pid}/stat"), Path(f"/proc/{pid}/task/{pid}/stat")
        before = _cpu_ticks(process), _cpu_ticks(main)
        body = {"prompt": "on the main thread", "steps": 30, "width": 192, "height": 192}
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        await wait_for(client, job_id, lambda job: job["status"] == "completed")
        process_ticks, main_ticks = (_cpu_ticks(process) - before[0], _cpu_ticks(main) - before[1])
    # The main thread does the pipeline's Python and its share of the kernels (the
    # rest is torch's pool threads, a little the event loop's). With the pipeline on
    # another thread the main thread would only run the event loop: a few percent.
    assert process_ticks > 0.2 * os.sysconf("SC_CLK_TCK")
    assert main_ticks / process_ticks > 0.35, (main_ticks, process_ticks)


def test_encoding_a_preview_needs_no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop's side of a preview: torch called off the pipeline thread would start a
    second thread pool competing with the pipeline's (the pixels are made on its thread)."""
    real_import = builtins.__import__

    def no_torch(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "torch" or name.startswith("torch."):
            raise AssertionError("torch imported while encoding a preview")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    pixels = np.zeros((24, 32, 3), dtype=np.uint8)
    assert encode_preview(pixels, 16).startswith("data:image/webp;base64,")


ALLOCATE = """
import ctypes, resource, sys
from gpu_worker import allocator
if sys.argv[1] == "tuned":
    assert allocator.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20  # a scratch buffer as a CPU kernel takes one, filled, freed, ten times
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", ALLOCATE, mode], capture_output=True, text=True, check=True
        )
        return int(done.stdout)

    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults("default") > 8 * pages  # a fresh mmap every time: every page faulted in again
    assert faults("tuned") < 2 * pages  # once, then the same pages
