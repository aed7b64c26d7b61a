"""Cost of a step preview, per model family: the linear latent->RGB projection on
the pipeline thread (torch stays there; Flux's packed latents unpacked first),
then the resize and WebP encoding off it; and a tiny preview decoder (TAESD's
own shape, random weights: its cost is its shape's) on this machine's CPU, where
it decodes on the pipeline thread.

    python -m bench.previews
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import stack
from gpu_worker.families import FORMATS, LatentFormat
from gpu_worker.preview_decoder import TinyDecoder
from gpu_worker.previews import encode_preview
from gpu_worker.tiny_model import build_preview_decoder

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
            return latent_format.pixels(latents, image_px, image_px)  # (the latent grid's size)

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
    results += decoder_costs()
    stack.write_result("previews", results)


def decoder_costs() -> list[dict[str, object]]:
    """TAESD per preview: the pipeline thread's wait (on a CPU the whole decode), the pixels'
    encoding, and the bytes, at the sizes a job asks for."""
    with tempfile.TemporaryDirectory() as scratch:
        path = build_preview_decoder(Path(scratch) / "taesd", shape="full")
        decoder = TinyDecoder.load(path, FORMATS["sd1"], device=torch.device("cpu"), dtype=torch.float32)
    figures: list[dict[str, object]] = []
    for image_px, max_px, repeats in ((64, 64, 50), (512, 128, 10), (512, 256, 10), (1024, 256, 5)):
        latents = torch.randn(4, image_px // 8, image_px // 8)
        pixels = decoder.submit(latents, image_px, image_px, max_px).result()
        wait_ms = timed_ms(
            lambda latents=latents, px=image_px, most=max_px: decoder.submit(latents, px, px, most), repeats
        )
        encode_ms = timed_ms(lambda pixels=pixels, max_px=max_px: encode_preview(pixels, max_px), repeats)
        figures.append(
            {
                "family": "sd1",
                "decoder": "taesd",
                "device": "cpu",
                "image_px": image_px,
                "preview_px": max_px,
                "pipeline_thread_decode_ms": round(wait_ms, 2),
                "resize_and_webp_ms": round(encode_ms, 3),
                "data_url_bytes": len(encode_preview(pixels, max_px)),
            }
        )
    return figures


if __name__ == "__main__":
    main()
