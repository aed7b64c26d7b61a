"""Model families: which a loaded pipeline is, and how its noisy latents become a preview.

Each family's latents differ (4 or 16 channels, their own scale, Flux's packed 2x2 patches),
so each has its own linear latent -> RGB projection; a model whose latents fit none runs
without previews (its card says so). The factors are the ones ComfyUI and A1111 fit for
their previews (comfy/latent_formats.py): a least-squares fit of decoded colours on latents.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class LatentFormat:
    """A family's latents, and their projection to RGB in [-1, 1]: ``latents @ rgb + bias``."""

    channels: int
    rgb: tuple[RGB, ...]
    bias: RGB = (0.0, 0.0, 0.0)
    packed: bool = False  # Flux: a sequence of 2x2 patches, (h/2 * w/2, channels * 4)

    def pixels(self, latents: Any, width: int, height: int) -> Any:
        """RGB pixels ``(h, w, 3)`` uint8 (numpy) of one image's noisy latents.

        Called on the pipeline thread, on the latents' own device: torch run from any other
        thread starts a thread pool of its own there, whose threads then compete with the
        pipeline's for the cores (docs/performance.md).
        """
        import torch

        if self.packed:
            latents = unpack(latents, width, height, self.channels)
        if latents.shape[0] != self.channels:
            raise ValueError(f"{latents.shape[0]}-channel latents, not the {self.channels} of this family")
        rgb_factors, bias = _factors(self, latents.device)
        rgb = torch.einsum("chw,cr->hwr", latents.float(), rgb_factors) + bias
        return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def unpack(latents: Any, width: int, height: int, channels: int) -> Any:
    """Flux's packed latents ``(h/2 * w/2, channels * 4)`` as ``(channels, h, w)`` (h, w: the
    latent grid, 1/8 of the pixels, rounded down to an even number)."""
    rows, cols = 2 * (height // 16), 2 * (width // 16)
    if tuple(latents.shape) != ((rows // 2) * (cols // 2), channels * 4):
        raise ValueError(f"packed latents of shape {tuple(latents.shape)} do not fit {width}x{height}")
    patches = latents.view(rows // 2, cols // 2, channels, 2, 2)
    return patches.permute(2, 0, 3, 1, 4).reshape(channels, rows, cols)


@functools.cache
def _factors(latent_format: LatentFormat, device: Any) -> tuple[Any, Any]:
    """The projection's tensors, made once per device (not a host-to-device copy every step)."""
    import torch

    rgb = torch.tensor(latent_format.rgb, dtype=torch.float32, device=device)
    return rgb, torch.tensor(latent_format.bias, dtype=torch.float32, device=device)


_SD1 = LatentFormat(
    channels=4,
    rgb=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)
FORMATS: dict[str, LatentFormat] = {
    "sd1": _SD1,
    "sd2": _SD1,  # the same autoencoder as 1.x
    "sdxl": LatentFormat(
        channels=4,
        rgb=(
            (0.3651, 0.4232, 0.4341),
            (-0.2533, -0.0042, 0.1068),
            (0.1076, 0.1111, -0.0362),
            (-0.3165, -0.2492, -0.2188),
        ),
        bias=(0.1084, -0.0175, -0.0011),
    ),
    "sd3": LatentFormat(
        channels=16,
        rgb=(
            (-0.0922, -0.0175, 0.0749),
            (0.0311, 0.0633, 0.0954),
            (0.1994, 0.0927, 0.0458),
            (0.0856, 0.0339, 0.0902),
            (0.0587, 0.0272, -0.0496),
            (-0.0006, 0.1104, 0.0309),
            (0.0978, 0.0306, 0.0427),
            (-0.0042, 0.1038, 0.1358),
            (-0.0194, 0.0020, 0.0669),
            (-0.0488, 0.0130, -0.0268),
            (0.0922, 0.0988, 0.0951),
            (-0.0278, 0.0524, -0.0542),
            (0.0332, 0.0456, 0.0895),
            (-0.0069, -0.0030, -0.0810),
            (-0.0596, -0.0465, -0.0293),
            (-0.1448, -0.1463, -0.1189),
        ),
        bias=(0.2394, 0.2135, 0.1925),
    ),
    "flux": LatentFormat(
        channels=16,
        rgb=(
            (-0.0346, 0.0244, 0.0681),
            (0.0034, 0.0210, 0.0687),
            (0.0275, -0.0668, -0.0433),
            (-0.0174, 0.0160, 0.0617),
            (0.0859, 0.0721, 0.0329),
            (0.0004, 0.0383, 0.0115),
            (0.0405, 0.0861, 0.0915),
            (-0.0236, -0.0185, -0.0259),
            (-0.0245, 0.0250, 0.1180),
            (0.1008, 0.0755, -0.0421),
            (-0.0515, 0.0201, 0.0011),
            (0.0428, -0.0012, -0.0036),
            (0.0817, 0.0765, 0.0749),
            (-0.1264, -0.0522, -0.1103),
            (-0.0280, -0.0881, -0.0499),
            (-0.1262, -0.0982, -0.0778),
        ),
        bias=(-0.0329, -0.0718, -0.0851),
        packed=True,
    ),
}


def family_of(pipe: Any) -> str:
    """The family of a loaded diffusers pipeline, from its class and its config."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion"):
        # 2.x conditions on OpenCLIP's 1024-wide text states; 1.x on CLIP's 768 (the tiny
        # model's are narrower still: a 1.x shape).
        return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd1"
    return "other"


def latent_format(pipe: Any, family: str) -> LatentFormat | None:
    """The family's format, if the pipeline's autoencoder makes latents of its width."""
    known = FORMATS.get(family)
    vae = getattr(pipe, "vae", None)
    channels = getattr(getattr(vae, "config", None), "latent_channels", None)
    if known is None or channels != known.channels:
        logger.warning(
            "no previews: no latent -> RGB factors for %s latents of %s channels", family, channels
        )
        return None
    return known


def native_size_px(pipe: Any) -> int:
    """The size the model was trained at (its default): its denoiser's sample size in pixels."""
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        sample = denoiser.config.sample_size
    return int(sample) * int(pipe.vae_scale_factor)
