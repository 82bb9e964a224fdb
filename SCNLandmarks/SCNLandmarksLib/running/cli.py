"""``scn-landmarks``: detect, train, fine-tune and evaluate from the command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from ..common.finite import finite_or_none
from ..learning.finetuning import DEFAULT_TIME_LIMIT_S
from ..models.quality import LOW_CONFIDENCE

__all__ = ["main"]

EXIT_ERROR = 2
EXIT_CANCELLED = 130

DESCRIPTION = """\
Landmark detection with a SpatialConfiguration-Net (Payer et al., MedIA 2019).

  detect     find landmarks on an image or a folder of images (writes .mrk.json + CSV)
  train      train a model from scratch on annotated images
  finetune   continue training an existing model on your own annotated images
  evaluate   measure a model's error against annotations (mean radial error, SDR)
  info       show what a model file contains

Coordinates in the output files are physical millimetres (LPS, as ITK; the .mrk.json files
load in 3D Slicer). Run 'scn-landmarks COMMAND --help' for the options of a command.
"""


def _spacing_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                        help="pixel size in mm, one value or one per axis: needed for images that carry none (PNG, JPEG, "
                             "BMP, TIFF, read at 1 mm without it); it also replaces the pixel size in other files' headers, "
                             "with a warning where they differ")


def _device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to compute: 'auto' uses the GPU when there is one (default: auto)")


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="folder of annotated images")
    parser.add_argument("--landmarks", type=Path, nargs="+",
                        help="CSV with one row per image 'id,x1,y1[,z1],...' (id = image file name without "
                             "extension), or several (raters): each point is then their mean; without it, "
                             "<image>.mrk.json or <image>.fcsv next to each image is used")
    parser.add_argument("--units", choices=["mm", "pixel"], default="mm",
                        help="coordinates in the CSV: physical mm or pixel indices (default: mm)")
    parser.add_argument("--ids", type=Path, help="file listing the image ids to use, one per line")
    parser.add_argument("--names", type=Path,
                        help="file with one landmark per line, 'name' or 'name: description' (CSV columns order)")
    parser.add_argument("--dimension", type=int, choices=[2, 3], default=2, help="image dimension (default: 2)")
    _spacing_arg(parser)


def _training_args(parser: argparse.ArgumentParser, *, iterations: int) -> None:
    parser.add_argument("--output", required=True, type=Path, help="model file to write (.scn.pt); never overwritten")
    parser.add_argument("--validation-ids", type=Path, help="ids held out for validation (default: 10%% of the cases)")
    parser.add_argument("--iterations", type=int, default=iterations, help=f"optimiser steps (default: {iterations})")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop training after this long")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--validate-every", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="background processes preparing samples (default: 0)")
    parser.add_argument("--checkpoint", type=Path,
                        help="checkpoint file, written periodically and on Ctrl-C (default: <output>.ckpt beside the output)")
    parser.add_argument("--checkpoint-every", type=int, default=1000, metavar="N",
                        help="iterations between checkpoints (default: 1000; 0: only on Ctrl-C)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint (it must exist)")
    parser.add_argument("--no-augmentation", action="store_true", help="train without random deformations")
    _device_arg(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scn-landmarks", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    detect = commands.add_parser("detect", help="detect landmarks on an image or a folder",
                                 description="Detect landmarks. Writes <image>.mrk.json per image and landmarks.csv.")
    detect.add_argument("input", type=Path, help="an image file, a DICOM folder, or a folder of images")
    detect.add_argument("--model", help="model file (.scn.pt) or the name of an installed model (default: the bundled default)")
    detect.add_argument("--output", type=Path, default=Path("scn-output"), help="output folder (default: ./scn-output)")
    detect.add_argument("--check-above", type=float, default=None, metavar="MM",
                        help="flag points whose expected error exceeds this many mm (default: the model's validated threshold)")
    detect.add_argument("--threshold", type=float, default=LOW_CONFIDENCE,
                        help=f"for models without an error model: flag points with confidence below this (default: {LOW_CONFIDENCE})")
    detect.add_argument("--overlay", action="store_true", help="also write <image>.png with the points drawn")
    detect.add_argument("--overwrite", action="store_true", help="replace existing output files")
    detect.add_argument("--shard", metavar="K/N", help="process only the K-th of N equal shares of the images "
                        "(1 <= K <= N; for a job array: every image is in exactly one share, and the runs' "
                        "landmarks.csv rows merge into one file, ranked together in review_order.csv)")
    _spacing_arg(detect)
    _device_arg(detect)

    train = commands.add_parser("train", help="train a model from scratch",
                                description="Train a SpatialConfiguration-Net (or the U-Net baseline) from scratch.")
    _data_args(train)
    _training_args(train, iterations=20000)
    train.add_argument("--architecture", choices=["scn", "unet"], default="scn")
    train.add_argument("--grid-size", type=int, nargs="+", default=None,
                       help="network input size in voxels, x y [z] (default: 512 512 in 2D, 96 96 96 in 3D)")
    train.add_argument("--grid-spacing", type=float, nargs="+", default=None,
                       help="network voxel size in mm (default: fit the whole image into the grid)")
    train.add_argument("--filters", type=int, help="filters per level (default: 128 in 2D, 64 in 3D)")
    train.add_argument("--levels", type=int, default=4)
    train.add_argument("--spatial-downsample", type=int, help="pooling before the spatial part (default: 16 in 2D, 8 in 3D)")
    train.add_argument("--spatial-kernel", type=int, help="kernel of the spatial part (default: 11 in 2D, 7 in 3D)")
    train.add_argument("--refine-iterations", type=int, default=0,
                       help="then train a local high-resolution refinement stage for this many steps (default: 0, none)")
    train.add_argument("--refine-spacing", type=float, default=None,
                       help="pixel size of the refinement crops in mm (default: about a third of the global grid's)")

    finetune = commands.add_parser(
        "finetune", help="improve a model with your own corrected cases",
        description="Fine-tune a model on your cases with the recipe chosen for their number (for a two-stage "
                    "model: the local refinement stage). Landmarks are matched by name; a point a case lacks is "
                    "missing. The result is checked by cross-validation on your cases (3 or more) and written only "
                    "when it is better than the starting model, with both errors reported.")
    finetune.add_argument("--from-model", required=True, help="model file (or installed model name) to start from")
    _data_args(finetune)
    finetune.add_argument("--output", required=True, type=Path, help="model file to write (.scn.pt); never overwritten")
    finetune.add_argument("--iterations", type=int, default=None,
                          help="optimiser steps per training run (default: the recipe's, 200 for up to 10 cases, "
                               f"fewer where they would not end within {DEFAULT_TIME_LIMIT_S / 60:g} minutes on this "
                               "computer)")
    finetune.add_argument("--time-budget", type=float, metavar="SECONDS",
                          help="wall-time budget for the whole run: as many steps as fit (with --iterations: at most those)")
    finetune.add_argument("--new-landmarks", action="store_true",
                          help="the cases define a different landmark set: train new output heads")
    finetune.add_argument("--keep-worse", action="store_true", help="write the new model even when it is not better")
    finetune.add_argument("--seed", type=int, default=0)
    _device_arg(finetune)

    evaluate = commands.add_parser("evaluate", help="measure a model against annotations",
                                   description="Detect on annotated images and report errors in mm (MRE, SDR).")
    evaluate.add_argument("--model", help="model file (.scn.pt) or the name of an installed model (default: the bundled default)")
    _data_args(evaluate)
    evaluate.add_argument("--output", type=Path, default=Path("scn-evaluation"), help="report folder")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing report")
    _device_arg(evaluate)

    info = commands.add_parser("info", help="list the installed models, or show what one model file contains")
    info.add_argument("model", nargs="?", help="model file or installed model name (none: list the installed models)")
    info.add_argument("--json", action="store_true", help="the summary as JSON (for scripts): stages, grid, landmarks, training, error model")
    return parser


def _resolve_model(name: str | None) -> Path:
    from ..models.catalog import find_model
    from ..common.progress import TextProgressBar

    return find_model(name, progress=TextProgressBar())  # the bar shows only when a catalog model is fetched


def _spacing(values: Sequence[float] | None, dimension: int | None = None) -> tuple[float, ...] | float | None:
    """The ``--spacing`` values: one number means the same size on every axis, whatever the image."""
    if values is None:
        return None
    if not all(math.isfinite(value) and value > 0 for value in values):
        msg = f"--spacing takes pixel sizes in mm, positive numbers; got {' '.join(f'{value:g}' for value in values)}"
        raise ValueError(msg)
    if len(values) == 1:
        return tuple(values) * dimension if dimension is not None else float(values[0])
    return tuple(values)


def _load_data(args: argparse.Namespace, *, ids_path: Path | None = None):  # noqa: ANN202
    from ..data.dataset import load_cases, read_id_list, read_landmark_names

    names = descriptions = None
    if args.names is not None:
        names, descriptions = read_landmark_names(args.names)
    ids_file = ids_path if ids_path is not None else args.ids
    return load_cases(args.images, dimension=args.dimension, landmarks=args.landmarks, units=args.units,
                      ids=read_id_list(ids_file) if ids_file else None,
                      spacing=_spacing(args.spacing, args.dimension), names=names, descriptions=descriptions)


class _CancelOnInterrupt:
    """First Ctrl-C asks training to stop cleanly (checkpoint kept); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this iteration (Ctrl-C again to abort)...", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested


