"""Cost of a step preview: the latent copy on the pipeline thread, then the
linear latent->RGB projection and WebP encoding off it.

    python -m bench.previews
"""

from __future__ import annotations

import statistics
import time

import torch

from bench import stack
from gpu_worker.runner import encode_preview

REPEATS = 200


def timed_ms(fn: object, repeats: int = REPEATS) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    results = []
    for image_px, max_px in ((64, 64), (512, 128), (512, 256), (1024, 256)):
        latents = torch.randn(4, image_px // 8, image_px // 8)
        copy_ms = timed_ms(lambda latents=latents: latents.detach().to("cpu", copy=True))
        encode_ms = timed_ms(lambda latents=latents, max_px=max_px: encode_preview(latents, max_px))
        size = len(encode_preview(latents, max_px))
        result = {
            "image_px": image_px,
            "preview_px": max_px,
            "pipeline_thread_copy_ms": round(copy_ms, 4),
            "projection_and_webp_ms": round(encode_ms, 3),
            "data_url_bytes": size,
        }
        results.append(result)
    stack.write_result("previews", results)


if __name__ == "__main__":
    main()
