"""Issue 8: an expected error per point, which points to check, and which image to review first.

Fits the quality part of the two-stage cephalometric model and measures it:

1. a shape model of the 135 training images' landmarks (mean of both doctors);
2. an error model on the 15 validation images (``splits/validation.txt``): the shipped model
   detects them, and the log-error of each point is regressed on the detector's signals
   (by default the engine's: how far the local stage's distribution spreads, the global
   confidence, the distance from where the other points place it; per-landmark offsets); the
   default check threshold flags ``--flag-fraction`` of the validation points (with
   ``--out-of-fold``: also on the 135 training images, each detected by a fold model of
   ``cross_validation.py`` that did not train on it; the threshold still flags that share of
   the validation points, which this model detected);
3. writes the model with both parts (same weights) and evaluates it on test1, which chooses
   nothing: AUROC of the expected error for points more than 2 and 4 mm off (and of each signal
   alone), the share of points flagged and of points > 4 mm caught at the default threshold,
   calibration by deciles of expected error (table and reliability plot), and whether the
   per-image expected error ranks the images by their actual error (Spearman).

    python scripts/experiments/error_prediction.py --output scripts/experiments/results/cpu/error_prediction
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
from confidence_signals import auroc
from SCNLandmarksLib.learning.quality_fitting import QUALITY_SIGNALS

SHIPPED = X.REPOSITORY / "SCNLandmarks" / "Resources" / "Models" / "cephalometric_isbi2015.scn.pt"


def detect_with_signals(
    detector: Any, cases: Sequence[Any], truths: dict[str, Any], *,
    extra: Callable[[Any, Any], dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """``(signals (M, N) each, errors (M, N), expected errors (M, N), seconds per image)``.

    ``extra(case, found)`` adds signals of its own beside the detector's (timed with them).
    """
    from SCNLandmarksLib.inference.evaluation import point_errors

    signals: dict[str, list[np.ndarray]] = {}
    errors, expected = [], []
    started = time.perf_counter()
    for case in cases:
        found = detector.detect(case.image)
        for name, values in {**detector.last_signals, **(extra(case, found) if extra else {})}.items():
            signals.setdefault(name, []).append(values)
        errors.append(point_errors(found, truths[case.name]))
        expected.append(found.expected_errors if found.expected_errors is not None else np.full(len(found), np.nan))
    seconds = (time.perf_counter() - started) / max(len(cases), 1)
    return {k: np.stack(v) for k, v in signals.items()}, np.stack(errors), np.stack(expected), seconds


def leave_one_image_out(signals: dict[str, np.ndarray], errors: np.ndarray, use: Sequence[str], *,
                        always: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
                        squared: bool = False) -> dict[str, float]:
    """Each validation image's expected errors from an error model fitted on the other images, scored.

    What chooses the signals: test1 only reports. Points > 4 mm off are too rare on the validation
    images (2 of 285 for the bundled model) to rank signal sets by, so the AUROC for points > 2 mm
    off and the error of the predicted log-error decide. ``always``: ``(signals, errors)`` of other
    images (out-of-fold ones) that every fit includes as well. ``squared``: error models with
    squared log-signal terms.
    """
    from SCNLandmarksLib.models.quality import ErrorModel

    expected = np.full(errors.shape, np.nan)
    for image in range(errors.shape[0]):
        rest = np.arange(errors.shape[0]) != image
        fit_signals, fit_errors = {k: signals[k][rest] for k in use}, errors[rest]
        if always is not None:
            fit_signals, fit_errors = joined(always[0], fit_signals, use), np.concatenate([always[1], fit_errors])
        fitted = ErrorModel.fit(fit_signals, fit_errors, use=use, squared=squared)
        expected[image] = fitted.expected_errors({k: signals[k][image:image + 1] for k in use})[0]
    return scores(expected, errors)


def joined(first: dict[str, np.ndarray], second: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """``names``' ``(M, N)`` signals of ``first``'s images followed by ``second``'s."""
    return {name: np.concatenate([first[name], second[name]]) for name in names}


def scores(expected: np.ndarray, errors: np.ndarray) -> dict[str, float]:
    """AUROC of the expected errors for points > 2 and > 4 mm off, and the RMSE of the predicted log-error."""
    from SCNLandmarksLib.models.quality import ERROR_FLOOR_MM

    found = np.isfinite(expected) & np.isfinite(errors)
    p, e = expected[found], errors[found]
    log_gap = np.log(p + ERROR_FLOOR_MM) - np.log(e + ERROR_FLOOR_MM)
    return {"auroc_2mm": auroc(p, e > 2), "auroc_4mm": auroc(p, e > 4),
            "points_over_2mm": int((e > 2).sum()), "points_over_4mm": int((e > 4).sum()),
            "log_error_rmse": float(np.sqrt(np.mean(log_gap**2)))}