def _run_training(args: argparse.Namespace, model, cases) -> int:  # noqa: ANN001
    from ..imaging.augmentation import AugmentationConfig
    from ..common.progress import TextProgressBar
    from ..learning.training import TrainingConfig, train_model

    validation = _load_data(args, ids_path=args.validation_ids) if args.validation_ids else None
    config = TrainingConfig(
        iterations=args.iterations, batch_size=args.batch_size, learning_rate=args.learning_rate,
        validate_every=args.validate_every, seed=args.seed, device=args.device, num_workers=args.workers,
        time_budget_s=args.time_budget, checkpoint_every=args.checkpoint_every,
        augmentation=AugmentationConfig.none() if args.no_augmentation else AugmentationConfig(),
    )
    refine_steps = args.refine_iterations
    global_output = args.output.with_name("global-" + args.output.name) if refine_steps else args.output
    # Always a resumable state: Ctrl-C or a crash keeps it, a finished run removes it.
    checkpoint = args.checkpoint or args.output.with_name(args.output.name + ".ckpt")
    cancel = _CancelOnInterrupt()
    if not (refine_steps and args.resume and global_output.exists()):
        result = train_model(cases, model, output=global_output, config=config, validation_cases=validation,
                             checkpoint=checkpoint, resume=args.resume, progress=TextProgressBar(),
                             should_cancel=cancel)
    else:  # resuming a run whose global stage was already written: go on with the local stage
        from ..models.model_file import load_model
        from ..learning.training import TrainingResult

        result = TrainingResult(load_model(global_output), global_output, 0, [], None, 0.0, args.device)
    # Under torchrun every process trains; process 0 alone reports and writes (see learning/distributed.py).
    main_process = int(os.environ.get("RANK", "0")) == 0
    say = print if main_process else (lambda *_args, **_kwargs: None)
    best = result.best_validation_mre_mm
    say(f"Wrote {result.output} after {result.iterations} iterations in {result.seconds:.0f} s on {result.device}"
        + (f"; best validation MRE {best:.2f} mm" if best is not None else ""))
    if refine_steps:
        from ..learning.refinement_training import RefinerTrainingConfig, attach_refiner, train_refiner

        spacing = args.refine_spacing or _default_refine_spacing(result.model, cases[0])
        attach_refiner(result.model, spacing_mm=spacing)
        refined = train_refiner(cases, result.model, output=args.output,
                                config=RefinerTrainingConfig(iterations=refine_steps, device=args.device, seed=args.seed,
                                                             checkpoint_every=args.checkpoint_every),
                                validation_cases=validation, progress=TextProgressBar(), should_cancel=cancel,
                                checkpoint=checkpoint.with_name(checkpoint.name + ".local"),
                                resume=args.resume and checkpoint.with_name(checkpoint.name + ".local").exists())
        best = refined.best_validation_mre_mm
        say(f"Wrote {refined.output} (global + refinement stage) after {refined.seconds:.0f} s more"
            + (f"; best validation MRE {best:.2f} mm" if best is not None else ""))
        result = refined
    if not main_process:
        return 0
    from ..models.model_file import save_model
    from ..learning.quality_fitting import fit_point_quality
    from ..learning.training import split_cases

    # The same validation cases the training used (its own split when none were given).
    shape_cases, checked = (cases, validation) if validation else split_cases(list(cases), config.validation_fraction, config.seed)
    print(fit_point_quality(result.model, shape_cases, checked, device=args.device))
    save_model(result.model, result.output, overwrite=True)  # the file this run just wrote, now with both parts
    return 0


