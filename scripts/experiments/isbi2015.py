"""Shared helpers of the ISBI 2015 and hand9 experiments: data, splits, ground truths, outputs.

The experiment scripts beside this file (``train_isbi.py``, ``few_cases.py``,
``hand_transfer.py``, ``detection_speed.py``) import it. Run on its own, it (re)writes or
checks the committed split lists::

    python scripts/experiments/isbi2015.py --check     # the committed lists are what the seed gives
    python scripts/experiments/isbi2015.py --write     # regenerate them (only if the protocol changes)

Protocol (see README.md in this folder):

* Data: ``<data>/isbi2015`` (lateral cephalograms, 0.1 mm pixels, landmark CSVs in mm) and
  ``<data>/hand9`` (hand radiographs, landmark CSV in pixels, spacing in the .mha header).
  ``<data>`` is ``--data``, else ``$SCN_DATA_DIR``, else ``<repository>/../shared/data``.
* Splits, all drawn from ``isbi2015/splits/train.txt`` (001-150) only, with one seeded
  permutation (``SPLIT_SEED``): its first 15 ids are ``validation.txt``; the other 135, in
  permutation order, give the nested few-case subsets ``train_N5 ⊂ train_N10 ⊂ train_N25
  ⊂ train_N50 ⊂ train_N135`` (all disjoint from validation); ``train_N150`` is all of
  train.txt (it contains the validation ids; few-case runs do no validation, see
  few_cases.py). ``test1.txt`` (151-300) is only ever used for reporting.
* Ground truths: ``senior`` (the senior doctor's annotation, as Payer et al. 2019) and
  ``mean`` (the mean of the senior and junior positions, as most papers).
* hand9: the 9 ids sorted, permuted with ``HAND_SEED`` and cut into 3 folds of 3 test
  images; fold 1 is "the" 6-train / 3-test split; the others let every image be tested once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
SPLITS = HERE / "splits"
RESULTS = HERE / "results"
NAMES_FILE = REPOSITORY / "SCNLandmarks" / "Resources" / "LandmarkSets" / "isbi2015_cephalometric.txt"
MODEL_CARD_TEMPLATE = REPOSITORY / "SCNLandmarks" / "Resources" / "Models" / "MODEL_CARD_TEMPLATE.md"

ISBI_SPACING = (0.1, 0.1)  # mm per pixel (x, y); the JPEG files carry no spacing
SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)
HAND_RADII_MM = (2.0, 4.0, 10.0)  # the hand literature (Payer et al.) reports 2, 4 and 10 mm
HAND_LANDMARKS = 37
SPLIT_SEED = 20150  # seeds the permutation of train.txt behind every ISBI split list
HAND_SEED = 9  # seeds the permutation of the 9 hand ids behind the 3 folds
VALIDATION_COUNT = 15
FEW_CASE_SIZES = (5, 10, 25, 50, 150)
GROUND_TRUTHS = ("senior", "mean")
DATA_ENV = "SCN_DATA_DIR"

# The small CPU configuration of --quick. Its numbers are a pipeline check, never a result
# of the reference protocol: every output of a quick run says so.
QUICK_GRID = 192  # ~1.25 mm per grid pixel: coarse, but several hundred steps fit in minutes on one core
QUICK_FILTERS = 16
QUICK_TEST_IMAGES = 30
QUICK_LEARNING_RATE = 5e-4  # short runs need a faster start than the full-scale 1e-4
FULL_LEARNING_RATE = 1e-4
# Full-scale network input: the whole 193.5 x 240 mm cephalogram fitted into 512 x 512
# (about 0.47 mm per grid pixel), as in the SCN paper; 128 filters.
FULL_GRID = 512
FULL_FILTERS = 128


# --------------------------------------------------------------------------- data folders


def find_data_folder(argument: str | os.PathLike[str] | None = None) -> Path:
    """The shared data folder: ``argument``, else ``$SCN_DATA_DIR``, else ``<repo>/../shared/data``.

    Raises:
        FileNotFoundError: the folder does not exist, with what to set.
    """
    if argument:
        folder, origin = Path(argument).expanduser(), "--data"
    elif os.environ.get(DATA_ENV):
        folder, origin = Path(os.environ[DATA_ENV]).expanduser(), DATA_ENV
    else:
        folder, origin = REPOSITORY.parent / "shared" / "data", "the default location"
    if not folder.is_dir():
        msg = (
            f"The data folder {folder} (from {origin}) does not exist. Pass --data or set {DATA_ENV} "
            "to the folder that holds isbi2015/ and hand9/ (see /work/shared/data/README.md)."
        )
        raise FileNotFoundError(msg)
    return folder


def isbi_folder(data: Path) -> Path:
    """``<data>/isbi2015`` after checking its layout (images/, landmarks/, splits/)."""
    folder = data / "isbi2015"
    needed = [folder / "images", folder / "landmarks" / "senior.csv", folder / "landmarks" / "junior.csv",
              folder / "splits" / "train.txt", folder / "splits" / "test1.txt"]
    missing = [str(p.relative_to(data)) for p in needed if not p.exists()]
    if missing:
        msg = f"The ISBI 2015 data in {data} is incomplete; missing: {', '.join(missing)}. Set {DATA_ENV} or --data."
        raise FileNotFoundError(msg)
    return folder


def hand_folder(data: Path) -> Path:
    """``<data>/hand9`` after checking its layout (images/, landmarks.csv)."""
    folder = data / "hand9"
    if not (folder / "images").is_dir() or not (folder / "landmarks.csv").is_file():
        msg = f"No hand9 data in {data} (expected hand9/images/ and hand9/landmarks.csv). Set {DATA_ENV} or --data."
        raise FileNotFoundError(msg)
    return folder


# --------------------------------------------------------------------------- split lists


def _read_ids(path: Path) -> list[str]:
    from SCNLandmarksLib.data.dataset import read_id_list

    if not path.is_file():
        msg = f"Split list {path} is missing; the committed lists come with the repository (isbi2015.py --write)"
        raise FileNotFoundError(msg)
    return read_id_list(path)


def generate_isbi_splits(train_ids: Sequence[str], *, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Validation list and nested few-case subsets from the challenge's train ids.

    Returns:
        ``{"validation": 15 ids, "train_N5": ..., "train_N135": ..., "train_N150": ...}``, each
        sorted; see the module docstring for how they relate.
    """
    train_ids = sorted(train_ids)
    if len(train_ids) <= VALIDATION_COUNT + max(n for n in FEW_CASE_SIZES if n < len(train_ids)):
        msg = f"{len(train_ids)} training ids are too few for the split protocol"
        raise ValueError(msg)
    order = [train_ids[i] for i in np.random.default_rng(seed).permutation(len(train_ids))]
    validation, rest = order[:VALIDATION_COUNT], order[VALIDATION_COUNT:]
    splits = {"validation": sorted(validation), f"train_N{len(rest)}": sorted(rest)}
    for size in FEW_CASE_SIZES:
        splits[f"train_N{size}"] = sorted(train_ids) if size >= len(train_ids) else sorted(rest[:size])
    return splits


