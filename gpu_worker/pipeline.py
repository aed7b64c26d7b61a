"""The diffusers pipeline, loaded once per worker process and driven by one thread.

:class:`DiffusersPipeline` is only ever called from the pipeline thread (pipelines are not
thread-safe); ``generate`` reports every step through ``on_step``, stops at the next step once
``should_stop`` says so, and continues a job from its checkpoint (``resume``) without
computing its done steps. :class:`SimulatedPipeline` sleeps instead, for benchmarks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from gpu_worker import checkpoints, families
from gpu_worker.checkpoints import Snapshot
from gpu_worker.preview_decoder import TinyDecoder
from stepcast.models import SCHEDULERS
from stepcast.params import JobParams

logger = logging.getLogger(__name__)

# (step 1..total, total, latents of the job's first image, its state now): on the pipeline
# thread, every step of every job of the call, stopped or not (the callback decides).
StepCallback = Callable[[int, int, Any, Callable[[], Snapshot]], None]


@dataclass(frozen=True)
class Request:
    """One job's part of a pipeline call; a batch is several compatible ones."""

    params: JobParams
    on_step: StepCallback
    should_stop: Callable[[], bool]
    resume: Snapshot | None = None  # continue from here (a job alone)


@dataclass
class Generation:
    images: list[Image.Image]
    interrupted: bool


class Pipeline(Protocol):
    name: str
    revision: str
    family: str  # stepcast.models.FAMILIES
    native_size_px: int  # its default size
    dtype: str
    previews: str | None  # how previews are made ("latent"), None: it makes none
    resumable: bool  # a job may continue from a checkpoint (its denoiser can skip the steps done)

    def preview_pixels(self, latents: Any, width: int, height: int, max_px: int) -> Any:
        """On the pipeline thread: RGB pixels (h, w, 3) uint8 of one image's noisy latents for
        a preview of at most ``max_px``, or a concurrent Future of them (a preview decoder
        working beside the pipeline)."""
        ...

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Run compatible requests (same size, steps, scheduler, guidance) as one batch.

        Each request gets its own step reports and images; the call stops at the
        next step once every request's ``should_stop`` says so.
        """
        ...


def directory_revision(path: Path) -> str:
    """Content hash of a model directory: names and bytes of every file."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _all_stopped(requests: Sequence[Request]) -> bool:
    return all(request.should_stop() for request in requests)


