"""The diffusers pipeline, loaded once per worker process and driven by one thread.

Pipelines are not thread-safe, so :class:`DiffusersPipeline` is only ever called
from the runner's single pipeline thread. ``generate`` reports every denoising
step through ``on_step`` and stops at the next step once ``should_stop`` says
so (``pipe._interrupt`` skips the remaining steps; raising from the callback
would not).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from stepcast.params import JobParams

logger = logging.getLogger(__name__)

# Wire name -> diffusers scheduler class; each runs exactly ``steps`` denoising steps.
SCHEDULER_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}

# Linear latent -> RGB projection for Stable Diffusion 1.x/2.x latents: a cheap
# preview of the noisy x_t, no VAE decode (factors as used by ComfyUI/A1111).
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)

StepCallback = Callable[[int, int, Any], None]  # (step 1..total, total, latents of image 0)


@dataclass
class Generation:
    images: list[Image.Image]
    interrupted: bool


class Pipeline(Protocol):
    name: str
    revision: str

    def generate(
        self, params: JobParams, on_step: StepCallback, should_stop: Callable[[], bool]
    ) -> Generation: ...


def directory_revision(path: Path) -> str:
    """Content hash of a model directory: names and bytes of every file."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class DiffusersPipeline:
    """Any local diffusers text-to-image directory, loaded with ``from_pretrained``."""

    def __init__(self, pipe: Any, name: str, revision: str) -> None:
        self.pipe = pipe
        self.name = name
        self.revision = revision
        self.device = pipe.device
        self._default_scheduler = pipe.scheduler
        self._schedulers: dict[str, Any] = {}

    @classmethod
    def load(
        cls, model_dir: Path, *, name: str, device: str = "cpu", dtype: str = "float32"
    ) -> DiffusersPipeline:
        import torch
        from diffusers import AutoPipelineForText2Image
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a diffusers model directory (no model_index.json)")
        pipe = AutoPipelineForText2Image.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        revision = directory_revision(model_dir)
        logger.info("model loaded", extra={"model": name, "revision": revision, "device": device})
        return cls(pipe, name, revision)

    def _scheduler(self, name: str | None) -> Any:
        if name is None:
            return self._default_scheduler
        if name not in self._schedulers:
            import diffusers

            scheduler_cls = getattr(diffusers, SCHEDULER_CLASSES[name])
            self._schedulers[name] = scheduler_cls.from_config(self._default_scheduler.config)
        return self._schedulers[name]

    def generate(
        self, params: JobParams, on_step: StepCallback, should_stop: Callable[[], bool]
    ) -> Generation:
        import torch

        total = params.steps
        # One seeded CPU generator per image: an image depends on its own seed
        # only, not on what it is batched with.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in params.image_seeds()]

        def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(index + 1, total, tensors["latents"][0])
            if should_stop():
                pipe._interrupt = True
            return {}

        self.pipe.scheduler = self._scheduler(params.scheduler)
        if should_stop():
            return Generation([], interrupted=True)
        with torch.inference_mode():
            output = self.pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                num_inference_steps=total,
                width=params.width,
                height=params.height,
                guidance_scale=params.guidance_scale,
                num_images_per_prompt=params.num_images,
                generator=generators,
                callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["latents"],
                output_type="pil",
            )
        interrupted = bool(getattr(self.pipe, "_interrupt", False))
        return Generation(list(output.images), interrupted=interrupted)


class SimulatedPipeline:
    """Benchmark-only backend: sleeps per step, reports steps like the real one, returns grey images."""

    def __init__(self, step_s: float, name: str) -> None:
        self.step_s = step_s
        self.name = name
        self.revision = "simulated"

    def generate(
        self, params: JobParams, on_step: StepCallback, should_stop: Callable[[], bool]
    ) -> Generation:
        for step in range(1, params.steps + 1):
            if self.step_s:
                time.sleep(self.step_s)
            on_step(step, params.steps, None)
            if should_stop():
                return Generation([], interrupted=True)
        size = (params.width, params.height)
        return Generation([Image.new("RGB", size, (128, 128, 128)) for _ in range(params.num_images)], False)


def preview_image(latents: Any, max_px: int) -> Image.Image:
    """A small RGB picture of noisy latents ``(4, h, w)`` via the linear projection."""
    import torch

    if latents.shape[0] != len(SD_LATENT_RGB):
        raise ValueError(f"no latent->RGB factors for {latents.shape[0]}-channel latents")
    factors = torch.tensor(SD_LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents.float().cpu(), factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    scale = max_px / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)
