"""Choosing the compute device."""

from __future__ import annotations

import logging

import torch

__all__ = ["bfloat16_is_native", "cuda_problem", "describe_device", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")

log = logging.getLogger(__name__)


# What cuda_problem found per device; a problem of the moment (a full or busy GPU) is not kept.
_CUDA_PROBLEMS: dict[str, str | None] = {}
_PASSING_PROBLEMS = ("out of memory", "busy or unavailable")


def _passing(problem: str) -> bool:
    """Whether a GPU problem is of the moment (full or busy) rather than of the installation."""
    return any(passing in problem.lower() for passing in _PASSING_PROBLEMS)


def cuda_problem(device: str = "cuda") -> str | None:
    """Why torch cannot compute on the GPU ``device`` (``"cuda"`` or ``"cuda:N"``), or None when a
    small convolution runs there.

    ``torch.cuda.is_available()`` is not enough: a GPU newer than the torch build ("no kernel
    image is available") or a driver older than it is seen, and fails at the first computation.
    Checked once per device and process, except a full or busy GPU, which is checked again next time.
    """
    if device in _CUDA_PROBLEMS:
        return _CUDA_PROBLEMS[device]
    try:
        image = torch.ones(1, 1, 8, 8, device=device)
        torch.nn.functional.conv2d(image, torch.ones(1, 1, 3, 3, device=device))
        torch.cuda.synchronize(device)
    except (RuntimeError, AssertionError) as error:  # torch raises AssertionError where CUDA is not compiled in
        text = str(error).strip()
        problem = text.splitlines()[0] if text else type(error).__name__
        if not _passing(problem):
            _CUDA_PROBLEMS[device] = problem
        return problem
    _CUDA_PROBLEMS[device] = None
    return None


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when a GPU is present and torch computes on it (:func:`cuda_problem`), else the CPU.

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
        target = "cuda" if choice == "gpu" else choice
        problem = cuda_problem(target)
        if problem is not None:
            if _passing(problem):
                msg = f"The GPU is full or busy now ({problem}); try again later or choose device 'cpu'"
            else:
                msg = (f"A GPU is present but torch cannot compute on it ({problem}); install a torch build for "
                       "this GPU and driver (in Slicer: the PyTorch Utils module) or choose device 'cpu'")
            raise ValueError(msg)
        return torch.device(target)
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        problem = cuda_problem()
        if problem is not None:
            log.warning("A GPU is present but torch cannot compute on it (%s); using the CPU", problem)
            return torch.device("cpu")
        return torch.device("cuda")
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
