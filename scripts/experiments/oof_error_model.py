"""Issue 8: the error model fitted on out-of-fold detections of the training images as well, judged without test1.

``cross_validation.py`` gives the detector's signals and errors on the 135 training images, each
from a fold model that never saw it; the shipped model gives those of the 15 validation images.
Two error models are compared, by the rule in ``results/cpu/oof_error_model/RULE.md`` (written
before the folds finished):

* **A, validation only** (how the engine fits it): the shipped model's 15 validation images;
  its threshold flags ``--flag-fraction`` of their points.
* **B, pooled**: the 135 out-of-fold images and the 15 validation images together; its threshold
  flags ``--flag-fraction`` of the pooled points. Its signal set is the one with the best
  leave-one-fold-out AUROC for points > 2 mm off on the out-of-fold images.

Judged on the out-of-fold images (each fold predicted by a B fitted without it; A fitted on the
validation images alone) and on the validation images (each predicted by an error model fitted
without it). test1 is not read: ``error_prediction.py --out-of-fold`` reports it afterwards.

    python scripts/experiments/oof_error_model.py --folds <runs>/cross_validation --output scripts/experiments/results/cpu/oof_error_model
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
from cross_validation import read_out_of_fold
from error_prediction import SHIPPED, detect_with_signals, joined, leave_one_image_out, model_without_error_model, scores

SIGNAL_SETS = (
    ("local_width_mm", "global_confidence", "shape_deviation"),
    ("local_peak", "global_confidence", "shape_deviation"),
    ("local_width_mm", "local_peak", "global_confidence", "shape_deviation"),
    ("local_width_mm", "global_confidence"),
)
# Below this difference in AUROC on the validation images (about 30 points > 2 mm off) is noise.
VALIDATION_TOLERANCE = 0.03


def fit(signals: dict[str, np.ndarray], errors: np.ndarray, use: Sequence[str], flag_fraction: float, *,
        squared: bool = False):  # noqa: ANN201
    from SCNLandmarksLib.models.quality import ErrorModel

    return ErrorModel.fit({k: signals[k] for k in use}, errors, use=list(use), flag_fraction=flag_fraction, squared=squared)


def leave_one_fold_out_models(oof: dict[str, np.ndarray], oof_errors: np.ndarray, fold: np.ndarray,
                              validation: dict[str, np.ndarray] | None, validation_errors: np.ndarray | None,
                              use: Sequence[str], flag_fraction: float, *, squared: bool = False) -> dict[int, object]:
    """Fold -> the pooled error model fitted without that fold's out-of-fold images (and with the
    validation images, unless ``validation`` is None)."""
    models = {}
    for k in np.unique(fold):
        rest = fold != k
        signals, errors = {n: oof[n][rest] for n in use}, oof_errors[rest]
        if validation is not None:
            signals, errors = joined(signals, validation, use), np.concatenate([errors, validation_errors])
        models[int(k)] = fit(signals, errors, use, flag_fraction, squared=squared)
    return models


def leave_one_fold_out(oof: dict[str, np.ndarray], oof_errors: np.ndarray, fold: np.ndarray,
                       validation: dict[str, np.ndarray] | None, validation_errors: np.ndarray | None,
                       use: Sequence[str], flag_fraction: float, *, squared: bool = False) -> np.ndarray:
    """Expected errors of each out-of-fold image from a pooled model fitted without its fold."""
    expected = np.full(oof_errors.shape, np.nan)
    models = leave_one_fold_out_models(oof, oof_errors, fold, validation, validation_errors, use, flag_fraction,
                                       squared=squared)
    for k, model in models.items():
        expected[fold == k] = model.expected_errors({n: oof[n][fold == k] for n in use})
    return expected


def flag_figures(expected: np.ndarray, errors: np.ndarray, threshold: float) -> dict[str, float]:
    found = np.isfinite(expected) & np.isfinite(errors)
    p, e = expected[found], errors[found]
    flagged = p > threshold
    return {"flagged": float(flagged.mean()), "caught_4mm": float(flagged[e > 4].mean()) if (e > 4).any() else float("nan")}


def folds_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line of the scripts that judge error models on ``cross_validation.py``'s folds."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--folds", type=Path, required=True, help="cross_validation.py's output folder")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--flag-fraction", type=float, default=0.15)
    return parser


def validation_detections(isbi: Path, model: object) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(signals, errors)`` ``(M, N)`` of ``model`` (a model or its file) on the 15 validation images, mean of both doctors."""
    from SCNLandmarksLib.inference.detection import Detector

    validation_ids = X.checked_training_ids("validation", isbi)
    signals, errors, _, _ = detect_with_signals(Detector(model, device="cpu"), X.load_isbi_cases(isbi, validation_ids),
                                                X.load_ground_truths(isbi, validation_ids)["mean"])
    return signals, errors


