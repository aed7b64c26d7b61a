"""The model as a user runs it without stepcast: ``from_pretrained``, then ``pipe(...)``.

A fresh process, the plain loop a user would write, on the main thread, with
whatever allocator the process has: the yardstick for the worker's
``pipeline_s``. The first call warms up (as the worker's warm-up jobs do) and
is not counted. Prints one JSON line: each call's seconds, and the minor page
faults and kernel CPU seconds of the process per call.

    python -m bench.bare .data/models/tiny --jobs 6 --steps 20 --size 64
    python -m bench.bare .data/models/sd15-random --size 512 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a diffusers model directory")
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(args.model, dtype=getattr(torch, args.dtype))  # type: ignore[no-untyped-call]
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)

    def call(index: int) -> Any:
        return pipe(
            prompt=f"fox {index}",
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(index),
        ).images[0]

    def synchronize() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    call(-1)
    seconds, faults, kernel_s = [], [], []
    for index in range(args.jobs):
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        call(index)
        synchronize()
        seconds.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        kernel_s.append(after.ru_stime - before.ru_stime)
    print(json.dumps({"seconds": seconds, "minor_faults": faults, "kernel_s": kernel_s}))


if __name__ == "__main__":
    main()
