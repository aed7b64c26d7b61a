"""A tiny preview decoder, when one is configured: TAESD (diffusers' ``AutoencoderTiny``), the
decoder ComfyUI and A1111 use for previews, a truer picture than the linear projection.

On CUDA it decodes on a thread and a stream of its own, so the pipeline's next step does not
wait for it: the pipeline thread only copies the step's latents and marks when the copy is
ready. On a CPU there is nothing idle to run it on (a second torch thread would only take cores
from the pipeline, docs/performance.md), so it decodes on the pipeline thread. Its cost, both
ways: ``python -m bench.previews``.
"""

from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path
from typing import Any

from gpu_worker.families import LatentFormat, unpack

logger = logging.getLogger(__name__)


class TinyDecoder:
    def __init__(self, vae: Any, latent_format: LatentFormat) -> None:
        import torch

        self.vae = vae
        self.latent_format = latent_format
        self.device = vae.device
        self.dtype = vae.dtype
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None  # type: ignore[no-untyped-call]
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "preview-decoder") if self._cuda else None

    @classmethod
    def load(cls, path: Path, latent_format: LatentFormat, *, device: Any, dtype: Any) -> TinyDecoder:
        """An ``AutoencoderTiny`` directory, for latents of this format (its channels must match)."""
        from diffusers import AutoencoderTiny

        vae = AutoencoderTiny.from_pretrained(path, torch_dtype=dtype, local_files_only=True)  # type: ignore[no-untyped-call]
        vae = vae.to(device)
        if vae.config.latent_channels != latent_format.channels:
            raise ValueError(
                f"preview decoder {path} decodes {vae.config.latent_channels}-channel latents; "
                f"the model makes {latent_format.channels}"
            )
        logger.info("previews decoded by %s", path)
        return cls(vae, latent_format)

    def submit(self, latents: Any, width: int, height: int, max_px: int) -> concurrent.futures.Future[Any]:
        """On the pipeline thread: the pixels of one image's latents, soon (CUDA) or now (CPU),
        decoded at the preview's size: the latents are shrunk to it first (an area average), as
        the preview would be anyway, which costs the decoder (width × height / max_px²) less."""
        import torch

        if self.latent_format.packed:
            latents = unpack(latents, width, height, self.latent_format.channels)
        scale = max_px / max(width, height)
        if scale < 1:
            rows, cols = latents.shape[-2:]
            size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
            latents = torch.nn.functional.interpolate(latents[None], size=size, mode="area")[0]
        if self._thread is None:
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            done.set_result(self._decode(latents))
            return done
        copy = latents.detach().clone()  # the next step overwrites the pipeline's own (if not shrunk)
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record()
        return self._thread.submit(self._decode_aside, copy, ready)

    def _decode_aside(self, latents: Any, ready: Any) -> Any:
        import torch

        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            return self._decode(latents)

    def _decode(self, latents: Any) -> Any:
        import torch

        config = self.vae.config
        with torch.inference_mode():
            # As a pipeline hands its VAE the latents: SD3's and Flux's decoders (taesd3, taef1)
            # carry a scale and a shift; SD 1.x's and SDXL's are 1 and none.
            latents = latents / (config.scaling_factor or 1.0) + (
                getattr(config, "shift_factor", None) or 0.0
            )
            image = self.vae.decode(latents[None].to(self.dtype)).sample[0]  # (3, h, w) in [-1, 1]
            rgb = image.float().permute(1, 2, 0)
            return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
