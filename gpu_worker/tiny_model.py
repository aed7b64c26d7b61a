"""Build the embedded default model: a tiny Stable Diffusion pipeline with random weights.

The component classes of Stable Diffusion 1.x at a size that runs 64x64 in well under a second on
a CPU, saved with ``save_pretrained`` and loaded like any model directory. ``--shape tiny-xl``
builds the same for SDXL (two text encoders, the added size and crop conditioning), the second
family the tests serve; ``--shape sd15`` builds SD 1.5's full size (random weights) for GPU
benchmarks (``bench.gpu``).

    python -m gpu_worker.tiny_model .data/models/tiny
    python -m gpu_worker.tiny_model --shape tiny-xl .data/models/tiny-xl
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Frequent English letter pairs, merged in this order, so common words cost a
# few tokens instead of one per letter. Written here by hand: no vocabulary is
# downloaded.
_MERGES = (
    "t h",
    "i n",
    "e r",
    "a n",
    "o n",
    "r e",
    "th e</w>",
    "a t",
    "e n",
    "o r",
    "e d</w>",
    "a l",
    "i t",
    "o u",
    "a r",
    "i s</w>",
    "in g</w>",
    "l e",
    "o f</w>",
    "s t",
    "r o",
    "c h",
    "l o",
    "f o",
    "w h",
    "an d</w>",
    "e s</w>",
    "e r</w>",
    "o n</w>",
    "a l</w>",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(pair.split()) for pair in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, [(left, right) for left, right in (pair.split() for pair in _MERGES)]


# Component sizes: the tiny default, and Stable Diffusion 1.5's own configuration.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "unet": {
            "sample_size": 8,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
        "vae": {
            "block_out_channels": (8, 8, 16, 16),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 64,
        },
    },
    "sd15": {
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "vocab_size": 49408,  # CLIP's embedding table, though this tokenizer uses few of its rows
        },
        "unet": {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "sample_size": 512,
        },
    },
}


# SDXL's tiny shape: two text encoders whose states are joined (the UNet attends to both), the
# second's pooled projection and six size/crop numbers as the added conditioning; a native size
# of 128 px (its UNet's 16x16 latents), where SDXL's is 1024.
XL = {
    "text": SHAPES["tiny"]["text"],
    "unet": {
        **SHAPES["tiny"]["unet"],
        "sample_size": 16,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "use_linear_projection": True,
    },
    "vae": {**SHAPES["tiny"]["vae"], "sample_size": 128},
}
SHAPES["tiny-xl"] = XL
# The tiny models a worker builds on demand, by the name it serves.
TINY = ("tiny", "tiny-xl")


def build(target: Path, *, seed: int = 0, shape: str = "tiny") -> Path:
    """Write the pipeline (``tiny``, ``tiny-xl`` or ``sd15`` sized) to ``target`` (atomically)
    and return it."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sizes = SHAPES[shape]
    xl = shape == "tiny-xl"
    torch.manual_seed(seed)
    vocab, merges = _vocabulary()
    # tokenizers' BPE wants (left, right) pairs; transformers' annotation says list[str].
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]
    text_config = CLIPTextConfig(
        **{"vocab_size": len(vocab), **sizes["text"]},
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        projection_dim=sizes["text"]["hidden_size"],
    )
    text_encoder = CLIPTextModel(text_config)
    width = sizes["text"]["hidden_size"]
    extra: dict[str, Any] = {}
    if xl:  # the UNet attends to both encoders' states; the second's pooled output joins the time
        extra = {
            "projection_class_embeddings_input_dim": 6 * sizes["unet"]["addition_time_embed_dim"] + width
        }
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        cross_attention_dim=2 * width if xl else width,
        **sizes["unet"],
        **extra,
    )
    # Four blocks give Stable Diffusion's 8x latent factor: 64x64 pixels are 8x8 latents.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **sizes["vae"],
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        steps_offset=1,
    )
    pipe: Any
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(text_config),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    _save_atomically(pipe, target)
    logger.info("model written", extra={"path": str(target), "shape": shape})
    return target


# A tiny TAESD for the tests (a preview decoder, gpu_worker.preview_decoder); ``full`` is TAESD's
# own shape (random weights), whose cost bench.previews measures.
DECODER_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8)},
    "full": {},
}


def build_preview_decoder(
    target: Path, *, shape: str = "tiny", latent_channels: int = 4, seed: int = 0
) -> Path:
    """Write a random-weight ``AutoencoderTiny`` to ``target`` and return it."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    decoder = AutoencoderTiny(latent_channels=latent_channels, **DECODER_SHAPES[shape])
    _save_atomically(decoder, target)
    return target


def _save_atomically(model: Any, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure(target: Path, shape: str = "tiny") -> Path:
    """Build the tiny model (of ``shape``) unless a complete one is already at ``target``; one
    of another family there (the tiny SD model where tiny-xl was meant) is refused, named."""
    index = target / "model_index.json"
    if not index.is_file():
        return build(target, shape=shape)
    found = json.loads(index.read_text()).get("_class_name")
    wanted = "StableDiffusionXLPipeline" if shape == "tiny-xl" else "StableDiffusionPipeline"
    if found != wanted:
        raise ValueError(
            f"{target} holds a {found}, not the {wanted} of {shape}: "
            f"point STEPCAST_MODEL_DIR at {shape}'s own directory (e.g. .data/models/{shape})"
        )
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="directory to write the model to")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    args = parser.parse_args(argv)
    present = (args.target / "model_index.json").is_file()
    path = args.target if present and not args.force else build(args.target, shape=args.shape)
    print(path)


if __name__ == "__main__":
    main()
