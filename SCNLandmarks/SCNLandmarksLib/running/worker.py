"""Background worker: fine-tunes a model on stored training cases, or detects on a folder, reporting JSON lines.

Run with Slicer's Python (``PythonSlicer``) or any Python that has torch::

    python -m SCNLandmarksLib.running.worker finetune --cases <cases folder> --from-model <model.scn.pt>
        --output <new.scn.pt> [--iterations N | --time-budget SECONDS] [--device auto|cpu|cuda]
        [--landmarks-from-cases] [--keep-worse] [--case NAME ...] [--seed S]
        [--threads N] [--cancel-file PATH]
    python -m SCNLandmarksLib.running.worker detect --input-folder <images> --output <folder> --model <model.scn.pt>
        [--device ...] [--check-above MM] [--threshold C] [--photo-spacing MM] [--overwrite] [--threads N]
        [--cancel-file PATH]

``detect`` reports ``started``, one ``progress`` per image and ``done`` with ``succeeded``,
``failed`` ([{image, error}]), ``warnings`` ([{image, warning}]: a doubtful pixel size), ``cancelled`` (a cancel stops after the current image; finished
images are kept), ``summary_csv``, ``review_csv`` and ``review_order``.

The cases folder has the layout of :mod:`SCNLandmarksLib.data.cases`.

Output protocol: standard output carries only JSON objects, one per line, flushed at once:

* ``{"event": "started", "cases": [...], "device": "...", "iterations": N, ...}``
* ``{"event": "progress", "stage", "done", "total", "elapsed_s", "eta_s", "loss",
  "validation_mre_mm", "message", "completed", "fraction"}`` (``Progress.to_dict()``, ``completed``
  accounting for a time budget, plus ``fraction`` in [0, 1]; ``process.progress_from_event``
  reads it back as a ``Progress``)
* ``{"event": "done", "output": "..."|null, "verdict": "better"|"not better"|"unchecked",
  "start_error_mm": x|null, "new_error_mm": x|null, "folds": k, "stages": [...], "message": "...",
  "seconds": s, "device": "..."}``: the recipe of :mod:`SCNLandmarksLib.learning.finetuning`; ``output`` is
  null when the fine-tuned model was not better and the starting model is kept
* ``{"event": "error", "message": "..."}`` (a sentence meant for the user)
* ``{"event": "cancelled", "message": "..."}``

Everything else (warnings, tracebacks) goes to standard error.

Exit codes: 0 finished, 2 error, 3 cancelled.

Cancel: SIGTERM or SIGINT, or creating the ``--cancel-file`` (which also works on Windows,
where a process cannot catch a termination request), makes training stop before the next
iteration. The output model is written only when training finishes (atomically), and the
starting model is only ever read, so a cancelled or failed run changes no model file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .process import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK
from ..common.finite import finite_or_none
from ..common.progress import Progress
from ..models.quality import LOW_CONFIDENCE

__all__ = ["EXIT_CANCELLED", "EXIT_ERROR", "EXIT_OK", "main"]


log = logging.getLogger("SCNLandmarksLib.running.worker")


class _Emitter:
    """Writes one JSON object per line to the real standard output, thread-safe."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, event: str, **data: Any) -> None:
        record = {"event": event, **data}
        text = json.dumps(record, default=_json_default, allow_nan=False)
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # NumPy and torch scalars
        return value.item()  # type: ignore[no-any-return, union-attr]
    return str(value)


def _emit_progress(emit: _Emitter, progress: Progress) -> None:
    values = progress.to_dict()
    values["fraction"] = progress.fraction
    for key in ("loss", "validation_mre_mm", "eta_s", "completed"):
        values[key] = finite_or_none(values.get(key))
    emit("progress", **values)