def main(argv: Sequence[str] | None = None) -> int:
    args = folds_parser(__doc__).parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.learning.quality_fitting import QUALITY_SIGNALS

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    args.output.mkdir(parents=True, exist_ok=True)
    oof, oof_errors, fold = read_out_of_fold(args.folds)
    validation, validation_errors = validation_detections(isbi, model_without_error_model(SHIPPED, isbi))
    fraction = args.flag_fraction
    print(f"{oof_errors.shape[0]} out-of-fold images ({int(np.sum(oof_errors > 2))} points > 2 mm off, "
          f"{int(np.sum(oof_errors > 4))} > 4 mm), {validation_errors.shape[0]} validation images")

    sets = {}
    for use in SIGNAL_SETS:
        expected = leave_one_fold_out(oof, oof_errors, fold, validation, validation_errors, use, fraction)
        sets[", ".join(use)] = {"signals": list(use), "out_of_fold": scores(expected, oof_errors)}
        print(f"B [{', '.join(use)}]: out-of-fold, leave one fold out: {sets[', '.join(use)]['out_of_fold']}")
    best = max(sets.values(), key=lambda s: np.nan_to_num(s["out_of_fold"]["auroc_2mm"], nan=-1.0))
    use_b = best["signals"]

    today = list(QUALITY_SIGNALS)
    model_a = fit(validation, validation_errors, today, fraction)
    a_oof = model_a.expected_errors({n: oof[n] for n in today})
    a_validation = leave_one_image_out({n: validation[n] for n in today}, validation_errors, today)
    b_oof = leave_one_fold_out(oof, oof_errors, fold, validation, validation_errors, use_b, fraction)
    model_b = fit(joined(oof, validation, use_b), np.concatenate([oof_errors, validation_errors]), use_b, fraction)
    rows = {
        "A": {"signals": today, "threshold_mm": model_a.check_above_mm, "validation_flagged": flag_figures(
                  model_a.expected_errors({n: validation[n] for n in today}), validation_errors, model_a.check_above_mm)["flagged"],
              "out_of_fold": {**scores(a_oof, oof_errors), **flag_figures(a_oof, oof_errors, model_a.check_above_mm)},
              "validation_held_out": {"auroc_2mm": a_validation["auroc_2mm"], "auroc_4mm": a_validation["auroc_4mm"]}},
        "B": {"signals": use_b, "threshold_mm": model_b.check_above_mm,
              "out_of_fold": {**scores(b_oof, oof_errors), **flag_figures(b_oof, oof_errors, model_b.check_above_mm)},
              "validation_held_out": leave_one_image_out(validation, validation_errors, use_b,
                                                         always=({n: oof[n] for n in use_b}, oof_errors)),
              "validation_flagged": flag_figures(model_b.expected_errors({n: validation[n] for n in use_b}),
                                                 validation_errors, model_b.check_above_mm)["flagged"]},
    }
    # What ships (RULE.md, addendum): B with the threshold set on the shipped model's validation points.
    shipped = copy.deepcopy(model_b)
    shipped.set_reference({n: validation[n] for n in use_b}, validation_errors, flag_fraction=fraction)
    rows["B, threshold on validation"] = {
        **rows["B"], "threshold_mm": shipped.check_above_mm,
        "out_of_fold": {**rows["B"]["out_of_fold"], **flag_figures(b_oof, oof_errors, shipped.check_above_mm)},
        "validation_flagged": flag_figures(shipped.expected_errors({n: validation[n] for n in use_b}),
                                           validation_errors, shipped.check_above_mm)["flagged"]}
    first = rows["B"]["out_of_fold"]["auroc_4mm"] >= rows["A"]["out_of_fold"]["auroc_4mm"]
    second = rows["B"]["validation_held_out"]["auroc_2mm"] >= rows["A"]["validation_held_out"]["auroc_2mm"] - VALIDATION_TOLERANCE
    decision = "B (pooled)" if first and second else "A (validation only)"
    print(f"Rule: out-of-fold AUROC > 4 mm B >= A: {first}; validation AUROC > 2 mm B >= A - {VALIDATION_TOLERANCE}: "
          f"{second} -> {decision}")

    body = "Signal sets for B, out-of-fold images, each fold predicted by a model fitted without it:\n\n"
    body += X.markdown_table(["signals", "AUROC > 2 mm", "AUROC > 4 mm"],
                             [[name, f"{s['out_of_fold']['auroc_2mm']:.3f}", f"{s['out_of_fold']['auroc_4mm']:.3f}"]
                              for name, s in sets.items()])
    body += "\n\n" + X.markdown_table(
        ["error model", "signals", "threshold (mm)", "out-of-fold: AUROC > 2 / > 4 mm", "out-of-fold: flagged / caught > 4 mm",
         "validation, held out: AUROC > 2 mm", "validation points the threshold flags (shipped model)"],
        [[name, ", ".join(r["signals"]), f"{r['threshold_mm']:.2f}",
          f"{r['out_of_fold']['auroc_2mm']:.3f} / {r['out_of_fold']['auroc_4mm']:.3f}",
          f"{X.pct(r['out_of_fold']['flagged'])} / {X.pct(r['out_of_fold']['caught_4mm'])}",
          f"{r['validation_held_out']['auroc_2mm']:.3f}", X.pct(r["validation_flagged"])] for name, r in
         (("A, validation only", rows["A"]), ("B, pooled", rows["B"]),
          ("B, threshold on the shipped model's validation points (the addendum: shipped)", rows["B, threshold on validation"]))])
    body += (f"\n\nOut-of-fold images: {oof_errors.shape[0]} ({int(np.sum(oof_errors > 2))} points > 2 mm off, "
             f"{int(np.sum(oof_errors > 4))} > 4 mm); validation: {validation_errors.shape[0]} images, shipped model "
             f"({int(np.sum(validation_errors > 2))} points > 2 mm off).\n\n"
             f"Rule (RULE.md): B's out-of-fold AUROC > 4 mm at least A's: {'yes' if first else 'no'}; B's validation "
             f"AUROC > 2 mm at least A's minus {VALIDATION_TOLERANCE}: {'yes' if second else 'no'}. **Chosen: {decision}.**")
    X.write_table(args.output, "Error model fitted on out-of-fold detections too",
                  "ISBI 2015 training images out of fold and the validation split; test1 not read.", body)
    X.write_json(args.output / "results.json", {"signal_sets": sets, "models": rows, "decision": decision,
                                                "flag_fraction": fraction, "environment": X.environment()})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
