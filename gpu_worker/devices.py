"""Where the model runs: the device and dtype a worker loads it with, and why.

``STEPCAST_DEVICE=auto`` (the default) takes CUDA, then Apple MPS, then the
CPU; ``STEPCAST_DTYPE=auto`` takes the dtype that suits the device. A value
set explicitly is used as given, so a worker can always be pinned.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: str
    reason: str  # for the start-up log: why this device and dtype


def default_dtype(device: str) -> str:
    """The dtype ``auto`` means on a device."""
    if device.startswith("cuda"):
        # Half the memory and the tensor cores' speed; SD-class models run well in it.
        return "float16"
    # MPS: float32, as diffusers' own MPS guide loads pipelines. float16 works
    # for SD 1.5 on recent macOS but some models and kernels still misbehave in
    # it there (NaNs, black images), and unified memory usually fits float32;
    # STEPCAST_DTYPE=float16 opts in. The CPU has no fast half-precision path.
    return "float32"


def choose(device: str, dtype: str) -> Placement:
    """Resolve the settings' ``device`` and ``dtype`` (either may be ``"auto"``)."""
    import torch

    if device != "auto":
        reason = f"STEPCAST_DEVICE={device}"
    elif torch.cuda.is_available():
        device = "cuda"
        reason = "CUDA available"
    elif torch.backends.mps.is_available():
        device = "mps"
        reason = "Apple MPS available, no CUDA"
    else:
        device = "cpu"
        reason = "no CUDA or MPS"
    if dtype == "auto":
        dtype = default_dtype(device)
        reason += f"; {dtype} suits {device.split(':')[0]}"
    else:
        reason += f"; STEPCAST_DTYPE={dtype}"
    return Placement(device, dtype, reason)
