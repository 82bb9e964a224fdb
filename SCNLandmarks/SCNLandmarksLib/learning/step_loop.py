"""The bookkeeping every training loop shares: cancel, running loss, validation schedule,
history, progress with ETA, periodic checkpoints and the time budget.

The global stage (:func:`~SCNLandmarksLib.learning.training.train_model`) and the local stage
(:func:`~SCNLandmarksLib.learning.refinement_training.train_refiner`) differ in what one step computes;
everything around the step is this one piece of code.
"""

from __future__ import annotations

import errno
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.atomic import atomic_path
from .distributed import Distributed
from ..common.errors import TrainingCancelled
from ..common.progress import Progress, ProgressCallback, estimate_eta

__all__ = [
    "ResumePoint", "StepLoop", "foreign_checkpoint", "is_training_checkpoint", "load_checkpoint", "refuse_to_start",
    "restore", "resume_state",
    "save_checkpoint", "write_trained_model",
]

log = logging.getLogger(__name__)

def _write_failure(error: BaseException) -> str:
    """Why a write failed, in words: torch reports a full disk as a bare RuntimeError."""
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "failed writing" in text:
        return "the disk is full"
    if getattr(error, "errno", None) in (errno.EDQUOT, errno.EFBIG):
        return "a disk quota or file-size limit was reached"
    return text or type(error).__name__


