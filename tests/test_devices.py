"""The worker's device and dtype: auto picks CUDA, then MPS, then the CPU; explicit settings win."""

from __future__ import annotations

import pytest
import torch

from gpu_worker import devices
from stepcast import settings as settings_module


def machine(monkeypatch: pytest.MonkeyPatch, *, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def test_auto_is_the_default() -> None:
    settings = settings_module.load()
    assert (settings.device, settings.dtype) == ("auto", "auto")


@pytest.mark.parametrize(
    ("cuda", "mps", "device", "dtype", "why"),
    [
        (True, True, "cuda", "float16", "CUDA available"),
        (False, True, "mps", "float32", "Apple MPS available, no CUDA"),
        (False, False, "cpu", "float32", "no CUDA or MPS"),
    ],
)
def test_auto_takes_cuda_then_mps_then_the_cpu(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool, device: str, dtype: str, why: str
) -> None:
    machine(monkeypatch, cuda=cuda, mps=mps)
    placement = devices.choose("auto", "auto")
    assert (placement.device, placement.dtype) == (device, dtype)
    assert placement.reason.startswith(why) and dtype in placement.reason


def test_an_explicit_device_or_dtype_is_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    machine(monkeypatch, cuda=True, mps=False)
    assert devices.choose("cpu", "auto") == devices.Placement(
        "cpu", "float32", "STEPCAST_DEVICE=cpu; float32 suits cpu"
    )
    assert devices.choose("cuda:1", "auto").dtype == "float16"
    placement = devices.choose("auto", "bfloat16")
    assert (placement.device, placement.dtype) == ("cuda", "bfloat16")
    assert placement.reason == "CUDA available; STEPCAST_DTYPE=bfloat16"
    machine(monkeypatch, cuda=False, mps=False)
    assert devices.choose("auto", "float16") == devices.Placement(
        "cpu", "float16", "no CUDA or MPS; STEPCAST_DTYPE=float16"
    )


def test_settings_read_from_the_environment_reach_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    machine(monkeypatch, cuda=False, mps=False)
    monkeypatch.setenv("STEPCAST_DEVICE", "mps")
    settings = settings_module.load()
    placement = devices.choose(settings.device, settings.dtype)
    assert (placement.device, placement.dtype) == ("mps", "float32")
    assert placement.reason == "STEPCAST_DEVICE=mps; float32 suits mps"