class _CancelFlag:
    """Set by SIGTERM/SIGINT or by the appearance of the cancel file."""

    def __init__(self, cancel_file: Path | None) -> None:
        self.cancel_file = cancel_file
        self.requested = False

    def install_signal_handlers(self) -> dict[int, Any]:
        """Route termination signals to this flag; returns the previous handlers."""
        previous = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # signals can only be handled on the main thread; the cancel file still works
        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, self._on_signal)
        return previous

    def _on_signal(self, number: int, frame: object) -> None:  # noqa: ARG002
        self.requested = True

    def __call__(self) -> bool:
        if not self.requested and self.cancel_file is not None and self.cancel_file.exists():
            self.requested = True
        return self.requested


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print usage to stderr and exit 2; the caller needs a JSON line.
        raise _UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m SCNLandmarksLib.running.worker", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    finetune = commands.add_parser("finetune", help="fine-tune a model on stored training cases")
    finetune.add_argument("--cases", required=True, type=Path, help="training cases folder")
    finetune.add_argument("--from-model", required=True, type=Path, help="model file to start from (only read)")
    finetune.add_argument("--output", required=True, type=Path, help="new model file (must not exist)")
    budget = finetune.add_mutually_exclusive_group()
    budget.add_argument("--iterations", type=int, help="number of training iterations")
    budget.add_argument("--time-budget", type=float, metavar="SECONDS", help="train for this many seconds")
    finetune.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "gpu"))
    finetune.add_argument(
        "--landmarks-from-cases",
        action="store_true",
        help="learn the landmark set of the cases (new output heads) instead of the model's",
    )
    finetune.add_argument("--case", action="append", dest="case_names", metavar="NAME", help="use only this case")
    finetune.add_argument("--keep-worse", action="store_true", help="write the new model even when it is not better")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: all cores but one, so the application stays responsive)",
    )
    finetune.add_argument("--cancel-file", type=Path, default=None, help="stop when this file appears")

    detect = commands.add_parser("detect", help="detect landmarks on every image of a folder")
    detect.add_argument("--input-folder", required=True, type=Path, help="folder of images (and DICOM series folders)")
    detect.add_argument("--output", required=True, type=Path, help="folder for the .mrk.json files and landmarks.csv")
    detect.add_argument("--model", required=True, type=Path, help="model file")
    detect.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "gpu"))
    detect.add_argument("--check-above", type=float, default=None, metavar="MM",
                        help="flag points expected further off than this (default: the model's threshold)")
    detect.add_argument("--threshold", type=float, default=LOW_CONFIDENCE,
                        help="for models without expected errors: flag points below this confidence")
    detect.add_argument("--photo-spacing", type=float, default=None, metavar="MM",
                        help="pixel size in mm of images whose files carry none (PNG, JPEG, BMP, TIFF); others keep theirs")
    detect.add_argument("--overwrite", action="store_true", help="replace existing output files")
    detect.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores but one)")
    detect.add_argument("--cancel-file", type=Path, default=None, help="stop after the current image when this file appears")
    return parser


def _limit_threads(threads: int | None) -> None:
    import torch

    if threads is None:
        # One core is left to the application that started us (Slicer's GUI); on small
        # machines more threads than free cores also make every step much slower.
        threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(max(1, int(threads)))


def _finetune(arguments: argparse.Namespace, emit: _Emitter, should_cancel: _CancelFlag) -> int:
    source = arguments.from_model.expanduser()
    output = arguments.output.expanduser()
    if output.exists():
        msg = f"The new model file {output} already exists; models are never overwritten"
        raise FileExistsError(msg)
    if output.resolve() == source.resolve():
        msg = "The fine-tuned model must be saved under a new name, not over the model it starts from"
        raise ValueError(msg)
    if not output.parent.is_dir():
        output.parent.mkdir(parents=True, exist_ok=True)
    if arguments.iterations is not None and arguments.iterations < 1:
        msg = f"The number of iterations must be at least 1, got {arguments.iterations}"
        raise ValueError(msg)
    if arguments.time_budget is not None and arguments.time_budget <= 0:
        msg = f"The time budget must be more than 0 seconds, got {arguments.time_budget}"
        raise ValueError(msg)

    # Imported after the cheap checks above: torch takes seconds to import.
    from ..data.cases import read_training_cases
    from ..common.device import describe_device, resolve_device
    from ..common.errors import TrainingCancelled
    from ..learning.finetuning import fine_tune
    from ..models.model_file import load_model

    device = resolve_device(arguments.device)
    _limit_threads(arguments.threads)
    model = load_model(source, device="cpu")
    cases = read_training_cases(arguments.cases.expanduser(), arguments.case_names)
    if should_cancel():
        raise TrainingCancelled("Fine-tuning cancelled before it started; no model file was written")
    model.info = {**model.info, "parent_model": source.name}
    emit(
        "started",
        cases=[case.name for case in cases],
        device=describe_device(device),
        iterations=arguments.iterations,
        time_budget_s=arguments.time_budget,
        from_model=str(source),
        output=str(output),
        landmarks=list(model.landmark_names),
    )
    started = time.monotonic()
    time_budget = arguments.time_budget

    def report(progress: Progress) -> None:
        if time_budget is not None:
            used = time.monotonic() - started
            remaining = max(0.0, time_budget - used)
            progress = dataclasses.replace(
                progress,
                completed=max(progress.fraction, min(1.0, used / time_budget)),
                eta_s=remaining if progress.eta_s is None else min(progress.eta_s, remaining),
                # Unknown when the budget, not a count, ends training.
                total=None if arguments.iterations is None else progress.total,
            )
        _emit_progress(emit, progress)

    result = fine_tune(
        cases, model, output=output, iterations=arguments.iterations, time_budget_s=time_budget,
        new_landmarks=arguments.landmarks_from_cases, keep_worse=arguments.keep_worse, device=str(device),
        seed=arguments.seed, progress=report, should_cancel=should_cancel,
    )
    emit(
        "done",
        output=None if result.output is None else str(result.output),
        verdict=result.verdict,
        start_error_mm=finite_or_none(result.start_error_mm),
        new_error_mm=finite_or_none(result.new_error_mm),
        folds=result.folds,
        stages=result.stages,
        message=result.message,
        seconds=result.seconds,
        device=describe_device(device),
        landmarks=result.landmarks,
    )
    return EXIT_OK


