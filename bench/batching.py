"""Dynamic batching: images/s at batch sizes 1, 2, 4, 8 on the tiny model.

For each batch size, (a) the bare pipeline called with that many jobs at a
time, and (b) the whole system (one server, one worker with
``STEPCAST_BATCH_SIZE`` set to it) with every job submitted at once over a
WebSocket, the rate taken between the first and the last completion. 64×64,
20 steps, one image per job; each job its own prompt and seed.

    python -m bench.batching --jobs 64 --sizes 1 2 4 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench import stack
from gpu_worker.pipeline import DiffusersPipeline, Request
from gpu_worker.tiny_model import ensure
from stepcast.params import JobParams
from stepcast.settings import DATA_DIR

PARAMS = {"steps": 20, "width": 64, "height": 64}


def job_params(index: int) -> JobParams:
    return JobParams(
        prompt=f"fox {index}", negative_prompt=None, model="tiny", guidance_scale=7.5,
        seed=index, num_images=1, scheduler=None, **PARAMS,
    )  # fmt: skip


def bare(pipeline: DiffusersPipeline, size: int, jobs: int) -> float:
    calls = max(2, jobs // size)
    pipeline.generate([Request(job_params(i), lambda *_: None, lambda: False) for i in range(size)])
    started = time.perf_counter()
    for call in range(calls):
        requests = [Request(job_params(call * size + i), lambda *_: None, lambda: False) for i in range(size)]
        pipeline.generate(requests)
    return calls * size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    pipeline = DiffusersPipeline.load(ensure(DATA_DIR / "models" / "tiny"), name="tiny")
    rows: list[dict[str, Any]] = []
    with stack.services("batching") as (postgres, redis):
        for size in args.sizes:
            bare_rate = bare(pipeline, size, args.jobs)
            env = {"STEPCAST_BATCH_SIZE": str(size)}
            with stack.stepcast("batching", postgres, redis, workers=1, env=env) as running:
                stack.warm_up(running.http_url, 2, PARAMS)
                system = asyncio.run(stack.saturate(running.ws_url, args.jobs, PARAMS))
            rows.append({"batch_size": size, "bare_images_per_s": round(bare_rate, 2), "system": system})
            print(json.dumps(rows[-1]), flush=True)
    stack.write_result("batching", {"jobs": args.jobs, **PARAMS, "runs": rows})


if __name__ == "__main__":
    main()