def _default_refine_spacing(model, case) -> float:  # noqa: ANN001
    """A third of the global grid's pixel size on this case, but no finer than its own pixels."""
    import numpy as np

    from ..imaging.grid import SamplingTransform

    image = case.image.as_dimension(model.dimension)
    base = SamplingTransform.for_image(image.geometry, model.grid)
    return float(max(np.min(base.spacing) / 3.0, np.min(image.geometry.spacing)))


def _command_train(args: argparse.Namespace) -> int:
    from ..imaging.grid import GridSpec
    from ..models.model import create_model
    from ..models.network import NetworkConfig

    from ..common.atomic import check_writable
    from ..learning.finetuning import case_landmark_set

    check_writable(args.output, overwrite=False)  # before the work, not after it
    cases = _load_data(args)
    if not cases:
        msg = f"No training cases found in {args.images}: each image needs its landmarks (a .mrk.json beside it or a --landmarks CSV row)"
        raise ValueError(msg)
    # Every case's landmarks, matched by name (a case that lacks one has it missing), in a fixed order.
    names, descriptions = case_landmark_set(cases)
    paper = NetworkConfig.paper_2d if args.dimension == 2 else NetworkConfig.paper_3d
    overrides = {k: v for k, v in {"architecture": args.architecture, "filters": args.filters, "levels": args.levels,
                                   "spatial_downsample": args.spatial_downsample,
                                   "spatial_kernel": args.spatial_kernel}.items() if v is not None}
    config = paper(len(names), **overrides)
    size = tuple(args.grid_size) if args.grid_size else ((512, 512) if args.dimension == 2 else (96, 96, 96))
    if len(size) != args.dimension:
        msg = f"--grid-size needs {args.dimension} numbers for a {args.dimension}D model"
        raise ValueError(msg)
    grid = GridSpec(size=size, spacing=_spacing(args.grid_spacing, args.dimension))
    model = create_model(config, grid=grid, landmark_names=names, landmark_descriptions=descriptions)
    return _run_training(args, model, cases)