def _detect(arguments: argparse.Namespace, emit: _Emitter, should_cancel: _CancelFlag) -> int:
    """Batch detection; a cancel stops after the current image and keeps the finished ones ("done")."""
    from ..inference.batch import detect_folder
    from ..common.device import describe_device, resolve_device

    device = resolve_device(arguments.device)
    _limit_threads(arguments.threads)
    emit("started", device=describe_device(device), input_folder=str(arguments.input_folder),
         output=str(arguments.output), model=str(arguments.model))

    def report(progress: Progress) -> None:
        _emit_progress(emit, progress)

    result = detect_folder(
        arguments.input_folder.expanduser(), arguments.output.expanduser(), arguments.model.expanduser(),
        device=str(device), low_confidence_threshold=arguments.threshold, check_above_mm=arguments.check_above,
        photo_spacing=arguments.photo_spacing, overwrite=arguments.overwrite, progress=report,
        should_cancel=should_cancel,
    )
    emit(
        "done",
        output=str(arguments.output),
        succeeded=len(result.succeeded),
        failed=[{"image": item.image.name, "error": item.error} for item in result.failed],
        warnings=[{"image": item.image.name, "warning": item.warning} for item in result.warned],
        cancelled=should_cancel(),
        summary_csv=None if result.summary_csv is None else str(result.summary_csv),
        review_csv=None if result.review_csv is None else str(result.review_csv),
        review_order=[{"image": image, "expected_error_mm": finite_or_none(error), "points_to_check": checks}
                      for image, error, checks in result.review_order],
        device=result.device,
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; returns the exit code (0 done, 2 error, 3 cancelled)."""
    # Only our JSON lines may reach the real stdout; stray prints from libraries go to stderr.
    emit = _Emitter(sys.stdout)
    sys.stdout = sys.stderr
    try:
        return _run(argv, emit)
    finally:
        sys.stdout = emit.stream


def _run(argv: Sequence[str] | None, emit: _Emitter) -> int:
    from ..common.errors import TrainingCancelled, unexpected_error_message

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        arguments = _build_parser().parse_args(argv)
    except _UsageError as error:
        emit("error", message=f"Invalid worker arguments: {error}")
        return EXIT_ERROR
    should_cancel = _CancelFlag(arguments.cancel_file)
    previous_handlers = should_cancel.install_signal_handlers()
    try:
        if arguments.command == "finetune":
            return _finetune(arguments, emit, should_cancel)
        if arguments.command == "detect":
            return _detect(arguments, emit, should_cancel)
        emit("error", message=f"Unknown worker command {arguments.command!r}")  # pragma: no cover
        return EXIT_ERROR
    except TrainingCancelled as cancelled:
        emit("cancelled", message=str(cancelled))
        return EXIT_CANCELLED
    except ImportError as error:
        traceback.print_exc()
        emit("error", message=f"A required package is missing ({error.name or error}); install it and try again")
        return EXIT_ERROR
    except (ValueError, OSError, FloatingPointError) as error:
        # Our own errors (ModelFileError, bad cases, existing output...) carry a readable message.
        traceback.print_exc()
        emit("error", message=str(error) or type(error).__name__)
        return EXIT_ERROR
    except Exception as error:  # noqa: BLE001 - the user must always get an error line (MemoryError included)
        traceback.print_exc()
        emit("error", message=unexpected_error_message(error, arguments.command))
        return EXIT_ERROR
    finally:
        # Matters when main() is called in-process (tests, scripts): leave signals as they were.
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
