"""Step previews: a small WebP of the noisy latents, made by its family's linear latent -> RGB
projection (:mod:`gpu_worker.families`).

The projection runs on the pipeline thread (torch stays there); resizing and encoding run here,
off it, without torch. A preview is a nicety: one that fails is left out, never a reason to stop
a job.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)


def preview_image(pixels: Any, max_px: int) -> Image.Image:
    """The preview picture of a family's pixels, at most ``max_px`` on its longer side (no torch)."""
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
