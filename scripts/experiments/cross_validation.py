"""Issues 7 and 8: out-of-fold detections of the 135 training images, for an error model fitted on more than 15 images.

The shipped error model is fitted on the 15 validation images (285 points, 2 of them > 4 mm
off): too few to rank signals or set a threshold steadily. Here the 135 training images are
split into ``--folds`` seeded folds; for each fold a two-stage model is trained on the other
folds with a shortened version of the shipped recipe (global SCN, then one local network; the
15 validation images choose the best step, as in the shipped recipe), its shape model comes
from the same training images, and it detects the held-out fold. Every training image thus
gets the detector's signals and its errors (mean of both doctors) from a model that never saw
it: ``folds.npz`` holds them beside the fold models' accuracy. ``oof_error_model.py`` fits and
judges error models on them. test1 is not read here.

Each fold's stages checkpoint and resume: rerun the same command to go on after a stop (other
settings in the same folder are refused). After a change of the detector, ``--detect-again`` detects
the held-out folds again with the kept fold models (about a minute). The fold models' initial weights are not seeded apart:
they follow torch's random state as the process reaches them (fold 1 starts from torch's
default, as the shipped global stage did), so folds run in another order or process differ.

    python scripts/experiments/cross_validation.py --output <runs>/cross_validation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X

NAME = "cross_validation"
FOLD_SEED = 7
# The shipped local networks' channels (train_refiner.py's default, wider than the engine's).
LOCAL_FILTERS = (16, 32, 48, 64, 96)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: $SCN_DATA_DIR or ../shared/data)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the fold models, signals and tables")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--run-folds", default=None, help="only these folds, e.g. 1,2 (default: all)")
    parser.add_argument("--global-iterations", type=int, default=5000)
    parser.add_argument("--local-iterations", type=int, default=1000)
    parser.add_argument("--grid-size", type=int, default=256)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="global stage's peak learning rate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="pipeline check: 30 images, 20 + 10 steps")
    parser.add_argument("--detect-again", action="store_true",
                        help="detect the held-out images again with the kept fold models (after a change of the detector)")
    return parser.parse_args(argv)


def fold_ids(ids: Sequence[str], folds: int, *, seed: int = FOLD_SEED) -> list[list[str]]:
    """``ids`` (sorted first) shuffled with ``seed`` and dealt into ``folds`` folds of (nearly) equal size, each sorted."""
    ids = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in order[k::folds]) for k in range(folds)]


def read_out_of_fold(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Out-of-fold ``(signals (M, N) each, errors (M, N), fold number per image (M,))``."""
    pooled = dict(np.load(folder / "folds.npz"))
    if "fold" in pooled:
        pooled.pop("ids")
        fold = pooled.pop("fold")
    else:  # written before the fold numbers were stored beside the ids
        folds = read_json(folder / "results.json")["folds"]
        fold_of = {image: k + 1 for k, ids in enumerate(folds) for image in ids}
        fold = np.asarray([fold_of[str(image)] for image in pooled.pop("ids")])
    errors = pooled.pop("errors_mm")
    pooled.pop("global_errors_mm", None)
    return pooled, errors, fold


def check_same_settings(output: Path, args: argparse.Namespace) -> None:
    """Refuse to resume into ``output`` with settings other than those its folds were started with."""
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "output", "run_folds", "threads", "detect_again")}
    record = output / "settings.json"
    if record.exists() and read_json(record) != settings:
        msg = (f"{output} holds folds made with other settings ({read_json(record)}); use another --output "
               f"or the same settings to resume")
        raise SystemExit(msg)
    X.write_json(record, settings)


def held_out_accuracy(errors: np.ndarray, global_errors: np.ndarray) -> dict[str, float]:
    """MRE (two-stage and global stage alone), SDR and the count of points > 2 and > 4 mm off, from ``(M, N)`` errors in mm."""
    return {"images": int(errors.shape[0]), "mre_mm": float(np.nanmean(errors)),
            "global_mre_mm": float(np.nanmean(global_errors)), "sdr_2mm": float(np.nanmean(errors <= 2)),
            "sdr_4mm": float(np.nanmean(errors <= 4)), "over_4mm": int(np.sum(errors > 4)),
            "over_2mm": int(np.sum(errors > 2))}


def accuracy_cells(accuracy: dict[str, float]) -> list[str]:
    return [f"{accuracy['mre_mm']:.3f}", f"{accuracy['global_mre_mm']:.3f}", f"{100 * accuracy['sdr_2mm']:.2f}",
            f"{100 * accuracy['sdr_4mm']:.2f}", str(accuracy["over_4mm"])]