def _command_finetune(args: argparse.Namespace) -> int:
    from ..learning.finetuning import fine_tune
    from ..common.progress import TextProgressBar

    cases = _load_data(args)
    report = fine_tune(cases, _resolve_model(args.from_model), output=args.output, iterations=args.iterations,
                       time_budget_s=args.time_budget, new_landmarks=args.new_landmarks, keep_worse=args.keep_worse,
                       device=args.device, seed=args.seed, progress=TextProgressBar(),
                       should_cancel=_CancelOnInterrupt())
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun process 0 reports
        return 0
    for fold in report.per_fold:
        print(f"  held out {', '.join(fold['held_out'])}: starting model {fold['start_mm']:.2f} mm, "
              f"fine-tuned {fold['new_mm']:.2f} mm")
    print(f"{report.message} ({report.seconds:.0f} s; trained: {' + '.join(report.stages)} stage)")
    return 0


def shard(images: Sequence[Path], spec: str) -> list[Path]:
    """The K-th of N shares of ``images`` ("K/N", K from 1): every image in exactly one share.

    Images are dealt by their sorted path, round robin, so the shares do not depend on the order
    the file system lists them in and stay balanced.
    """
    try:
        number, count = (int(part) for part in spec.split("/"))
    except ValueError:
        number = count = 0
    if not 1 <= number <= count:
        msg = f"--shard must be K/N with 1 <= K <= N, for example 2/8; got {spec!r}"
        if number == 0 and count > 0:
            msg += f" (K counts from 1: for a job array numbered from 0, pass $((TASK_ID + 1))/{count})"
        raise ValueError(msg)
    ordered = sorted(images, key=lambda path: str(path))
    return ordered[number - 1 :: count]