def _split_header(name: str, count: int, total: int) -> str:
    if name == "validation":
        what = (f"validation list: the first {count} ids of the seeded permutation of train.txt; "
                "never trained on except in train_N150")
    elif count >= total:
        what = "all of train.txt (includes the validation ids; runs on it do no validation)"
    else:
        what = (f"training subset N={count}: the first {count} ids of the seeded permutation of train.txt "
                "after the validation ids (nested: N5 ⊂ N10 ⊂ N25 ⊂ N50 ⊂ N135; disjoint from validation)")
    return (f"# ISBI 2015 {what}.\n"
            f"# Generated by scripts/experiments/isbi2015.py --write, numpy default_rng({SPLIT_SEED}).permutation "
            f"of the {total} sorted ids of isbi2015/splits/train.txt. Do not edit by hand.\n")


def generate_hand_folds(ids: Sequence[str], *, seed: int = HAND_SEED) -> list[list[str]]:
    """3 test folds of 3 hand ids each (sorted ids permuted with ``seed``)."""
    ids = sorted(ids)
    if len(ids) != 9:
        msg = f"The hand protocol expects 9 images, got {len(ids)}"
        raise ValueError(msg)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return [sorted(order[k : k + 3]) for k in range(0, 9, 3)]


def split_files(data: Path) -> dict[str, str]:
    """The text of every committed split file, generated from the data's own id lists."""
    folder = isbi_folder(data)
    train = _read_ids(folder / "splits" / "train.txt")
    texts = {}
    for name, ids in generate_isbi_splits(train).items():
        texts[f"{name}.txt"] = _split_header(name, len(ids), len(train)) + "\n".join(ids) + "\n"
    hand_ids = sorted(read_landmark_rows(hand_folder(data) / "landmarks.csv"))
    for number, fold in enumerate(generate_hand_folds(hand_ids), start=1):
        header = (f"# hand9 fold {number}: the 3 test images; the other 6 of the 9 train. Generated by "
                  f"scripts/experiments/isbi2015.py --write, numpy default_rng({HAND_SEED}).permutation of "
                  "the 9 sorted ids, cut into 3 folds. Fold 1 is the reference 6/3 split.\n")
        texts[f"hand9_fold{number}_test.txt"] = header + "\n".join(fold) + "\n"
    return texts