def time_cells(times: dict[str, float]) -> list[str]:
    return [f"{times[key] / 60:.1f}" if key in times else "" for key in ("global_s", "local_s")]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def train_global_stage(folder: Path, stem: str, training: Sequence[Any], validation: Sequence[Any],
                       args: argparse.Namespace, *, iterations: int, seed: int, weights_seed: int | None = None,
                       validate_every: int | None = None) -> float:
    """Train a global SCN (``args``' grid, filters, learning rate) into ``folder/<stem>.scn.pt``; its seconds.

    It checkpoints to ``<stem>.checkpoint.pt`` and resumes from there. ``seed`` seeds the training
    samples, ``weights_seed`` the initial weights (None: torch's state as the process left it). The
    validation images choose the best of the steps validated, every ``validate_every`` steps (default:
    four times).
    """
    from SCNLandmarksLib.learning.training import train_model
    from SCNLandmarksLib.models.model_file import save_model

    names, descriptions = X.landmark_names()
    settings = X.Settings(quick=args.quick, grid_size=args.grid_size, filters=args.filters,
                          iterations=iterations, batch_size=1, learning_rate=args.learning_rate,
                          num_workers=0, device=args.device, seed=seed, test_images=None, threads=args.threads)
    model = X.new_model("scn", names, descriptions, grid_size=args.grid_size, filters=args.filters, seed=weights_seed)
    checkpoint = folder / f"{stem}.checkpoint.pt"
    result = train_model(training, model, output=folder / f"{stem}-full.scn.pt",
                         config=X.training_config(settings, validate_every=validate_every or max(1, iterations // 4)),
                         validation_cases=validation, checkpoint=checkpoint, resume=checkpoint.exists(),
                         progress=X.progress_bar(), overwrite=True)
    save_model(result.model, folder / f"{stem}.scn.pt", overwrite=True)
    return result.seconds


def train_fold(folder: Path, training: Sequence[Any], validation: Sequence[Any], args: argparse.Namespace) -> tuple[Path, dict[str, float]]:
    """The fold's two-stage model file (trained, or found finished in ``folder``) and its stage times in s."""
    from SCNLandmarksLib.learning.quality_fitting import fit_point_quality
    from SCNLandmarksLib.learning.refinement_training import RefinerTrainingConfig, attach_refiner, train_refiner
    from SCNLandmarksLib.models.model_file import load_model, save_model

    final = folder / "two_stage.scn.pt"
    times = read_json(folder / "times.json") if (folder / "times.json").exists() else {}
    if final.exists():
        return final, times
    folder.mkdir(parents=True, exist_ok=True)
    global_file = folder / "global.scn.pt"
    if not global_file.exists():
        times["global_s"] = train_global_stage(folder, "global", training, validation, args,
                                               iterations=args.global_iterations, seed=0)
        X.write_json(folder / "times.json", times)
    model = load_model(global_file)
    attach_refiner(model, filters=LOCAL_FILTERS)
    config = RefinerTrainingConfig(iterations=args.local_iterations, validate_every=max(10, args.local_iterations // 8),
                                   checkpoint_every=100, device=args.device)
    result = train_refiner(training, model, output=folder / "two-stage-full.scn.pt", config=config,
                           validation_cases=validation, checkpoint=folder / "local.checkpoint.pt",
                           resume=(folder / "local.checkpoint.pt").exists(), progress=X.progress_bar(), overwrite=True)
    times["local_s"] = result.seconds
    # The shape model from the fold's own training images; no error model (that is what the folds feed).
    print(fit_point_quality(model, training, None))
    X.write_json(folder / "times.json", times)
    save_model(model, final, overwrite=True, half_precision=True)
    return final, times


def detect_fold(model_file: Path, cases: Sequence[Any], truths: dict[str, Any], device: str) -> dict[str, np.ndarray]:
    """Signals ``(M, N)`` each, ``errors_mm`` and the global stage's own ``global_errors_mm`` on ``cases``."""
    from error_prediction import detect_with_signals
    from SCNLandmarksLib.inference.detection import Detector

    signals, errors, _, seconds = detect_with_signals(Detector(model_file, device=device), cases, truths)
    _, global_errors, _, _ = detect_with_signals(Detector(model_file, device=device, refine=False), cases, truths)
    print(f"  detected {len(cases)} held-out images, {seconds:.2f} s each")
    return {**signals, "errors_mm": errors, "global_errors_mm": global_errors}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    import torch

    torch.set_num_threads(args.threads)
    isbi = X.isbi_folder(X.find_data_folder(args.data))
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    train_ids = X.checked_training_ids("train_N135", isbi)
    validation_ids = X.checked_training_ids("validation", isbi)
    if args.quick:
        train_ids, validation_ids = X.spread(train_ids, 30), validation_ids[:3]
        args.global_iterations, args.local_iterations = 20, 10
    folds = fold_ids(train_ids, args.folds)
    check_same_settings(output, args)
    chosen = range(1, args.folds + 1) if args.run_folds is None else [int(k) for k in args.run_folds.split(",")]
    print(f"{len(train_ids)} training images in {args.folds} folds of {[len(f) for f in folds]}; "
          f"global {args.global_iterations} steps, local {args.local_iterations} steps per fold")
    pending = [k for k in chosen if args.detect_again or not (output / f"fold{k}" / "held_out.npz").exists()]
    print(f"folds done earlier: {sorted(set(chosen) - set(pending)) or 'none'}")
    if pending:
        cases = {c.name: c for c in X.load_isbi_cases(isbi, train_ids, annotation="mean")}
        validation = X.load_isbi_cases(isbi, validation_ids, annotation="mean")
        truths = X.load_ground_truths(isbi, train_ids)["mean"]
    for k in pending:
        held_out = folds[k - 1]
        folder = output / f"fold{k}"
        signals_file = folder / "held_out.npz"
        started = time.perf_counter()
        training = [cases[i] for i in train_ids if i not in set(held_out)]
        print(f"fold {k}: training on {len(training)} images, holding out {len(held_out)}")
        model_file, times = train_fold(folder, training, validation, args)
        found = detect_fold(model_file, [cases[i] for i in held_out], truths, args.device)
        np.savez(signals_file, ids=np.asarray(held_out), fold=np.full(len(held_out), k), **found)
        errors = found["errors_mm"]
        print(f"fold {k}: held-out MRE {np.nanmean(errors):.3f} mm (global stage alone "
              f"{np.nanmean(found['global_errors_mm']):.3f}), SDR@2mm {100 * np.nanmean(errors <= 2):.2f} %, "
              f"> 4 mm {int(np.sum(errors > 4))}; global {times.get('global_s', 0) / 60:.1f} min, local "
              f"{times.get('local_s', 0) / 60:.1f} min, fold {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    done = [output / f"fold{k}" / "held_out.npz" for k in range(1, args.folds + 1)]
    if all(p.exists() for p in done):
        parts = [dict(np.load(p)) for p in done]
        pooled = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        np.savez(output / "folds.npz", **pooled)
        errors = pooled["errors_mm"]
        times = [read_json(output / f"fold{k}" / "times.json") if (output / f"fold{k}" / "times.json").exists()
                 else {} for k in range(1, args.folds + 1)]
        accuracy = [held_out_accuracy(p["errors_mm"], p["global_errors_mm"]) for p in parts]
        overall = held_out_accuracy(errors, pooled["global_errors_mm"])
        X.write_json(output / "results.json", {
            "experiment": NAME, "settings": read_json(output / "settings.json"), "fold_seed": FOLD_SEED,
            "folds": folds, "environment": X.environment(), "times_s": times, "held_out_per_fold": accuracy,
            "held_out": overall,
        })
        rows = [[f"fold {k + 1}", len(folds[k]), *accuracy_cells(a), *time_cells(t)] for k, (a, t) in enumerate(zip(accuracy, times))]
        rows.append(["all", errors.shape[0], *accuracy_cells(overall), "", ""])
        X.write_table(output, "Cross-validation of the 135 training images: each fold held out of its model",
                      f"Fold models: global SCN {args.global_iterations} steps (grid {args.grid_size}, {args.filters} "
                      f"filters), one local network {args.local_iterations} steps, each trained on the other folds; "
                      "errors against the mean of both doctors.",
                      X.markdown_table(["fold", "held-out images", "MRE (mm)", "global stage alone (mm)", "SDR@2mm %",
                                        "SDR@4mm %", "points > 4 mm", "global stage (min)", "local stage (min)"], rows))
        print(f"All folds: {errors.shape[0]} held-out images, MRE {np.nanmean(errors):.3f} mm, "
              f"{int(np.sum(errors > 2))} points > 2 mm, {int(np.sum(errors > 4))} > 4 mm -> {output / 'folds.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
