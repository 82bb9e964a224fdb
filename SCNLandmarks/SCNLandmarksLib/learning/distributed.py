"""Training on several processes or machines with PyTorch's own engine (``torchrun``).

Under ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``) both training stages
run as data parallel: every process starts from process 0's weights, draws its own seeded share
of augmented samples, and after each backward pass the gradients are averaged over all processes
by an all-reduce (what ``DistributedDataParallel`` does, without its overlap of communication and
computation), so the weights stay identical everywhere. The effective batch is the per-process
batch times the number of processes; the learning rate is not scaled (state it when you compare
runs). Decisions that must be the same everywhere (cancel, the time budget) are agreed on by all
processes each step. Validation, progress, checkpoints and the model file come from process 0
only; the checkpoint holds no per-process state, so a run may resume with another number of
processes. gloo is used on the CPU, NCCL on GPUs. A process that dies ends the others' collective
calls with an error after ``TIMEOUT_S`` at most (``torchrun`` normally stops them at once).

Without ``torchrun`` everything here is a no-op.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["Distributed", "distributed_from_environment"]

TIMEOUT_S = 600


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that validates, reports progress and writes files."""
        return self.rank == 0

    def seed_offset(self) -> int:
        """Added to sampling seeds: each process draws its own share of the samples (0 on process 0)."""
        return 7919 * self.rank

    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Make every process start from process 0's weights and buffers."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over all processes (one all-reduce)."""
        if not self.active:
            return
        import torch.distributed as dist

        parameters = [p for p in parameters if p.requires_grad]
        for parameter in parameters:
            if parameter.grad is None:  # every process must reduce the same tensors
                parameter.grad = torch.zeros_like(parameter)
        flat = torch.cat([p.grad.reshape(-1) for p in parameters])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for parameter in parameters:
            count = parameter.grad.numel()
            parameter.grad.copy_(flat[offset : offset + count].view_as(parameter.grad))
            offset += count

    def wait_for_all(self) -> None:
        """Return once every process got here (the end of a run: none exits while another still works)."""
        self.agree(False)

    def agree(self, flag: bool) -> bool:
        """True on every process when it is True on any (stop, cancel)."""
        return flag if not self.active else self._reduce(1.0 if flag else 0.0, "MAX") > 0

    def smallest(self, value: int) -> int:
        """The smallest of every process's ``value`` (a count all must use, such as a number of steps)."""
        return value if not self.active else int(self._reduce(float(value), "MIN"))

    @staticmethod
    def _reduce(value: float, operation: str) -> float:
        """``value`` combined over all processes by ``torch.distributed.ReduceOp.<operation>``."""
        import torch.distributed as dist

        tensor = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, operation))
        return float(tensor.item())


def distributed_from_environment(device: torch.device) -> Distributed:
    """Join the run ``torchrun`` started, or a single-process :class:`Distributed` without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_available():
        msg = "This PyTorch build has no distributed support; run without torchrun"
        raise RuntimeError(msg)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        # A process group left to the interpreter's exit can abort the process ("terminate called
        # without an active exception", exit code -6) after its work is done; leave it first.
        atexit.register(_leave_process_group)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
