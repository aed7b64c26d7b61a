"""Cost of a step preview: the linear latent->RGB projection on the pipeline
thread (torch stays there), then the resize and WebP encoding off it.

    python -m bench.previews
"""

from __future__ import annotations

import statistics
import time

import torch

from bench import stack
from gpu_worker.previews import encode_preview, preview_pixels

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
        pixels = preview_pixels(latents)
        projection_ms = timed_ms(lambda latents=latents: preview_pixels(latents))
        encode_ms = timed_ms(lambda pixels=pixels, max_px=max_px: encode_preview(pixels, max_px))
        result = {
            "image_px": image_px,
            "preview_px": max_px,
            "pipeline_thread_projection_ms": round(projection_ms, 4),
            "resize_and_webp_ms": round(encode_ms, 3),
            "data_url_bytes": len(encode_preview(pixels, max_px)),
        }
        results.append(result)
    stack.write_result("previews", results)


if __name__ == "__main__":
    main()
