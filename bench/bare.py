"""The model as a user runs it without stepcast: ``from_pretrained``, then ``pipe(...)``.

A fresh process, the plain loop a user would write, on the main thread, with
whatever allocator the process has: the yardstick for the worker's
``pipeline_s``. The first call warms up (as the worker's warm-up jobs do) and
is not counted. Prints one JSON line per call: its seconds, and the minor page
faults and kernel CPU seconds the process took during it.

With ``--serve`` the process makes one call per line it reads on stdin (the
line is the call's index: its prompt and seed), after a first line
``{"ready": true}``, so that a benchmark can alternate it job by job with the
worker while each sits idle in turn (:mod:`bench.overhead`).

    python -m bench.bare .data/models/tiny --jobs 6 --steps 20 --size 64
    python -m bench.bare .data/models/sd15-random --size 512 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a diffusers model directory")
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--serve", action="store_true", help="one call per index read on stdin")
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

    def timed(index: int) -> None:
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        call(index)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        figures = {
            "seconds": seconds,
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "kernel_s": after.ru_stime - before.ru_stime,
        }
        print(json.dumps(figures), flush=True)

    call(-1)
    if not args.serve:
        for index in range(args.jobs):
            timed(index)
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        timed(int(line))


if __name__ == "__main__":
    main()