def model_without_error_model(path: Path, isbi: Path) -> Any:
    """The model at ``path`` with a shape model of the 135 training images' landmarks (mean of both doctors), no error model."""
    from SCNLandmarksLib.models.model_file import load_model
    from SCNLandmarksLib.models.shape_model import ShapeModel

    model = load_model(path)
    train_ids = X.checked_training_ids("train_N135", isbi)
    train_truth = X.load_ground_truths(isbi, train_ids)["mean"]
    model.shape_model = ShapeModel.fit(np.stack([train_truth[i].positions for i in train_ids]))
    model.error_model = None
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=SHIPPED, help="two-stage model (default: the bundled one)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--flag-fraction", type=float, default=0.15,
                        help="share of the validation points the default threshold flags (default 0.15: the issue's budget)")
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--signals", type=lambda text: text.split(","), default=list(QUALITY_SIGNALS),
                        help="comma-separated signals the error model may use, where the detector has them "
                             f"(default: {','.join(QUALITY_SIGNALS)}, as the engine fits it)")
    parser.add_argument("--out-of-fold", type=Path, default=None,
                        help="cross_validation.py's output folder: fit the error model on its out-of-fold training "
                             "images as well as on the validation images (oof_error_model.py judges it and chooses "
                             "the --signals to pass)")
    parser.add_argument("--squared", action="store_true",
                        help="add squared log-signal terms to the error model (error_model_terms.py chooses)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.models.model_file import load_model, save_model
    from SCNLandmarksLib.models.quality import ErrorModel
    from scipy.stats import spearmanr

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    model = model_without_error_model(args.model, isbi)

    validation_ids = X.checked_training_ids("validation", isbi)
    validation = X.load_isbi_cases(isbi, validation_ids)
    detector = Detector(model, device="cpu")
    signals, errors, _, _ = detect_with_signals(detector, validation, X.load_ground_truths(isbi, validation_ids)["mean"])
    use = [name for name in args.signals if name in signals]
    fitted_on = f"ISBI 2015 validation split ({len(validation_ids)} images), mean of both doctors"
    if args.out_of_fold is None:
        fit_signals, fit_errors = signals, errors
        held_out = leave_one_image_out(signals, errors, use, squared=args.squared)
    else:
        from cross_validation import read_out_of_fold

        oof, oof_errors, _ = read_out_of_fold(args.out_of_fold)
        use = [name for name in use if name in oof]
        fit_signals, fit_errors = joined(oof, signals, use), np.concatenate([oof_errors, errors])
        fitted_on += f", and {oof_errors.shape[0]} ISBI 2015 training images, each detected by a fold model that did not train on it"
        held_out = leave_one_image_out(signals, errors, use, always=({name: oof[name] for name in use}, oof_errors),
                                       squared=args.squared)
    model.error_model = ErrorModel.fit(fit_signals, fit_errors, use=use, flag_fraction=args.flag_fraction, fitted_on=fitted_on,
                                       squared=args.squared)
    if args.out_of_fold is not None:
        # The fold models are weaker than this one: the threshold and the reference mean come from
        # this model's own validation points, as without --out-of-fold.
        model.error_model.set_reference(signals, errors, flag_fraction=args.flag_fraction)
    threshold = model.error_model.check_above_mm
    print(f"Error model fitted on {fit_errors.size} points ({fitted_on}); default check threshold {threshold:.2f} mm")
    print("Validation, each image held out of the fit: " + ", ".join(f"{k} {v:.3f}" for k, v in held_out.items()))
    model_path = save_model(model, output / args.model.name, overwrite=True, half_precision=True)

    test_ids = X.test1_ids(isbi, args.test_images)
    tests = X.load_isbi_cases(isbi, test_ids)
    truths = X.load_ground_truths(isbi, test_ids)["mean"]
    detector = Detector(load_model(model_path), device="cpu")
    signals, errors, expected, seconds = detect_with_signals(detector, tests, truths)
    found = np.isfinite(errors) & np.isfinite(expected)
    e, p = errors[found], expected[found]
    flagged = p > threshold
    rows = {
        "points": int(e.size), "mre_mm": float(e.mean()), "seconds_per_image": seconds, "check_above_mm": threshold,
        "auroc_4mm": auroc(p, e > 4), "auroc_2mm": auroc(p, e > 2),
        "flagged_fraction": float(flagged.mean()), "caught_4mm": float(flagged[e > 4].mean()),
        "caught_2mm": float(flagged[e > 2].mean()), "points_over_4mm": int((e > 4).sum()),
        "signal_auroc_4mm": {
            "low local peak": auroc(-signals["local_peak"][found], e > 4),
            **({"wide local distribution": auroc(signals["local_width_mm"][found], e > 4)}
               if "local_width_mm" in signals else {}),
            "low global confidence": auroc(-signals["global_confidence"][found], e > 4),
            "shape deviation": auroc(signals["shape_deviation"][found], e > 4),
            **({"local networks' disagreement": auroc(signals["member_spread_mm"][found], e > 4)}
               if "member_spread_mm" in signals else {}),
        },
        "signals": list(model.error_model.signals),
    }
    order = np.argsort(p)
    deciles = [chunk for chunk in np.array_split(order, 10)]
    rows["deciles"] = [{"expected_mm": float(p[c].mean()), "actual_mm": float(e[c].mean())} for c in deciles]
    rows["worst_calibration_ratio"] = max(abs(d["expected_mm"] / d["actual_mm"] - 1) for d in rows["deciles"])
    image_expected = np.nanmean(np.where(np.isfinite(expected), expected, np.nan), axis=1)
    image_actual = np.nanmean(errors, axis=1)
    rows["image_rank_spearman"] = float(spearmanr(image_expected, image_actual).statistic)
    top = np.argsort(-image_expected)[: max(1, len(test_ids) // 10)]
    rows["top_tenth_images_mre_mm"] = float(image_actual[top].mean())
    rows["all_images_mre_mm"] = float(image_actual.mean())
    X.write_json(output / "results.json", {"error_model": model.error_model.to_dict(), "validation_held_out": held_out,
                                           "test1": rows,
                                           "environment": X.environment()})

    body = X.markdown_table(["figure", "test1 (150 images, mean GT)", "target"], [
        ["validation, each image held out of the fit: AUROC > 2 mm / log-error RMSE (chooses the signals)",
         f"{held_out['auroc_2mm']:.3f} / {held_out['log_error_rmse']:.3f}", ""],
        ["AUROC, expected error vs points > 4 mm off", f"{rows['auroc_4mm']:.3f}", ">= 0.85"],
        ["AUROC, expected error vs points > 2 mm off", f"{rows['auroc_2mm']:.3f}", ""],
        [f"points flagged at the default threshold ({threshold:.2f} mm)", X.pct(rows["flagged_fraction"]), "<= 15 %"],
        [f"points > 4 mm off caught ({rows['points_over_4mm']} points)", X.pct(rows["caught_4mm"]), ">= 70 %"],
        ["points > 2 mm off caught", X.pct(rows["caught_2mm"]), ""],
        ["worst decile: |expected / actual - 1|", f"{rows['worst_calibration_ratio']:.2f}", "<= 0.25"],
        ["images ranked by expected error: Spearman with actual MRE", f"{rows['image_rank_spearman']:.2f}", ""],
        ["MRE of the top-ranked tenth of images / of all", f"{rows['top_tenth_images_mre_mm']:.2f} / {rows['all_images_mre_mm']:.2f} mm", ""],
        ["detection, s / image (2 threads)", f"{seconds:.2f}", "<= 1.0"],
        ["signals in the error model", ", ".join(rows["signals"]), ""],
    ])
    body += "\n\n### Each signal alone, AUROC for points > 4 mm off\n\n" + X.markdown_table(
        ["signal", "AUROC"], [[k, f"{v:.3f}"] for k, v in rows["signal_auroc_4mm"].items()])
    body += "\n\n### Calibration by deciles of expected error\n\n" + X.markdown_table(
        ["decile", "mean expected (mm)", "mean actual (mm)"],
        [[i + 1, f"{d['expected_mm']:.2f}", f"{d['actual_mm']:.2f}"] for i, d in enumerate(rows["deciles"])])
    X.write_table(output, "Expected error per point and the check flag", f"ISBI 2015 test1; the error model fitted on the {fitted_on}.", body)
    print(body)
    xs = [d["expected_mm"] for d in rows["deciles"]]
    ys = [d["actual_mm"] for d in rows["deciles"]]
    top = max(xs + ys) * 1.1
    X.plot_panels(output / "reliability.png", "Expected vs actual error, deciles of test1 points", [
        ("expected error (mm)", "actual error (mm)", [X.Series("deciles", xs, ys, "o-", color="C0"),
                                                     X.Series("perfect calibration", [0, top], [0, top], "--", color="grey")]),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