class DiffusersPipeline:
    """Any local diffusers text-to-image directory, loaded with ``from_pretrained``."""

    def __init__(self, pipe: Any, name: str, revision: str, *, preview_decoder: Path | None = None) -> None:
        self.pipe = pipe
        self.name = name
        self.revision = revision
        self.device = pipe.device
        self.dtype = str(pipe.dtype).removeprefix("torch.")
        self.family = families.family_of(pipe)
        self.native_size_px = families.native_size_px(pipe)
        self._latents = families.latent_format(pipe, self.family)
        self.previews = "latent" if self._latents is not None else None
        # Resuming skips a UNet's steps (checkpoints.SkippedSteps); SD3's and Flux's
        # transformers run every attempt from the start.
        self.resumable = getattr(pipe, "unet", None) is not None
        self._decoder: TinyDecoder | None = None
        if preview_decoder is not None and self._latents is not None:
            self._decoder = TinyDecoder.load(
                preview_decoder, self._latents, device=pipe.device, dtype=pipe.dtype
            )
            self.previews = "taesd"
        self._default_scheduler = pipe.scheduler
        self._schedulers: dict[str, Any] = {}

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        name: str,
        device: str = "cpu",
        dtype: str = "float32",
        channels_last: bool = False,
        compile_unet: bool = False,
        revision: str | None = None,
        preview_decoder: Path | None = None,
    ) -> DiffusersPipeline:
        """Load a model directory; the options are the usual GPU speed-ups.

        ``revision`` is what the jobs' provenance records; by default a content
        hash of the directory (a Hugging Face snapshot passes its id and commit).
        ``preview_decoder``: an ``AutoencoderTiny`` (TAESD) directory for previews.

        Attention always runs through PyTorch's fused scaled-dot-product kernel
        (flash / memory-efficient on CUDA). ``channels_last`` suits the UNet's
        convolutions on tensor cores; ``compile_unet`` trades a slow first
        job (minutes) for faster steps afterwards.
        """
        import torch
        from diffusers import AutoPipelineForText2Image
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a diffusers model directory (no model_index.json)")
        pipe = AutoPipelineForText2Image.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        for module in (pipe.unet, pipe.vae):
            module.set_attn_processor(AttnProcessor2_0())
            if channels_last:
                module.to(memory_format=torch.channels_last)
        if compile_unet:
            pipe.unet = torch.compile(pipe.unet)
        if revision is None:
            revision = directory_revision(model_dir)
        logger.info(
            "model loaded", extra={"model": name, "revision": revision, "device": device, "dtype": dtype}
        )
        return cls(pipe, name, revision, preview_decoder=preview_decoder)

    def preview_pixels(self, latents: Any, width: int, height: int, max_px: int) -> Any:
        if self._decoder is not None:
            return self._decoder.submit(latents, width, height, max_px)
        if self._latents is None:
            raise ValueError(f"no previews for {self.family} latents")
        return self._latents.pixels(latents, width, height)

    def _scheduler(self, name: str | None) -> Any:
        if name is None:
            return self._default_scheduler
        if name not in self._schedulers:
            import diffusers

            scheduler_cls = getattr(diffusers, SCHEDULERS[name])
            self._schedulers[name] = scheduler_cls.from_config(self._default_scheduler.config)
        return self._schedulers[name]

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        import torch

        first = requests[0].params
        total = first.steps
        # One row per image. One seeded CPU generator per image: an image
        # depends on its own seed only, not on what it is batched with.
        prompts = [r.params.prompt for r in requests for _ in range(r.params.num_images)]
        negatives = [r.params.negative_prompt or "" for r in requests for _ in range(r.params.num_images)]
        generators = [torch.Generator("cpu").manual_seed(s) for r in requests for s in r.params.image_seeds()]
        rows = [0]
        for request in requests:
            rows.append(rows[-1] + request.params.num_images)

        # A resumed job runs alone: its loop goes through the steps its checkpoint holds with
        # the UNet skipped, and at the checkpoint's step takes the state it had then.
        resume = requests[0].resume if len(requests) == 1 else None
        skipped = checkpoints.SkippedSteps(self.pipe.unet) if resume is not None else None

        def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            latents, step, changed = tensors["latents"], index + 1, {}
            if resume is not None and step <= resume.step:
                if step == resume.step:
                    assert skipped is not None
                    skipped.stop()
                    changed["latents"] = checkpoints.restore(
                        resume, pipe.scheduler, generators, latents.device, latents.dtype
                    )
            else:
                for request, start, end in zip(requests, rows, rows[1:], strict=False):
                    state = functools.partial(
                        checkpoints.take, step, latents, pipe.scheduler, generators, slice(start, end)
                    )
                    request.on_step(step, total, latents[start], state)
            if _all_stopped(requests):
                pipe._interrupt = True
            return changed

        self.pipe.scheduler = self._scheduler(first.scheduler)
        if _all_stopped(requests):
            return [Generation([], interrupted=True) for _ in requests]
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            if skipped is not None:
                stack.enter_context(skipped)
            output = self.pipe(
                prompt=prompts,
                negative_prompt=negatives if any(negatives) else None,
                num_inference_steps=total,
                width=first.width,
                height=first.height,
                guidance_scale=first.guidance_scale,
                generator=generators,
                callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["latents"],
                output_type="pil",
            )
        interrupted = bool(getattr(self.pipe, "_interrupt", False))
        images = list(output.images)
        return [Generation(images[start:end], interrupted) for start, end in itertools.pairwise(rows)]


class SimulatedPipeline:
    """Benchmark-only backend: sleeps per step, reports steps like the real one, returns grey images."""

    family = "other"
    native_size_px = 64
    dtype = "float32"
    previews: str | None = None
    resumable = True

    def __init__(self, step_s: float, name: str) -> None:
        self.step_s = step_s
        self.name = name
        self.revision = "simulated"

    def preview_pixels(self, latents: Any, width: int, height: int, max_px: int) -> Any:
        raise ValueError("the simulated pipeline has no latents")

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        total = requests[0].params.steps
        resume = requests[0].resume if len(requests) == 1 else None
        for step in range((resume.step if resume else 0) + 1, total + 1):
            if self.step_s:
                time.sleep(self.step_s)
            state = functools.partial(Snapshot, step, None, {}, [])
            for request in requests:
                request.on_step(step, total, None, state)
            if _all_stopped(requests):
                return [Generation([], interrupted=True) for _ in requests]
        return [
            Generation(
                [Image.new("RGB", (r.params.width, r.params.height), (128, 128, 128))] * r.params.num_images,
                interrupted=False,
            )
            for r in requests
        ]
