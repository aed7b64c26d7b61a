"""The embedded default model is a real diffusers directory."""

from __future__ import annotations

import json
from pathlib import Path

from gpu_worker.pipeline import DiffusersPipeline, Request, directory_revision
from gpu_worker.tiny_model import build, ensure
from stepcast.params import JobParams


def test_build_writes_a_from_pretrained_directory(tmp_path: Path) -> None:
    target = build(tmp_path / "tiny")
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder"):
        assert next((target / part).glob("*.safetensors")).stat().st_size > 0
    assert (target / "tokenizer" / "tokenizer.json").is_file()
    assert ensure(target) == target  # present: not rebuilt
    assert not list(tmp_path.glob(".tiny-*"))  # no staging left behind

    loaded = DiffusersPipeline.load(target, name="tiny")
    tokens = loaded.pipe.tokenizer("the red fox").input_ids
    assert (
        tokens[0] == loaded.pipe.tokenizer.bos_token_id and tokens[-1] == loaded.pipe.tokenizer.eos_token_id
    )
    assert loaded.pipe.vae_scale_factor == 8  # latents are 1/8 of the image, as in Stable Diffusion

    seen: list[int] = []
    params = JobParams(
        prompt="a red fox", negative_prompt=None, model="tiny", steps=4, width=64, height=64,
        guidance_scale=7.5, seed=3, num_images=1, scheduler=None,
    )  # fmt: skip
    [result] = loaded.generate(
        [Request(params, lambda step, total, latents, state: seen.append(step), lambda: False)]
    )
    assert seen == [1, 2, 3, 4] and not result.interrupted
    assert result.images[0].size == (64, 64)


def test_revision_hash_follows_the_content(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.json").write_text("{}")
    first = directory_revision(tmp_path / "m")
    assert directory_revision(tmp_path / "m") == first
    (tmp_path / "m" / "a.json").write_text('{"x": 1}')
    assert directory_revision(tmp_path / "m") != first


def test_stop_flag_interrupts_within_a_step(pipeline: DiffusersPipeline) -> None:
    seen: list[int] = []
    params = JobParams(
        prompt="p", negative_prompt=None, model="tiny", steps=50, width=64, height=64,
        guidance_scale=7.5, seed=1, num_images=1, scheduler=None,
    )  # fmt: skip
    [result] = pipeline.generate(
        [Request(params, lambda step, total, latents, state: seen.append(step), lambda: len(seen) >= 3)]
    )
    assert result.interrupted and seen == [1, 2, 3]