def save_checkpoint(path: Path, state: dict[str, object]) -> None:
    """Write a training checkpoint atomically (plain tensors and strings only).

    Raises:
        OSError: it could not be written, with the reason in words (for example a full disk).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, overwrite=True) as temporary:
            torch.save(state, temporary)
    except (OSError, RuntimeError) as error:
        msg = f"Could not write the checkpoint {path}: {_write_failure(error)}"
        raise OSError(msg) from error


def resume_state(checkpoint: Path | None, resume: bool) -> dict[str, object] | None:
    """The checkpoint to resume from, or None to start afresh.

    Raises:
        ValueError: ``resume`` without a checkpoint file, or a damaged one.
        FileNotFoundError: ``resume`` and the checkpoint does not exist (never a silent fresh start).
    """
    if not resume:
        return None
    if checkpoint is None:
        msg = "Resuming needs the checkpoint file to resume from (command line: --checkpoint FILE --resume)"
        raise ValueError(msg)
    if not checkpoint.exists():
        msg = f"There is no checkpoint at {checkpoint} to resume from; leave out --resume to start afresh"
        raise FileNotFoundError(msg)
    return load_checkpoint(checkpoint)


def refuse_to_start(output: Path, cases: Sequence[object], *, overwrite: bool, checkpoint: Path | None = None,
                    resume: bool = False) -> None:
    """Refuse before any work: ``output`` exists and may not be replaced, there are no cases, or
    the checkpoint would replace something that is not a checkpoint.

    A run writes its checkpoint over and over and deletes it at the end, so the checkpoint may be
    neither the model being written nor any file but an earlier run's checkpoint (which a fresh
    start replaces).

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False, or ``checkpoint`` is an
            existing file that is not a training checkpoint (a model, for example).
        ValueError: ``cases`` is empty, or ``checkpoint`` is ``output``.
    """
    if output.exists() and not overwrite:
        msg = f"The model file {output} already exists; choose a new name (models are never overwritten by default)"
        raise FileExistsError(msg)
    if not cases:
        msg = "Training needs at least one annotated case"
        raise ValueError(msg)
    if checkpoint is None:
        return
    if checkpoint.expanduser().resolve() == output.expanduser().resolve():
        msg = f"The checkpoint and the model are both {output}; the checkpoint must be another file"
        raise ValueError(msg)
    if checkpoint.exists() and not resume and not is_training_checkpoint(checkpoint):
        msg = (f"{checkpoint} exists and is not a training checkpoint; it is kept: choose another checkpoint file "
               "(command line: --checkpoint)")
        raise FileExistsError(msg)


def is_training_checkpoint(path: Path) -> bool:
    """True for a checkpoint file that a training run of this package wrote (read safely)."""
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unreadable is not a checkpoint
        return False
    return isinstance(saved, dict) and {"iteration", "network", "optimizer"} <= set(saved)


@dataclass
class ResumePoint:
    """Where a run starts: afresh (the defaults) or where its checkpoint left it."""

    iteration: int = 0
    history: list[dict[str, float | int | None]] = field(default_factory=list)
    best_mre: float | None = None
    best_state: dict | None = None


def restore(saved: dict[str, object] | None, parts: dict[str, object], checkpoint: Path | None) -> ResumePoint:
    """Load a checkpoint's states into ``parts`` (name -> module, optimiser or scheduler).

    Raises:
        ValueError: the checkpoint's tensors do not fit ``parts`` (:func:`foreign_checkpoint`).
    """
    if saved is None:
        return ResumePoint()
    try:
        for name, part in parts.items():
            part.load_state_dict(saved[name])  # type: ignore[attr-defined]
    except (RuntimeError, KeyError, ValueError) as error:
        raise foreign_checkpoint(checkpoint, error) from error  # type: ignore[arg-type]
    best_mre = saved["best_mre"]
    return ResumePoint(int(saved["iteration"]), json.loads(str(saved["history"])),  # type: ignore[call-overload]
                       None if best_mre is None else float(best_mre),  # type: ignore[arg-type]
                       saved.get("best_state") or None)  # type: ignore[arg-type]


def foreign_checkpoint(checkpoint: Path, error: BaseException) -> ValueError:
    """The error for a checkpoint whose tensors do not fit the model being trained."""
    return ValueError(f"The checkpoint {checkpoint} does not fit the network these options make ({type(error).__name__}): "
                      "it belongs to another training, or this one was started with other network options (--filters, "
                      "--levels, --architecture, --spatial-kernel) or another landmark set; repeat the first command "
                      "exactly, with --resume, or start afresh")


def write_trained_model(model: object, output: Path, *, overwrite: bool) -> Path:
    """Save the trained model; when that fails (a full disk), save a rescue copy elsewhere and say where.

    Raises:
        OSError: the model could not be written where asked; the message names the rescue copy
            (in the system's temporary folder) or says that none could be written.
    """
    from ..models.model_file import save_model

    try:
        return save_model(model, output, overwrite=overwrite)  # type: ignore[arg-type]
    except (FileExistsError, IsADirectoryError):
        raise
    except (OSError, RuntimeError) as error:
        reason = _write_failure(error)
        rescue = Path(tempfile.gettempdir()) / f"rescued-{time.strftime('%Y%m%d-%H%M%S')}-{output.name}"
        try:
            save_model(model, rescue)  # type: ignore[arg-type]
        except (OSError, RuntimeError):
            msg = (f"Could not write the trained model to {output}: {reason}. No rescue copy could be written "
                   "either; the last checkpoint (if any) is kept: free some space and resume from it")
            raise OSError(msg) from error
        msg = f"Could not write the trained model to {output}: {reason}. It was saved to {rescue} instead: move it where you want it"
        raise OSError(msg) from error


def load_checkpoint(path: Path) -> dict[str, object]:
    """Read a checkpoint safely (``weights_only``); a damaged file is a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"The checkpoint {path} cannot be resumed from: it is damaged ({type(error).__name__})"
        raise ValueError(msg) from error


# Weight of the newest loss in the running loss shown to the user.
_LOSS_SMOOTHING = 0.05


@dataclass
class StepLoop:
    """Around-the-step bookkeeping of one training run.

    Attributes:
        stage: the progress stage name (``"train"``, ``"train refinement"``).
        total: planned iterations.
        start: iteration the run starts (or resumes) at.
        time_budget_s: stop (successfully) after this many seconds, or None.
        validate_every: iterations between validations (0: only at the end).
        progress_every: iterations between progress reports and history entries.
        checkpoint_every: iterations between checkpoints (0: only on cancel).
        checkpoint: checkpoint file, or None.
        progress: progress callback, or None.
        should_cancel: polled before every step, or None.
        history: ``[{"iteration", "loss", "validation_mre_mm"}, ...]``, extended in place.
        distributed: this process's place in a ``torchrun`` run: only process 0 validates,
            reports and writes checkpoints; cancel and the time budget are agreed by all.
    """

    stage: str
    total: int
    start: int
    time_budget_s: float | None
    validate_every: int
    progress_every: int
    checkpoint_every: int
    checkpoint: Path | None
    progress: ProgressCallback | None
    should_cancel: Callable[[], bool] | None
    history: list[dict[str, float | int | None]]
    running_loss: float | None = None
    started: float = field(default_factory=time.monotonic)
    distributed: Distributed = field(default_factory=Distributed)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def stop_if_cancelled(self, iteration: int, state: Callable[[], dict[str, object]]) -> None:
        """Raise :class:`TrainingCancelled` (after writing the checkpoint) when the user asked to stop."""
        wanted = self.should_cancel is not None and self.should_cancel()
        if not self.distributed.agree(wanted):
            return
        kept = ""
        if self.checkpoint is not None and self.distributed.is_main:
            save_checkpoint(self.checkpoint, state())
            kept = f"; the checkpoint {self.checkpoint} is kept to resume from"
        msg = f"Training cancelled at iteration {iteration} of {self.total}; no model file was written{kept}"
        raise TrainingCancelled(msg, checkpoint=self.checkpoint if kept else None)

    def after_step(
        self,
        iteration: int,
        loss: float,
        validate: Callable[[], float | None],
        state: Callable[[], dict[str, object]],
    ) -> bool:
        """Record step ``iteration`` (already counted) with its ``loss``; True when the time budget is spent."""
        self.running_loss = loss if self.running_loss is None else (
            (1 - _LOSS_SMOOTHING) * self.running_loss + _LOSS_SMOOTHING * loss)
        elapsed = self.elapsed_s
        budget_over = self.distributed.agree(self.time_budget_s is not None and elapsed >= self.time_budget_s)
        if not self.distributed.is_main:  # process 0 validates, reports and writes checkpoints
            return budget_over
        validate_now = self.validate_every and iteration % self.validate_every == 0
        mre = validate() if validate_now and iteration < self.total and not budget_over else None
        if mre is not None or iteration % self.progress_every == 0:
            self.history.append({"iteration": iteration, "loss": self.running_loss, "validation_mre_mm": mre})
        if self.progress is not None and (iteration % self.progress_every == 0 or mre is not None):
            eta = estimate_eta(iteration - self.start, self.total - self.start, elapsed)
            if self.time_budget_s is not None and eta is not None:
                eta = max(0.0, min(eta, self.time_budget_s - elapsed))
            self.progress(Progress(self.stage, iteration, self.total, elapsed, eta,
                                   loss=self.running_loss, validation_mre_mm=mre))
        if self.checkpoint is not None and self.checkpoint_every and iteration % self.checkpoint_every == 0:
            try:
                save_checkpoint(self.checkpoint, state())
            except OSError as error:  # the run itself is fine: keep training, say so
                log.warning("%s; training goes on without it", error)
        if budget_over:
            log.info("Time budget of %.0f s reached after %d iterations", self.time_budget_s, iteration)
        return budget_over

    def finish(self, iteration: int, final_mre: float | None) -> None:
        """Record the end of the run: the final validation in the history and as a progress report."""
        if not self.distributed.is_main:
            return
        if final_mre is not None or not self.history or self.history[-1]["iteration"] != iteration:
            self.history.append({"iteration": iteration, "loss": self.running_loss, "validation_mre_mm": final_mre})
        if final_mre is not None and self.progress is not None:
            self.progress(Progress("validate", iteration, self.total, self.elapsed_s, 0.0,
                                   loss=self.running_loss, validation_mre_mm=final_mre))

    def record(self, iteration: int, *, cases: Sequence[str], validation_cases: Sequence[str], config: dict[str, object],
               best_mre: float | None, seconds: float, device: str) -> dict[str, object]:
        """What the model file keeps about this run (its ``info`` entry); ``seconds`` as the run reports them."""
        return {
            "cases": list(cases),
            "validation_cases": list(validation_cases),
            "iterations": iteration,
            "config": config,
            "best_validation_mre_mm": best_mre,
            "seconds": seconds,
            "device": device,
            "history": self.history[-200:],
        }

    def write(self, model: object, output: Path, *, overwrite: bool) -> None:
        """Write the trained model (process 0 of a ``torchrun`` run), then drop the checkpoint."""
        if self.distributed.is_main:  # one writer; every process returns the same trained model
            write_trained_model(model, output, overwrite=overwrite)
            if self.checkpoint is not None and self.checkpoint.exists():
                self.checkpoint.unlink()
        self.distributed.wait_for_all()