def _command_detect(args: argparse.Namespace) -> int:
    from ..inference.batch import detect_files, output_name_clashes
    from ..imaging.image_io import find_images, is_dicom_folder, output_stem, read_image, single_file_dicom_images
    from ..inference.overlay import write_overlay_png
    from ..common.progress import TextProgressBar

    model_path = _resolve_model(args.model)
    source: Path = args.input.expanduser()
    if not source.exists():
        msg = f"Input not found: {source} (no such image file or folder)"
        raise FileNotFoundError(msg)
    one_series = is_dicom_folder(source) and not single_file_dicom_images(source)
    images = [source] if source.is_file() or one_series else find_images(source)
    if not images:
        msg = f"No images found in {source}"
        raise ValueError(msg)
    clashes = output_name_clashes(images)
    if clashes:
        pairs = "; ".join(f"{a.name} and {b.name}" for a, b in clashes[:5])
        msg = (f"{len(clashes)} image{'s' if len(clashes) > 1 else ''} would be saved under the name of another "
               f"({pairs}{'; ...' if len(clashes) > 5 else ''}); rename one of each pair, nothing was detected")
        raise ValueError(msg)
    # An overlay is a PNG named like its image: never one of the images themselves.
    inputs = {image.resolve() for image in images}
    if args.shard is not None:
        images = shard(images, args.shard)
        if not images:
            print(f"Shard {args.shard}: no images in this share")
            return 0
    spacing = _spacing(args.spacing)

    def overlay(item) -> None:  # noqa: ANN001
        if not args.overlay or item.landmarks is None:
            return
        target = args.output / f"{output_stem(item.image)}.png"
        try:
            if target.resolve() in inputs:
                msg = f"{target} is one of the input images, which is never replaced; choose another output folder"
                raise FileExistsError(msg)
            write_overlay_png(read_image(item.image, spacing=spacing), item.landmarks, target, overwrite=args.overwrite,
                              low_confidence_threshold=args.threshold)
        except (OSError, ValueError) as error:  # the landmarks are written and summarised all the same
            note = f"overlay not written: {error}"
            item.warning = note if item.warning is None else f"{item.warning}; {note}"

    report = detect_files(images, args.output, model_path, device=args.device, spacing=spacing,
                          low_confidence_threshold=args.threshold, check_above_mm=args.check_above,
                          overwrite=args.overwrite, progress=TextProgressBar() if len(images) > 1 else None,
                          on_item=overlay)
    print(f"Model {model_path.name} on {report.device}")
    for item in report.items:
        if item.error:
            print(f"  {'SKIPPED' if item.skipped else 'FAILED'} {item.image.name}: {item.error}")
            continue
        to_check = [n for n, c in zip(item.landmarks.names, item.landmarks.check) if c] if item.landmarks.check is not None else []
        print(f"  {item.image.name}: {len(item.landmarks)} landmarks in {item.seconds:.2f} s -> {item.output}"
              + (f"; check {len(to_check)}: {', '.join(to_check)}" if to_check else ""))
        if item.warning:
            print(f"  WARNING {item.image.name}: {item.warning}")
    if report.summary_csv:
        print(f"Summary: {report.summary_csv}")
    if report.review_csv and len(report.review_order) > 1:
        print(f"Review first (expected error, points to check; all in {report.review_csv}):")
        for image, expected, checks in report.review_order[:10]:
            print(f"  {image}: {expected:.2f} mm, {checks} to check")
    # Results kept from an earlier run are not a failure: a rerun with nothing new to do succeeds.
    return 0 if all(item.skipped for item in report.failed) else EXIT_ERROR


