"""Step previews: a small WebP of the noisy latents, made by a linear latent -> RGB projection.

The projection runs on the pipeline thread (torch stays there); resizing and encoding run off it,
without torch. A preview is a nicety: one that fails is left out, never a reason to stop a job.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
from collections.abc import Sequence
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

# Linear latent -> RGB projection for Stable Diffusion 1.x/2.x latents: a cheap
# preview of the noisy x_t, no VAE decode (factors as used by ComfyUI/A1111).
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


@functools.cache
def _latent_rgb(device: Any) -> Any:
    """The projection's factors, made once per device (not a host-to-device copy every step)."""
    import torch

    return torch.tensor(SD_LATENT_RGB, dtype=torch.float32, device=device)


def preview_pixels(latents: Any) -> Any:
    """RGB pixels ``(h, w, 3)`` uint8 (numpy) of noisy latents ``(4, h, w)``, by the linear projection.

    Called on the pipeline thread, on the latents' own device: torch run from any
    other thread starts a thread pool of its own there, whose threads then compete
    with the pipeline's for the cores (docs/performance.md).
    """
    import torch

    if latents.shape[0] != len(SD_LATENT_RGB):
        raise ValueError(f"no latent->RGB factors for {latents.shape[0]}-channel latents")
    rgb = torch.einsum("chw,cr->hwr", latents.float(), _latent_rgb(latents.device))
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def preview_image(pixels: Any, max_px: int) -> Image.Image:
    """The preview picture of :func:`preview_pixels`, at most ``max_px`` on its longer side (no torch)."""
    image = Image.fromarray(pixels)
    scale = max_px / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def encode_preview(pixels: Any, max_px: int) -> str:
    buffer = io.BytesIO()
    preview_image(pixels, max_px).save(buffer, format="WEBP", quality=60, method=0)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()


def encode_previews(pixels: Sequence[Any | None], max_px: int, job_id: str) -> list[str | None]:
    """The previews of the steps that carry pixels (None for the others, and for one that fails)."""
    previews: list[str | None] = []
    for step_pixels in pixels:
        preview = None
        if step_pixels is not None:
            try:
                preview = encode_preview(step_pixels, max_px)
            except Exception as exc:
                logger.warning("no preview: %s", exc, extra={"job_id": job_id})
        previews.append(preview)
    return previews
