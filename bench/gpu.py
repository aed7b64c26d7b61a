"""GPU throughput at Stable Diffusion 1.5's full size: bare diffusers vs the worker.

Builds (once) a random-weight pipeline with SD 1.5's UNet, VAE and CLIP text
encoder configurations (``gpu_worker.tiny_model --shape sd15``: the real
model's FLOPs and memory, no download), then reports images/s

- for bare diffusers (the worker's own ``DiffusersPipeline``, called in a loop),
  at batch 1 and at ``--batch``;
- through the whole system (Postgres, Redis, one server, one worker process on
  the GPU), every job submitted at once, with ``STEPCAST_BATCH_SIZE`` 1 and
  ``--batch``: the worker's throughput and the batching speed-up;
- side by side, one job at a time, alternating (``bench.overhead``'s): the
  worker's ``timings.pipeline_s`` against the plain loop a user writes
  (``from_pretrained`` + ``pipe(...)`` in a fresh process, ``bench.bare``),
  for a fresh worker and again after it has served large jobs;
- checkpoints, per scheduler: what taking one (``state()``) costs the
  pipeline thread, its encoded size, and the largest pixel difference between
  an uninterrupted run and runs resumed from its checkpoints at several steps.

Meant for a CUDA machine (fp16, SDPA attention, channels-last; ``--compile``
adds torch.compile). ``--device cpu --dtype float32 --size 256 --steps 2``
checks the script itself on a CPU.

    python -m bench.gpu --size 512 --steps 20 --batch 4 --jobs 32
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import overhead, stack
from gpu_worker import checkpoints
from gpu_worker.checkpoints import Snapshot
from gpu_worker.pipeline import DiffusersPipeline, Generation, Request
from gpu_worker.tiny_model import build
from stepcast.models import SCHEDULERS
from stepcast.params import JobParams
from stepcast.settings import DATA_DIR

MODEL_DIR = DATA_DIR / "models" / "sd15-random"


def bare(pipeline: DiffusersPipeline, params: dict[str, Any], batch: int, jobs: int) -> float:
    def call(first: int) -> None:
        pipeline.generate([
            Request(
                JobParams(prompt=f"fox {first + i}", negative_prompt=None, model="sd15-random",
                          guidance_scale=7.5, seed=first + i, num_images=1, scheduler=None, **params),
                lambda *_: None,
                lambda: False,
            )
            for i in range(batch)
        ])  # fmt: skip

    call(0)  # warm-up (and compilation, with --compile)
    calls = max(2, jobs // batch)
    started = time.perf_counter()
    for index in range(calls):
        call(index * batch)
    return calls * batch / (time.perf_counter() - started)


def checkpointed(
    pipeline: DiffusersPipeline, job: JobParams, at: set[int]
) -> tuple[Generation, dict[int, bytes], list[float]]:
    """One uninterrupted run; its checkpoints at the steps ``at``, and what each ``state()`` took."""
    import torch

    blobs: dict[int, bytes] = {}
    seconds: list[float] = []

    def on_step(step: int, total: int, latents: Any, state: Callable[[], Snapshot]) -> None:
        if step in at:
            if latents.is_cuda:
                torch.cuda.synchronize()  # the step's own kernels are not the checkpoint's cost
            started = time.perf_counter()
            snapshot = state()
            seconds.append(time.perf_counter() - started)
            blobs[step] = checkpoints.encode(snapshot)

    [whole] = pipeline.generate([Request(job, on_step, lambda: False)])
    return whole, blobs, seconds


def resumes(pipeline: DiffusersPipeline, params: dict[str, Any]) -> dict[str, Any]:
    """Per scheduler: ``state()``'s ms (p50), the bytes of a checkpoint, and the largest pixel
    difference (0-255) from the uninterrupted run of a run resumed at step k, for several k."""
    at = {max(1, params["steps"] * quarter // 4) for quarter in (1, 2, 3)} - {params["steps"]}
    figures: dict[str, Any] = {}
    for scheduler in SCHEDULERS:
        job = JobParams(prompt="fox", negative_prompt=None, model="sd15-random", guidance_scale=7.5,
                        seed=1, num_images=1, scheduler=scheduler, **params)  # fmt: skip
        whole, blobs, seconds = checkpointed(pipeline, job, at)
        differences = {}
        for step, blob in sorted(blobs.items()):
            resume = Request(job, lambda *_: None, lambda: False, checkpoints.decode(blob))
            [resumed] = pipeline.generate([resume])
            pixels = [np.asarray(run.images[0], dtype=np.int16) for run in (whole, resumed)]
            differences[step] = int(np.abs(pixels[0] - pixels[1]).max())
        figures[scheduler] = {
            "state_ms": round(statistics.median(seconds) * 1000, 3),
            "bytes": max(len(blob) for blob in blobs.values()),
            "max_pixel_difference_by_step": differences,
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    args = parser.parse_args()
    if not (MODEL_DIR / "model_index.json").is_file():
        print(f"building the random-weight SD 1.5 pipeline in {MODEL_DIR} (once)", flush=True)
        build(MODEL_DIR, shape="sd15")
    params = {"steps": args.steps, "width": args.size, "height": args.size}
    options = {"device": args.device, "dtype": args.dtype, "channels_last": args.channels_last}
    pipeline = DiffusersPipeline.load(MODEL_DIR, name="sd15-random", **options, compile_unet=args.compile)
    bare_rates = {size: round(bare(pipeline, params, size, args.jobs), 3) for size in sorted({1, args.batch})}
    print({"bare_images_per_s": bare_rates}, flush=True)
    checkpoint_figures = resumes(pipeline, params)
    print({"checkpoints": checkpoint_figures}, flush=True)
    del pipeline
    gc.collect()
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()

    env = {
        "STEPCAST_MODEL_NAME": "sd15-random",
        "STEPCAST_MODEL_DIR": str(MODEL_DIR),
        "STEPCAST_DEVICE": args.device,
        "STEPCAST_DTYPE": args.dtype,
        "STEPCAST_CHANNELS_LAST": str(args.channels_last).lower(),
        "STEPCAST_TORCH_COMPILE": str(args.compile).lower(),
        "STEPCAST_DEFAULT_SIZE_PX": str(args.size),
        "STEPCAST_MAX_SIZE_PX": str(max(1024, args.size)),
        "STEPCAST_JOB_TIMEOUT_S": "3600",
    }
    worker_rates: dict[int, Any] = {}
    against_bare: dict[str, Any] = {}
    bare_options = ("--device", args.device, "--dtype", args.dtype)
    with stack.services("gpu") as (postgres, redis):
        for size in sorted({1, args.batch}):
            batch_env = {**env, "STEPCAST_BATCH_SIZE": str(size)}
            with stack.stepcast("gpu", postgres, redis, workers=1, env=batch_env) as running:
                stack.warm_up(running.http_url, 1, params, timeout_s=1800)
                worker_rates[size] = asyncio.run(stack.saturate(running.ws_url, args.jobs, params))
                if size == 1:
                    for phase in ("fresh", "after_large_jobs"):
                        if phase != "fresh":
                            overhead.large_jobs(running.http_url, overhead.LARGE_JOBS["tiny"])
                        against_bare[phase] = asyncio.run(
                            overhead.side_by_side(MODEL_DIR, running, 18, phase, params, bare_options)
                        )
            print({"batch_size": size, "worker": worker_rates[size]}, flush=True)
    result = {
        **vars(args),
        "bare_images_per_s": bare_rates,
        "worker": worker_rates,
        "worker_vs_bare": {
            size: round(worker_rates[size]["images_per_s"] / bare_rates[size], 3) for size in worker_rates
        },
        "pipeline_s_vs_plain_loop": {phase: figures["ratio"] for phase, figures in against_bare.items()},
        "side_by_side": against_bare,
        "checkpoints": checkpoint_figures,
        "batching_speedup": {
            "bare": round(bare_rates[args.batch] / bare_rates[1], 2),
            "worker": round(worker_rates[args.batch]["images_per_s"] / worker_rates[1]["images_per_s"], 2),
        },
    }
    stack.write_result("gpu", result)


if __name__ == "__main__":
    main()