def _command_evaluate(args: argparse.Namespace) -> int:
    from ..inference.detection import Detector
    from ..inference.evaluation import check_evaluation_folder, evaluate, format_summary, named_like_model, write_evaluation
    from ..common.progress import Progress, TextProgressBar, estimate_eta
    from ..data.landmarks import default_names

    check_evaluation_folder(args.output, overwrite=args.overwrite)  # before the work, not after it
    cases = _load_data(args)
    detector = Detector(_resolve_model(args.model), device=args.device)
    model_names = list(detector.model.landmark_names)
    columns = len(cases[0].landmarks) if cases else 0
    if args.landmarks and args.names is None and model_names == default_names(len(model_names)) and columns != len(model_names):
        # A table's columns are numbered like the model's landmarks (L1, L2, ...): one column more or
        # less would pair unrelated points by number.
        msg = (f"The landmark table has {columns} landmarks per image and the model {len(model_names)}, all "
               "unnamed (L1, L2, ...): the columns cannot be matched. Check that the table is the right one, or "
               "give --names with the model's name (L1, L2, ...) of each column")
        raise ValueError(msg)
    references = [named_like_model(case.landmarks, model_names) for case in cases]
    bar = TextProgressBar()
    rows, warned = [], []
    start = time.monotonic()
    for number, (case, reference) in enumerate(zip(cases, references)):
        rows.append((case.name, detector.detect(case.image), reference))
        if detector.last_warning:
            warned.append((case.name, detector.last_warning))
        elapsed = time.monotonic() - start
        bar(Progress("evaluate", number + 1, len(cases), elapsed, estimate_eta(number + 1, len(cases), elapsed)))
    report = evaluate(rows)
    write_evaluation(report, args.output, overwrite=args.overwrite)
    print(format_summary(report))
    print(f"Report: {args.output}")
    if warned:  # errors in mm mean nothing at a wrong pixel size: said last, where it is seen
        names = ", ".join(name for name, _ in warned[:5]) + (", ..." if len(warned) > 5 else "")
        print(f"WARNING: {len(warned)} of {len(rows)} images ({names}): {warned[0][1]}")
    return 0


