"""A denoising run's state at a step: taken on the pipeline thread, encoded off it, restored.

A :class:`Snapshot` holds what continuing needs, for one job's rows of a batch: the latents, the
scheduler's state (multistep solvers keep earlier model outputs) and each image's generator
state (ancestral samplers draw noise every step). Restored at the same step of a fresh run of the
same job, the remaining steps compute exactly what the uninterrupted run did
(docs/reliability.md, "Resuming").
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

FORMAT = 1  # of the encoding; a checkpoint of another format is not resumed from


@dataclass(frozen=True)
class Snapshot:
    """One job's state after ``index + 1`` of the pipeline's loop iterations (its ``step``)."""

    step: int
    latents: Any  # (images, c, h, w), on the CPU
    scheduler: dict[str, Any]  # the scheduler's attributes that stepping changes
    generators: list[Any]  # each image's generator state


def _is_rows(value: Any, rows: int, shape: tuple[int, ...]) -> bool:
    """Whether ``value`` is a tensor with one row per image of the batch (like its latents)."""
    import torch

    return (
        isinstance(value, torch.Tensor)
        and value.dim() == len(shape) + 1
        and (value.shape[0] == rows and tuple(value.shape[1:]) == shape)
    )


def _cpu(value: Any) -> Any:
    return value.detach().to("cpu", copy=True)


def _scheduler_state(scheduler: Any, rows: slice, batch_rows: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """What stepping changed: per-row tensors (cut to ``rows``), lists of them, and scalars.
    Not what ``set_timesteps`` makes again the same (the schedule, numpy arrays, config)."""
    import torch

    state: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if name == "_internal_dict":
            continue
        if _is_rows(value, batch_rows, shape):
            state[name] = _cpu(value[rows])
        elif isinstance(value, torch.Tensor):
            if value.dim() == 0:
                state[name] = _cpu(value)
        elif isinstance(value, list):
            state[name] = [
                _cpu(item[rows]) if _is_rows(item, batch_rows, shape)
                else _cpu(item) if isinstance(item, torch.Tensor)
                else item
                for item in value
            ]  # fmt: skip
        elif value is None or isinstance(value, bool | int | float | str):
            state[name] = value
    return state


def take(step: int, latents: Any, scheduler: Any, generators: list[Any], rows: slice) -> Snapshot:
    """The state of the job whose images are ``rows`` of the batch, on the pipeline thread.
    The copies to the CPU are all it costs there; encoding happens elsewhere."""
    shape = tuple(latents.shape[1:])
    return Snapshot(
        step=step,
        latents=_cpu(latents[rows]),
        scheduler=_scheduler_state(scheduler, rows, latents.shape[0], shape),
        generators=[generator.get_state() for generator in generators[rows]],
    )


def encode(snapshot: Snapshot) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "step": snapshot.step,
            "latents": snapshot.latents,
            "scheduler": snapshot.scheduler,
            "generators": snapshot.generators,
        },
        buffer,
    )
    return buffer.getvalue()


def decode(data: bytes) -> Snapshot:
    """Raises ValueError on data that is not a checkpoint of this format. Loaded with
    ``weights_only``: tensors and plain values only, never code."""
    import torch

    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"not a checkpoint: {exc}") from exc
    if not isinstance(loaded, dict) or loaded.get("format") != FORMAT:
        raise ValueError("not a checkpoint of this format")
    return Snapshot(loaded["step"], loaded["latents"], loaded["scheduler"], loaded["generators"])


def restore(snapshot: Snapshot, scheduler: Any, generators: list[Any], device: Any, dtype: Any) -> Any:
    """Put the scheduler and the generators back as they were; the latents to continue from."""
    import torch

    for name, value in snapshot.scheduler.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        elif isinstance(value, list):
            value = [item.to(device) if isinstance(item, torch.Tensor) else item for item in value]
        setattr(scheduler, name, value)
    for generator, state in zip(generators, snapshot.generators, strict=True):
        generator.set_state(state)
    return snapshot.latents.to(device=device, dtype=dtype)


class SkippedSteps:
    """The UNet, answering zeros without running until the resumed step is reached: the
    pipeline's loop goes through the steps a checkpoint holds without computing them."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet

    def __enter__(self) -> SkippedSteps:
        out_channels = self.unet.config.out_channels

        def forward(sample: Any, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
            import torch
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            zeros = torch.zeros_like(sample[:, :out_channels])
            return UNet2DConditionOutput(sample=zeros) if return_dict else (zeros,)

        self.unet.forward = forward  # the instance's own: the class's forward is not touched
        return self

    def stop(self) -> None:
        self.unet.__dict__.pop("forward", None)

    def __exit__(self, *exc: object) -> None:
        self.stop()