def read_split(name: str, *, folder: Path = SPLITS) -> list[str]:
    """A committed split list, e.g. ``read_split("train_N25")`` or ``read_split("validation")``."""
    return _read_ids(folder / f"{name}.txt")


def checked_training_ids(name: str, isbi: Path) -> list[str]:
    """A committed ISBI split list, checked to lie inside the data's own train.txt (no test leak)."""
    ids = read_split(name)
    allowed = set(_read_ids(isbi / "splits" / "train.txt"))
    outside = [i for i in ids if i not in allowed]
    if outside:
        msg = f"Split {name} has ids outside isbi2015/splits/train.txt ({', '.join(outside[:5])}); refusing to train on them"
        raise ValueError(msg)
    return ids


def test1_ids(isbi: Path, limit: int | None = None) -> list[str]:
    """The test1 ids; with ``limit``, that many spread evenly over the list (first and last included)."""
    ids = _read_ids(isbi / "splits" / "test1.txt")
    return spread(ids, limit)


def spread(ids: Sequence[str], limit: int | None) -> list[str]:
    """``limit`` items spread evenly over ``ids`` (all of them when ``limit`` is None or large)."""
    ids = list(ids)
    if limit is None or limit >= len(ids):
        return ids
    if limit < 1:
        msg = f"Need at least one test image, got {limit}"
        raise ValueError(msg)
    picks = np.unique(np.round(np.linspace(0, len(ids) - 1, limit)).astype(int))
    return [ids[i] for i in picks]


def hand_fold_ids(fold: int, all_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train ids, test ids) of hand fold 1, 2 or 3 from the committed fold lists."""
    test = read_split(f"hand9_fold{fold}_test")
    unknown = [i for i in test if i not in all_ids]
    if unknown:
        msg = f"hand9 fold {fold} names images that are not in the data: {', '.join(unknown)}"
        raise ValueError(msg)
    return [i for i in sorted(all_ids) if i not in test], test


# --------------------------------------------------------------------------- cases and truths


def landmark_names() -> tuple[list[str], list[str]]:
    """The 19 ISBI landmark names and definitions, in CSV column order."""
    from SCNLandmarksLib.data.dataset import read_landmark_names

    return read_landmark_names(NAMES_FILE)


def read_landmark_rows(path: Path) -> list[str]:
    """The image ids of a challenge CSV (first column), in file order."""
    return [line.split(",", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_ground_truths(isbi: Path, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{"senior": {id: Landmarks}, "mean": {id: Landmarks}}`` in LPS mm (= pixel x 0.1 mm).

    The mean is the point-wise mean of the senior and junior positions.
    """
    from SCNLandmarksLib.data.landmark_io import read_landmark_csv
    from SCNLandmarksLib.data.landmarks import Landmarks

    names, descriptions = landmark_names()
    tables = {who: read_landmark_csv(isbi / "landmarks" / f"{who}.csv", dimension=2, names=names)
              for who in ("senior", "junior")}
    truths: dict[str, dict[str, Any]] = {"senior": {}, "mean": {}, "junior": {}}
    for image_id in ids:
        for who in ("senior", "junior"):
            if image_id not in tables[who]:
                msg = f"isbi2015/landmarks/{who}.csv has no row for image {image_id}"
                raise ValueError(msg)
        senior, junior = tables["senior"][image_id], tables["junior"][image_id]
        truths["senior"][image_id] = Landmarks(names, senior.positions, descriptions)
        truths["junior"][image_id] = Landmarks(names, junior.positions, descriptions)
        truths["mean"][image_id] = Landmarks(names, 0.5 * (senior.positions + junior.positions), descriptions)
    return truths