def _command_info(args: argparse.Namespace) -> int:
    import json

    from ..models.model_file import load_model, read_model_description

    if args.model is None:
        return _list_installed_models()
    path = _resolve_model(args.model)
    load_model(path)  # checks the whole file (weights and description), not only what is shown
    description = read_model_description(path)
    info = dict(description.info)
    refiner_training = info.pop("refiner_training", {}) if isinstance(info.get("refiner_training"), dict) else {}
    info["refiner_training"] = {k: refiner_training.get(k) for k in ("iterations", "best_validation_mre_mm", "seconds")}
    training = info.pop("training", {}) if isinstance(info.get("training"), dict) else {}
    summary = {
        "network": description.network,
        "grid": {"size": list(description.grid_size),
                 "spacing": None if description.grid_spacing is None else list(description.grid_spacing)},
        "landmarks": list(description.landmark_names),
        "info": info,
        "training": {k: training.get(k) for k in ("iterations", "best_validation_mre_mm", "seconds", "device")},
        "refinement_stage": description.refiner,
        "expected_errors": None if not description.error_model else {
            **{key: description.error_model.get(key) for key in ("signals", "check_above_mm", "fitted_on")},
            "squared_terms": description.error_model.get("squared_weights") is not None},
        "shape_model": bool(description.shape_model),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    network, refiner, errors, trained = summary["network"], summary["refinement_stage"], summary["expected_errors"], summary["training"]
    grid = " x ".join(str(n) for n in summary["grid"]["size"])
    grid_spacing = summary["grid"]["spacing"]
    lines = [
        f"{path.name}  ({path})",
        "  checksums of the weights and of the description: intact",
        f"  {network.get('dimension')}D, {len(summary['landmarks'])} landmarks: {', '.join(summary['landmarks'])}",
        f"  global stage: {network.get('architecture', 'scn').upper()}, {network.get('filters')} filters, grid {grid} "
        + ("(the whole image fitted into it)" if grid_spacing is None else f"at {' x '.join(f'{v:g}' for v in grid_spacing)} mm"),
    ]
    if trained.get("iterations"):
        seconds = finite_or_none(trained.get("seconds"))
        minutes = "" if seconds is None else f" in {seconds / 60:.1f} min"
        best = finite_or_none(trained.get("best_validation_mre_mm"))
        lines.append(f"    trained {trained['iterations']} steps{minutes} on {trained.get('device') or '?'}"
                     + ("" if best is None else f", best validation error {best:.2f} mm"))
    if refiner:
        members = refiner.get("members", 1)
        lines.append(f"  local stage: {members} network{'s' if members != 1 else ''}, crops of {refiner.get('patch_size')} "
                     f"pixels at {finite_or_none(refiner.get('spacing_mm')) or '?'} mm")
    lines.append(f"  shape model: {'yes' if summary['shape_model'] else 'no'}")
    if errors:
        threshold = finite_or_none(errors.get("check_above_mm"))
        lines.append(f"  expected errors: from {', '.join(map(str, errors.get('signals') or []))}; points above "
                     f"{'?' if threshold is None else f'{threshold:.2f}'} mm are to be checked")
        if errors.get("fitted_on"):
            lines.append(f"    fitted on {errors['fitted_on']}")
    else:
        lines.append("  expected errors: none (points of low confidence are flagged instead)")
    if info.get("parent_model"):
        lines.append(f"  fine-tuned from {info['parent_model']}")
    lines.append(f"As JSON: scn-landmarks info {args.model} --json")
    print("\n".join(lines))
    return 0


def _list_installed_models() -> int:
    from ..models.catalog import list_models

    entries = list_models()
    if not entries:
        print("No models installed; name a model file (.scn.pt) instead")
        return 0
    print("Installed models (* the default; give the first word, or the path, to --model):")
    for entry in entries:
        what = (f"{entry.dimension}D, {entry.landmark_count} landmarks" if entry.error is None else f"unusable: {entry.error}")
        stem = entry.path.name.removesuffix(".scn.pt")
        title = "" if entry.name == stem else f" \"{entry.name}\""
        print(f"{'*' if entry.default else ' '} {stem}{title}: {what} ({entry.source}, {entry.path})")
    return 0


COMMANDS = {"detect": _command_detect, "train": _command_train, "finetune": _command_finetune,
            "evaluate": _command_evaluate, "info": _command_info}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scn-landmarks`` command; returns the exit code."""
    from ..common.errors import ModelFileError, TrainingCancelled, unexpected_error_message

    for stream in (sys.stdout, sys.stderr):  # a console or log of another encoding (Windows) must not end the run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except TrainingCancelled as cancelled:
        print(str(cancelled), file=sys.stderr)
        if cancelled.checkpoint is not None and args.command == "train":  # the command that takes --resume
            # The network is rebuilt from the options: resuming needs every one of them again.
            again = arguments if "--resume" in arguments else [*arguments, "--resume"]
            command = subprocess.list2cmdline(again) if os.name == "nt" else shlex.join(again)
            print(f"To resume: scn-landmarks {command}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:  # before training started (for example while the cases load)
        print(f"scn-landmarks {args.command}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except (ValueError, OSError, ModelFileError, FloatingPointError) as error:  # OSError: files, disks, permissions
        print(f"scn-landmarks {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # noqa: BLE001 - from torch (out of memory, a failed kernel) or a bug of ours: one line
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else f" (scn-landmarks --verbose {args.command} ... shows where)"
        print(f"scn-landmarks {args.command}: error: {unexpected_error_message(error, args.command)}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
