"""Each model family's previews: its latents' width, its projection, Flux's packing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import FluxPipeline

from gpu_worker import families
from gpu_worker.families import FORMATS, latent_format, unpack
from gpu_worker.pipeline import DiffusersPipeline


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_each_family_projects_its_own_latents_to_pixels(family: str) -> None:
    known = FORMATS[family]
    # A 64x64 image: 8x8 latents (Flux: in 2x2 patches, a sequence of 16).
    shape = (4 * 4, known.channels * 4) if known.packed else (known.channels, 8, 8)
    latents = torch.randn(*shape)
    pixels = known.pixels(latents, 64, 64)
    assert pixels.shape == (8, 8, 3) and str(pixels.dtype) == "uint8"
    assert pixels.std() > 0  # not one flat colour
    wrong = torch.randn(known.channels + 1, 8, 8)
    with pytest.raises(ValueError):
        known.pixels(wrong, 64, 64)


def test_flux_latents_are_unpacked_as_the_pipeline_packs_them() -> None:
    grid = torch.randn(1, 16, 16, 12)  # 16 channels of a 128x96 image's 16x12 latents
    packed = FluxPipeline._pack_latents(grid, 1, 16, 16, 12)
    assert torch.equal(unpack(packed[0], 96, 128, 16), grid[0])
    # And the projection of packed latents is that of the grid they pack.
    flux = FORMATS["flux"]
    projected = torch.einsum("chw,cr->hwr", grid[0], torch.tensor(flux.rgb)) + torch.tensor(flux.bias)
    expected = ((projected + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    assert (flux.pixels(packed[0], 96, 128) == expected).all()


def test_latents_that_fit_no_family_get_no_previews() -> None:
    def pipe(channels: int) -> Any:
        return SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(latent_channels=channels)))

    assert latent_format(pipe(4), "sdxl") is FORMATS["sdxl"]
    assert latent_format(pipe(16), "sdxl") is None  # a 16-channel autoencoder behind SDXL's class
    assert latent_format(pipe(4), "other") is None  # an unknown family


def test_a_pipelines_family_comes_from_its_class_and_config() -> None:
    def named(name: str, cross_attention: int = 768) -> Any:
        unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=cross_attention))
        return type(name, (), {"unet": unet})()

    assert families.family_of(named("StableDiffusionPipeline")) == "sd1"
    assert families.family_of(named("StableDiffusionPipeline", 1024)) == "sd2"
    assert families.family_of(named("StableDiffusionXLPipeline")) == "sdxl"
    assert families.family_of(named("StableDiffusion3Pipeline")) == "sd3"
    assert families.family_of(named("FluxPipeline")) == "flux"
    assert families.family_of(named("KandinskyPipeline")) == "other"


def test_a_transformer_model_is_described_and_previewed_but_not_resumed() -> None:
    """A Flux pipeline as the worker sees one (no weights needed): its family, native size and
    previews from its config; no UNet, so no attempt resumes from a checkpoint."""
    config = SimpleNamespace(latent_channels=16)
    flux_class = type("FluxPipeline", (), {})
    pipe = flux_class()
    for name, value in {
        "vae": SimpleNamespace(config=config), "transformer": object(), "default_sample_size": 128,
        "vae_scale_factor": 8, "device": torch.device("cpu"), "dtype": torch.bfloat16, "scheduler": object(),
    }.items():  # fmt: skip
        setattr(pipe, name, value)
    pipeline = DiffusersPipeline(pipe, "flux-dev", "r1")
    assert (pipeline.family, pipeline.native_size_px, pipeline.dtype) == ("flux", 1024, "bfloat16")
    assert pipeline.previews == "latent" and not pipeline.resumable
    packed = torch.randn((64 // 16) ** 2, 16 * 4)
    assert pipeline.preview_pixels(packed, 64, 64, 64).shape == (8, 8, 3)
