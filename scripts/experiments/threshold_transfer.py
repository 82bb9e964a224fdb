"""Issue 8, a diagnosis that chooses nothing: is test1 harder than the training images for any model?

The bundled file's threshold flags 15 % of its validation points and 17.1 % of test1's. Either
the bundled model is worse on test1 than on the images that chose its recipe, or test1 is harder
than the training images in general. The three fold models of ``cross_validation.py`` tell them
apart: nothing was chosen on their held-out images. Each is scored by the error model fitted
without its fold (as in ``error_model_terms.py``, squared terms) and thresholded where that flags
``--flag-fraction`` of its held-out points; the table gives, per fold model, the MRE and the share
of points flagged on its held-out training images, on the 15 validation images and on test1, and
the share of test1's points > 4 mm off caught.

    python scripts/experiments/threshold_transfer.py --folds <runs>/cross_validation --output scripts/experiments/results/cpu/threshold_transfer
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
from cross_validation import read_out_of_fold
from error_prediction import SHIPPED, detect_with_signals, model_without_error_model
from oof_error_model import flag_figures, folds_parser, leave_one_fold_out_models, validation_detections


def main(argv: Sequence[str] | None = None) -> int:
    args = folds_parser(__doc__).parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.models.model_file import load_model

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    args.output.mkdir(parents=True, exist_ok=True)
    use = list(load_model(SHIPPED).error_model.signals)
    oof, oof_errors, fold = read_out_of_fold(args.folds)
    validation, validation_errors = validation_detections(isbi, model_without_error_model(SHIPPED, isbi))
    models = leave_one_fold_out_models(oof, oof_errors, fold, validation, validation_errors, use, args.flag_fraction,
                                       squared=True)
    test_ids = X.test1_ids(isbi, None)
    tests = X.load_isbi_cases(isbi, test_ids)
    truths = X.load_ground_truths(isbi, test_ids)["mean"]
    rows = {}
    for k, model in models.items():
        expected = model.expected_errors({n: oof[n][fold == k] for n in use})
        threshold = float(np.quantile(expected[np.isfinite(expected)], 1.0 - args.flag_fraction))
        fold_file = args.folds / f"fold{k}" / "two_stage.scn.pt"
        on_validation, validation_errors_k = validation_detections(isbi, fold_file)
        on_test, test_errors, _, _ = detect_with_signals(Detector(fold_file, device="cpu"), tests, truths)
        on_test1 = flag_figures(model.expected_errors({n: on_test[n] for n in use}), test_errors, threshold)
        rows[k] = {
            "threshold_mm": threshold,
            "held_out_mre_mm": float(np.nanmean(oof_errors[fold == k])),
            "validation_mre_mm": float(np.nanmean(validation_errors_k)),
            "test1_mre_mm": float(np.nanmean(test_errors)),
            "held_out_flagged": flag_figures(expected, oof_errors[fold == k], threshold)["flagged"],
            "validation_flagged": flag_figures(model.expected_errors({n: on_validation[n] for n in use}),
                                               validation_errors_k, threshold)["flagged"],
            "test1_flagged": on_test1["flagged"],
            "test1_points_over_4mm": int(np.nansum(test_errors > 4)),
            "test1_caught_4mm": on_test1["caught_4mm"],
        }
        print(f"fold {k}: {rows[k]}", flush=True)
    mean = {key: float(np.mean([r[key] for r in rows.values()])) for key in rows[1]}
    body = X.markdown_table(
        ["fold model", "threshold", "MRE: held-out / validation / test1", "flagged: held-out / validation / test1",
         "test1 > 4 mm caught"],
        [[name, f"{r['threshold_mm']:.2f} mm",
          f"{r['held_out_mre_mm']:.3f} / {r['validation_mre_mm']:.3f} / {r['test1_mre_mm']:.3f} mm",
          f"{X.pct(r['held_out_flagged'])} / {X.pct(r['validation_flagged'])} / {X.pct(r['test1_flagged'])} %",
          f"{X.pct(r['test1_caught_4mm'])} % of {r['test1_points_over_4mm']:.0f}"]
         for name, r in [*((f"fold {k}", r) for k, r in rows.items()), ("mean", mean)]])
    X.write_table(args.output, "Does a threshold set on training-like images flag more of test1?",
                  f"Fold models of {args.folds.name}; each thresholded where its error model (fitted without its fold, "
                  f"squared terms) flags {args.flag_fraction:.0%} of its held-out points. Chooses nothing.", body)
    X.write_json(args.output / "results.json", {"folds": {str(k): r for k, r in rows.items()}, "mean": mean,
                                                "signals": use, "flag_fraction": args.flag_fraction,
                                                "environment": X.environment()})
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
