"""Choosing the compute device."""

from __future__ import annotations

import torch

__all__ = ["bfloat16_is_native", "describe_device", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when a usable GPU is present, else the CPU.

    Raises:
        ValueError: an unknown name, or ``"cuda"`` on a machine without a usable GPU.
    """
    if isinstance(name, torch.device):
        return name
    choice = str(name).lower()
    if choice in ("gpu", "cuda") or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            msg = "A GPU (CUDA) was requested but none is usable here; choose device 'cpu' or 'auto'"
            raise ValueError(msg)
        return torch.device("cuda" if choice == "gpu" else choice)
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    msg = f"Unknown device {name!r}; choose one of {DEVICE_CHOICES}"
    raise ValueError(msg)


def describe_device(device: torch.device) -> str:
    """A short human-readable name, e.g. ``'cuda:0 (NVIDIA H100)'`` or ``'cpu (2 threads)'``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 in hardware (elsewhere it is emulated and slower).

    CPUs: AVX512-BF16 or AMX; GPUs: what CUDA reports.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)