def load_isbi_cases(isbi: Path, ids: Sequence[str], *, annotation: str = "senior") -> list[Any]:
    """ISBI images as training cases, their landmarks from ``annotation`` ("senior" or "mean")."""
    from SCNLandmarksLib.data.dataset import load_cases

    if annotation not in ("senior", "mean"):
        msg = f"Unknown annotation {annotation!r}; use 'senior' or 'mean'"
        raise ValueError(msg)
    names, descriptions = landmark_names()
    cases = load_cases(isbi / "images", dimension=2, landmarks=isbi / "landmarks" / "senior.csv", ids=list(ids),
                       spacing=ISBI_SPACING, names=names, descriptions=descriptions)
    if annotation == "mean":
        cases = with_landmarks(cases, load_ground_truths(isbi, ids)["mean"])
    return cases


def load_validation_cases(data: str | os.PathLike[str] | None) -> tuple[list[str], list[Any]]:
    """The committed validation split's ids and cases (mean of both doctors), from ``--data`` or its default."""
    isbi = isbi_folder(find_data_folder(data))
    ids = checked_training_ids("validation", isbi)
    return ids, load_isbi_cases(isbi, ids, annotation="mean")


def with_landmarks(cases: Sequence[Any], table: Mapping[str, Any]) -> list[Any]:
    """The same images (shared, not copied) with the landmarks of ``table[case.name]``."""
    from SCNLandmarksLib.data.training_case import TrainingCase

    return [TrainingCase(case.image, table[case.name], case.name) for case in cases]


def image_paths(images: Path, ids: Sequence[str]) -> list[Path]:
    """The image file of every id, in the order of ``ids``."""
    from SCNLandmarksLib.inference.batch import find_images, output_stem

    files = {output_stem(p): p for p in find_images(images)}
    missing = [i for i in ids if i not in files]
    if missing:
        msg = f"No image file in {images} for ids: {', '.join(missing[:5])}"
        raise FileNotFoundError(msg)
    return [files[i] for i in ids]


def hand_names() -> list[str]:
    """Names of the 37 hand landmarks (the data set numbers them; it does not name them)."""
    return [f"hand{i:02d}" for i in range(1, HAND_LANDMARKS + 1)]


def load_hand_cases(hand: Path, ids: Sequence[str]) -> list[Any]:
    """hand9 cases; the CSV's pixel indices go through each .mha header's spacing to mm."""
    from SCNLandmarksLib.data.dataset import load_cases

    return load_cases(hand / "images", dimension=2, landmarks=hand / "landmarks.csv", units="pixel",
                      ids=list(ids), names=hand_names())


# --------------------------------------------------------------------------- evaluation


