"""A denoising run's state at a step: taken on the pipeline thread, encoded off it, restored.

A :class:`Snapshot` holds what continuing needs, for one job's rows of a batch: the latents, the
scheduler's state (multistep solvers keep earlier model outputs) and each image's generator
state (ancestral samplers draw noise every step). Restored at the same step of a fresh run of the
same job, the remaining steps compute exactly what the uninterrupted run did
(docs/reliability.md, "Resuming"). Only taking and restoring use torch, on the pipeline thread:
a snapshot holds numpy arrays, and its encoding (``.npz``, a JSON header, no pickle) runs on any
thread without starting a second OpenMP pool there (docs/performance.md).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT = 2  # of the encoding; a checkpoint of another format is not resumed from


@dataclass(frozen=True)
class Snapshot:
    """One job's state after ``step`` of the pipeline's loop iterations, in numpy arrays."""

    step: int
    latents: Array | None  # (images, c, h, w); None from the simulated pipeline
    scheduler: dict[str, Any]  # the scheduler's attributes that stepping changes
    generators: list[Array]  # each image's generator state


@dataclass(frozen=True)
class Array:
    """A tensor's values and its torch dtype (bfloat16 travels as float32, exactly)."""

    values: np.ndarray
    dtype: str


def _is_rows(value: Any, rows: int, shape: tuple[int, ...]) -> bool:
    """Whether ``value`` is a tensor with one row per image of the batch (like its latents)."""
    import torch

    return (
        isinstance(value, torch.Tensor)
        and value.dim() == len(shape) + 1
        and (value.shape[0] == rows and tuple(value.shape[1:]) == shape)
    )


def _array(value: Any) -> Array:
    import torch

    dtype = str(value.dtype).removeprefix("torch.")
    if value.dtype == torch.bfloat16:  # (numpy has no bfloat16)
        value = value.float()
    return Array(value.detach().to("cpu", copy=True).numpy(), dtype)


def _scheduler_state(scheduler: Any, rows: slice, batch_rows: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """What stepping changed: per-row tensors (cut to ``rows``), lists of them, and scalars.
    Not what ``set_timesteps`` makes again the same (the schedule, numpy arrays, config)."""
    import torch

    def kept(value: Any) -> Any:
        if _is_rows(value, batch_rows, shape):
            return _array(value[rows])
        return _array(value) if isinstance(value, torch.Tensor) else value

    state: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if name == "_internal_dict":
            continue
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or _is_rows(value, batch_rows, shape):
                state[name] = kept(value)
        elif isinstance(value, list):
            state[name] = [kept(item) for item in value]
        elif value is None or isinstance(value, bool | int | float | str):
            state[name] = value
    return state


def take(step: int, latents: Any, scheduler: Any, generators: list[Any], rows: slice) -> Snapshot:
    """The state of the job whose images are ``rows`` of the batch, on the pipeline thread.
    The copies to host memory are all it costs there; encoding happens elsewhere."""
    shape = tuple(latents.shape[1:])
    return Snapshot(
        step=step,
        latents=_array(latents[rows]),
        scheduler=_scheduler_state(scheduler, rows, latents.shape[0], shape),
        generators=[_array(generator.get_state()) for generator in generators[rows]],
    )


def encode(snapshot: Snapshot) -> bytes:
    """An ``.npz`` of the arrays and a JSON header for the rest (no torch, no pickle)."""
    arrays: list[np.ndarray] = []  # saved as arr_1, arr_2, ... (arr_0: the header)

    def packed(value: Any) -> Any:
        if isinstance(value, Array):
            arrays.append(value.values)
            return {"array": f"arr_{len(arrays)}", "dtype": value.dtype}
        if isinstance(value, list):
            return {"list": [packed(item) for item in value]}
        return {"value": value}

    header = {
        "format": FORMAT,
        "step": snapshot.step,
        "latents": packed(snapshot.latents),
        "scheduler": {name: packed(value) for name, value in snapshot.scheduler.items()},
        "generators": [packed(state) for state in snapshot.generators],
    }
    buffer = io.BytesIO()
    np.savez(buffer, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), *arrays)
    return buffer.getvalue()


def decode(data: bytes) -> Snapshot:
    """Raises ValueError on data that is not a checkpoint of this format (read without pickle:
    arrays and plain values only, never code)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        header = json.loads(arrays.pop("arr_0").tobytes())
    except Exception as exc:
        raise ValueError(f"not a checkpoint: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("not a checkpoint of this format")

    def unpacked(value: dict[str, Any]) -> Any:
        if "array" in value:
            return Array(arrays[value["array"]], value["dtype"])
        if "list" in value:
            return [unpacked(item) for item in value["list"]]
        return value["value"]

    try:
        return Snapshot(
            step=int(header["step"]),
            latents=unpacked(header["latents"]),
            scheduler={name: unpacked(value) for name, value in header["scheduler"].items()},
            generators=[unpacked(state) for state in header["generators"]],
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a checkpoint: {exc}") from exc


def _tensor(array: Array, device: Any) -> Any:
    import torch

    return torch.from_numpy(array.values).to(device=device, dtype=getattr(torch, array.dtype))


def restore(snapshot: Snapshot, scheduler: Any, generators: list[Any], device: Any, dtype: Any) -> Any:
    """Put the scheduler and the generators back as they were; the latents to continue from."""

    def restored(value: Any) -> Any:
        if isinstance(value, Array):
            return _tensor(value, device)
        if isinstance(value, list):
            return [restored(item) for item in value]
        return value

    for name, value in snapshot.scheduler.items():
        setattr(scheduler, name, restored(value))
    for generator, state in zip(generators, snapshot.generators, strict=True):
        generator.set_state(_tensor(state, "cpu"))
    if snapshot.latents is None:
        raise ValueError("a checkpoint without latents (the simulated pipeline's) resumes nothing")
    return _tensor(snapshot.latents, device).to(dtype)


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
