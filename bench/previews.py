"""Cost of a step preview, per model family: the linear latent->RGB projection on
the pipeline thread (torch stays there; Flux's packed latents unpacked first),
then the resize and WebP encoding off it.

    python -m bench.previews
"""

from __future__ import annotations

import statistics
import time

import torch

from bench import stack
from gpu_worker.families import FORMATS, LatentFormat
from gpu_worker.previews import encode_preview

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
    cases = [("sd1", 64, 64), ("sd1", 512, 128), ("sd1", 512, 256), ("sdxl", 1024, 256)]
    cases += [("sd3", 1024, 256), ("flux", 1024, 256)]
    for family, image_px, max_px in cases:
        latent_format = FORMATS[family]
        side = image_px // 8
        if latent_format.packed:
            latents = torch.randn((side // 2) ** 2, latent_format.channels * 4)
        else:
            latents = torch.randn(latent_format.channels, side, side)

        def project(
            latents: torch.Tensor = latents,
            image_px: int = image_px,
            latent_format: LatentFormat = latent_format,
        ) -> object:
            return latent_format.pixels(latents, image_px, image_px)

        pixels = project()
        projection_ms = timed_ms(project)
        encode_ms = timed_ms(lambda pixels=pixels, max_px=max_px: encode_preview(pixels, max_px))
        result = {
            "family": family,
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