def evaluate_against(predictions: Mapping[str, Any], truths: Mapping[str, Mapping[str, Any]],
                     *, radii: Sequence[float] = SDR_RADII_MM) -> dict[str, dict[str, Any]]:
    """One evaluation report (see ``SCNLandmarksLib.inference.evaluation.evaluate``) per ground truth."""
    from SCNLandmarksLib.inference.evaluation import evaluate

    return {name: evaluate([(i, predictions[i], table[i]) for i in predictions], radii=radii)
            for name, table in truths.items()}


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of a report: MRE, std, median (mm), SDR per radius (fraction), counts."""
    overall = report["overall"]
    return {
        "mre_mm": overall["mre_mm"],
        "std_mm": overall["std_mm"],
        "median_mm": overall["median_mm"],
        "sdr": dict(overall["sdr"]),
        "num_cases": report["num_cases"],
        "num_points": overall["num_evaluated"],
    }


def per_landmark(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """MRE, std and SDR per landmark name."""
    return {name: {"mre_mm": v["mre_mm"], "std_mm": v["std_mm"], "sdr": dict(v["sdr"])}
            for name, v in report["per_landmark"].items()}


def detect_all(model: Any, cases: Sequence[Any], device: str, *, refine: bool = True) -> tuple[dict[str, Any], float]:
    """Predicted landmarks per case name and the wall seconds of detection (preprocessing included).

    ``refine=False`` uses the global stage only (for the ablation of two-stage models).
    """
    import torch
    from SCNLandmarksLib.inference.detection import Detector

    # Detector switches the network to evaluation mode; a model under training gets its mode back.
    was_training = bool(getattr(getattr(model, "network", None), "training", False))
    detector = Detector(model, device=device, refine=refine)
    predictions = {}
    started = time.perf_counter()
    for case in cases:
        predictions[case.name] = detector.detect(case.image)
    if detector.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    detector.model.network.train(was_training)
    return predictions, seconds


# --------------------------------------------------------------------------- run settings


@dataclass
class Settings:
    """Settings shared by the experiment scripts.

    Attributes:
        quick: the small CPU configuration (not the reference protocol).
        grid_size: network input grid, pixels per side (the image is fitted into it).
        filters: feature channels of the network.
        iterations: optimiser steps per training run.
        batch_size: images per step.
        learning_rate: peak AdamW learning rate.
        num_workers: background processes preparing augmented samples.
        device: "auto", "cpu" or "cuda".
        seed: training seed (initialisation, augmentation).
        test_images: evaluate on this many test images spread over the list (None: all).
        threads: CPU threads for torch (None: torch's default).
    """

    quick: bool
    grid_size: int
    filters: int
    iterations: int
    batch_size: int
    learning_rate: float
    num_workers: int
    device: str
    seed: int
    test_images: int | None
    threads: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> dict[str, Any]:
        """The settings that change a run's result (CPU threads do not), to decide if a run can be reused."""
        values = self.to_dict()
        values.pop("threads")
        return values


def add_common_arguments(parser: argparse.ArgumentParser, *, name: str, full_iterations: int,
                         quick_iterations: int) -> None:
    """The arguments every experiment script takes."""
    parser.add_argument("--data", type=Path, default=None,
                        help=f"folder with isbi2015/ and hand9/ (default ${DATA_ENV} or <repo>/../shared/data)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results folder (default scripts/experiments/results/{name}/, "
                             f"or results/quick-cpu/{name}/ with --quick)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"optimiser steps per training run (default {full_iterations}; {quick_iterations} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small CPU configuration ({QUICK_GRID}x{QUICK_GRID} grid, {QUICK_FILTERS} filters, few "
                             f"iterations, {QUICK_TEST_IMAGES} test images): a pipeline check, NOT the reference protocol")
    parser.add_argument("--grid-size", type=int, default=None,
                        help=f"input grid pixels per side (default {FULL_GRID}; {QUICK_GRID} with --quick)")
    parser.add_argument("--filters", type=int, default=None,
                        help=f"network filters (default {FULL_FILTERS}; {QUICK_FILTERS} with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 2; 1 with --quick)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"peak AdamW learning rate (default {FULL_LEARNING_RATE:g}; {QUICK_LEARNING_RATE:g} with --quick)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="augmentation worker processes (default 8 on a GPU, 0 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (not the split seed)")
    parser.add_argument("--test-images", type=int, default=None,
                        help=f"evaluate on this many test1 images spread over the list "
                             f"(default all; {QUICK_TEST_IMAGES} with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain every run (by default finished runs with the same settings are reused and "
                             "interrupted ones resume from their checkpoint)")


def settings_from_arguments(args: argparse.Namespace, *, full_iterations: int, quick_iterations: int) -> Settings:
    """Resolve defaults: full-scale ones, or the small CPU ones with ``--quick``."""
    import torch
    from SCNLandmarksLib.common.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    quick = bool(args.quick)
    iterations = args.iterations or (quick_iterations if quick else full_iterations)
    test_images = args.test_images if args.test_images is not None else (QUICK_TEST_IMAGES if quick else None)
    workers = args.num_workers if args.num_workers is not None else (8 if device.type == "cuda" else 0)
    batch = args.batch_size or (1 if quick else 2)
    return Settings(quick=quick, grid_size=args.grid_size or (QUICK_GRID if quick else FULL_GRID),
                    filters=args.filters or (QUICK_FILTERS if quick else FULL_FILTERS), iterations=iterations,
                    batch_size=batch, learning_rate=args.learning_rate or (QUICK_LEARNING_RATE if quick else FULL_LEARNING_RATE),
                    num_workers=workers, device=args.device,
                    seed=args.seed, test_images=test_images, threads=args.threads)


def output_folder(args: argparse.Namespace, name: str) -> Path:
    """``--output``, or the default results folder of the experiment (``quick-cpu/`` for quick runs)."""
    folder = args.output or (RESULTS / "quick-cpu" / name if args.quick else RESULTS / name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def quick_note(settings: Settings, *, tested: str | None = None) -> str:
    """The banner every output of a run carries: quick (not the protocol) or the reference protocol.

    ``tested`` describes the test images when they are not ``settings.test_images`` of test1.
    """
    tested = tested or f"{'all' if settings.test_images is None else settings.test_images} test1 images"
    setup = (f"grid {settings.grid_size}x{settings.grid_size}, {settings.filters} filters, "
             f"{settings.iterations} iterations, batch {settings.batch_size}, {tested}")
    reduced = settings.grid_size < FULL_GRID or settings.filters < FULL_FILTERS or settings.test_images is not None
    if settings.quick or reduced:
        return f"QUICK / REDUCED RUN, NOT THE REFERENCE PROTOCOL: {setup}"
    return f"Reference protocol: {setup}"


def training_config(settings: Settings, *, iterations: int | None = None, validate_every: int = 1000) -> Any:
    """The engine's TrainingConfig for these settings (checkpoints every 500 steps for resuming)."""
    from SCNLandmarksLib.learning.training import TrainingConfig

    return TrainingConfig(iterations=iterations or settings.iterations, batch_size=settings.batch_size,
                          learning_rate=settings.learning_rate, validate_every=validate_every,
                          device=settings.device, num_workers=settings.num_workers, seed=settings.seed,
                          checkpoint_every=500, mixed_precision=True)


def new_model(architecture: str, names: Sequence[str], descriptions: Sequence[str] | None, *,
              grid_size: int, filters: int, seed: int | None = None) -> Any:
    """A fresh paper-configuration 2D model ("scn" or "unet") on a fit-to-size grid.

    ``seed`` seeds its initial weights; None keeps torch's state as the process left it (at
    start: torch's fixed default seed, which is what every model trained here before had).
    """
    import torch

    from SCNLandmarksLib.imaging.grid import GridSpec
    from SCNLandmarksLib.models.model import create_model
    from SCNLandmarksLib.models.network import NetworkConfig

    config = NetworkConfig.paper_2d(len(names), architecture=architecture, filters=filters)
    if seed is not None:
        torch.manual_seed(seed)
    return create_model(config, grid=GridSpec(size=(grid_size, grid_size)), landmark_names=list(names),
                        landmark_descriptions=list(descriptions) if descriptions is not None else None)


# --------------------------------------------------------------------------- resumable runs


def reusable_run(folder: Path, key: Mapping[str, Any], *, fresh: bool) -> dict[str, Any] | None:
    """The stored ``run.json`` of a finished run with exactly these settings, else None.

    A checkpoint left by a run with other settings (or with ``fresh``) is deleted so that the
    next training cannot resume from it by mistake.
    """
    folder.mkdir(parents=True, exist_ok=True)
    record, started = folder / "run.json", folder / "run-settings.json"
    key = json.loads(json.dumps(key))  # normalise tuples to lists, as the stored copy has them
    if not fresh and record.is_file():
        stored = json.loads(record.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored
    same_start = started.is_file() and json.loads(started.read_text(encoding="utf-8")) == key
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists() and (fresh or not same_start):
        checkpoint.unlink()
    started.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    record.unlink(missing_ok=True)
    return None


def finish_run(folder: Path, key: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """Store a finished run's results so that a rerun of the same command reuses them."""
    record = {"key": json.loads(json.dumps(key)), **results}
    write_json(folder / "run.json", record)
    return record


# --------------------------------------------------------------------------- devices and timing


def reset_peak_memory(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: Any) -> float | None:
    """Peak GPU memory allocated by torch since the last reset, MiB; None on the CPU."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def environment() -> dict[str, Any]:
    """Software, hardware and commit of this run, for the results file."""
    import torch
    from SCNLandmarksLib.common.device import describe_device, resolve_device

    try:
        commit = subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPOSITORY), "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=30, check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": describe_device(resolve_device("auto")) if torch.cuda.is_available() else None,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
    }


# --------------------------------------------------------------------------- tables, JSON, plots


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sdr_cells(numbers: Mapping[str, Any], radii: Sequence[float] = SDR_RADII_MM) -> list[str]:
    return [pct(numbers["sdr"].get(f"{r:g}")) for r in radii]


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _finite(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(_finite(value), indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path


def write_table(folder: Path, title: str, note: str, body: str) -> Path:
    """``table.md``: a title, the quick/reference banner, then the tables."""
    text = f"# {title}\n\n**{note}**\n\n{body.rstrip()}\n"
    path = folder / "table.md"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class Series:
    """One line of a plot: ``x`` and ``y`` values, a label, a matplotlib format and colour."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    style: str = "o-"
    alpha: float = 1.0
    color: str | None = None


def plot_panels(path: Path, title: str, panels: Sequence[tuple[str, str, Sequence[Series]]], *,
                log_x: bool = False, log_y: Sequence[int] = (), x_ticks: Sequence[float] | None = None,
                reference_lines: Mapping[int, Sequence[tuple[float, str]]] | None = None) -> Path:
    """A row of line plots, one per ``(x label, y label, series)``, written as PNG (Agg canvas).

    ``reference_lines`` maps a panel index to horizontal ``(value, label)`` lines (targets);
    ``log_y`` lists the panels with a logarithmic y axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    figure = Figure(figsize=(5.2 * len(panels), 4.2))
    FigureCanvasAgg(figure)
    for index, (x_label, y_label, series) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for line in series:
            points = [(x, y) for x, y in zip(line.x, line.y) if y is not None and math.isfinite(y)]
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, line.style, label=line.label or None, alpha=line.alpha, color=line.color)
        for value, label in (reference_lines or {}).get(index, []):
            axes.axhline(value, color="grey", linestyle=":", linewidth=1)
            axes.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                          va="bottom")
        if log_x:
            axes.set_xscale("log")
        if index in log_y:
            axes.set_yscale("log")
            axes.yaxis.set_major_formatter(ScalarFormatter())  # 6, 10, 60 rather than 6 x 10^0
        if x_ticks is not None:
            axes.set_xticks(list(x_ticks))
            axes.set_xticklabels([f"{t:g}" for t in x_ticks])
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3)
        if any(line.label for line in series):
            axes.legend(fontsize=8)
    # Long banners would be cut off at the figure's edge: wrap them to its width (~10 characters per inch).
    width = int(10 * 5.2 * len(panels))
    figure.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, format="png")
    return path


def progress_bar() -> Callable[[Any], None]:
    from SCNLandmarksLib.common.progress import TextProgressBar

    return TextProgressBar()


# --------------------------------------------------------------------------- split CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write the split lists into scripts/experiments/splits")
    action.add_argument("--check", action="store_true", help="check the committed lists against the seeds")
    parser.add_argument("--splits", type=Path, default=SPLITS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    texts = split_files(find_data_folder(args.data))
    if args.write:
        args.splits.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (args.splits / name).write_text(text, encoding="utf-8")
        print(f"Wrote {len(texts)} split lists to {args.splits}")
        return 0
    different = [n for n, t in texts.items() if not (args.splits / n).is_file()
                 or (args.splits / n).read_text(encoding="utf-8") != t]
    if different:
        print(f"These split lists differ from what the seeds give: {', '.join(different)}")
        return 1
    print(f"All {len(texts)} split lists match the seeds")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
