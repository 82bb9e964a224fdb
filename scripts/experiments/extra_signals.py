"""Issue 8: would signals the detector gets for free improve the expected error?

* ``refinement_shift_mm``: how far the local stage moved each point from the global estimate;
* ``runner_up``: the global heatmap's best value farther than ``--exclude-voxels`` grid voxels from
  its maximum, divided by that maximum (a second candidate position along a contour);
* ``local_width_mm`` (the detector's own): how far the local stage's distribution spreads around
  its maximum, root-mean-square in mm (a point the network cannot place along a contour);
* ``member_spread_mm`` (the detector's own): how far the local networks' points lie apart.

The first two are computed here, beside the detector's own signals, for the shipped model on the 15
validation images and the 150 test1 images (mean of both doctors). Each signal set is then judged
on the validation images alone, each image held out of the error model's fit
(:func:`error_prediction.leave_one_image_out`: the AUROC for points > 2 mm off and the error of
the predicted log-error); test1 only reports what the set would give (AUROC for points > 4 mm
off, points flagged and caught at the engine's default threshold, which flags 15 % of the
validation points). Nothing is written into the model.

    python scripts/experiments/extra_signals.py --output scripts/experiments/results/cpu/extra_signals
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
from error_prediction import SHIPPED, detect_with_signals, leave_one_image_out, model_without_error_model

BASE = ["local_peak", "global_confidence", "shape_deviation"]
# How the extra signals enter the error model, as models.quality.SIGNALS states it for its own.
EXTRA = {"refinement_shift_mm": ("add", 0.05), "runner_up": ("clip", 1e-3)}
LOW_IS_BAD = ("local_peak", "global_confidence")


def runner_up(heatmaps: np.ndarray, positions: np.ndarray, exclude_voxels: float) -> np.ndarray:
    """``(N,)`` best heatmap value beyond ``exclude_voxels`` of each maximum / the maximum (2D, x,y positions)."""
    rows, columns = np.indices(heatmaps.shape[1:])
    values = []
    for channel, (x, y) in zip(heatmaps, positions[:, :2]):
        far = (columns - x) ** 2 + (rows - y) ** 2 > exclude_voxels**2
        top = float(channel.max())
        values.append(max(float(channel[far].max()), 0.0) / top if top > 0 else 1.0)
    return np.asarray(values)


def extra_signals(detector: Any, exclude_voxels: float) -> Callable[[Any, Any], dict[str, np.ndarray]]:
    """``(case, found) -> {name: (N,)}``: the two candidate signals, from the global stage run again on the image."""
    from SCNLandmarksLib.models.decode import heatmap_maxima

    def signals(case: Any, found: Any) -> dict[str, np.ndarray]:
        heatmaps, grid = detector.heatmaps(case.image)
        coarse, _ = heatmap_maxima(heatmaps)
        return {"runner_up": runner_up(heatmaps, coarse, exclude_voxels),
                "refinement_shift_mm": np.linalg.norm(found.positions - grid.grid_to_physical(coarse), axis=1)}

    return signals


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--exclude-voxels", type=float, default=6.0,
                        help="runner-up: ignore this radius around the maximum, in global grid voxels (default 6)")
    parser.add_argument("--test-images", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.learning.quality_fitting import DEFAULT_FLAG_FRACTION
    from SCNLandmarksLib.models import quality

    quality.SIGNALS.update(EXTRA)  # this experiment's candidates, known to ErrorModel for this run only
    isbi = X.isbi_folder(X.find_data_folder(args.data))
    args.output.mkdir(parents=True, exist_ok=True)
    detector = Detector(model_without_error_model(args.model, isbi), device="cpu")
    extra = extra_signals(detector, args.exclude_voxels)
    started = time.perf_counter()
    validation_ids = X.checked_training_ids("validation", isbi)
    test_ids = X.test1_ids(isbi, args.test_images)
    valid_signals, valid_errors, _, _ = detect_with_signals(
        detector, X.load_isbi_cases(isbi, validation_ids), X.load_ground_truths(isbi, validation_ids)["mean"], extra=extra)
    test_signals, test_errors, _, _ = detect_with_signals(
        detector, X.load_isbi_cases(isbi, test_ids), X.load_ground_truths(isbi, test_ids)["mean"], extra=extra)
    print(f"Detected {len(validation_ids)} validation and {len(test_ids)} test1 images in "
          f"{time.perf_counter() - started:.0f} s")

    alone = {}
    v, t = np.isfinite(valid_errors), np.isfinite(test_errors)
    for name in [*EXTRA, "member_spread_mm", "local_width_mm", *BASE]:
        if name not in valid_signals:
            continue
        sign = -1.0 if name in LOW_IS_BAD else 1.0
        alone[name] = {"validation_auroc_2mm": auroc(sign * valid_signals[name][v], valid_errors[v] > 2),
                       "test1_auroc_4mm": auroc(sign * test_signals[name][t], test_errors[t] > 4)}
    candidates = {"local peak, global confidence, shape": BASE, "+ refinement shift": [*BASE, "refinement_shift_mm"],
                  "+ runner-up": [*BASE, "runner_up"], "+ both": [*BASE, *EXTRA]}
    if "member_spread_mm" in valid_signals:
        candidates["+ local networks' disagreement"] = [*BASE, "member_spread_mm"]
    if "local_width_mm" in valid_signals:
        candidates["+ local width"] = [*BASE, "local_width_mm"]
        candidates["local width instead of local peak"] = ["local_width_mm", *BASE[1:]]
    sets = {}
    for label, use in candidates.items():
        held_out = leave_one_image_out(valid_signals, valid_errors, use)
        fitted = quality.ErrorModel.fit(valid_signals, valid_errors, use=use, flag_fraction=DEFAULT_FLAG_FRACTION)
        expected = fitted.expected_errors(test_signals)
        found = np.isfinite(test_errors) & np.isfinite(expected)
        e, flagged = test_errors[found], expected[found] > fitted.check_above_mm
        sets[label] = {"signals": use, "validation_held_out": held_out,
                       "test1": {"auroc_4mm": auroc(expected[found], e > 4), "flagged_fraction": float(flagged.mean()),
                                 "caught_4mm": float(flagged[e > 4].mean())}}
    chosen = max(sets, key=lambda label: (sets[label]["validation_held_out"]["auroc_2mm"],
                                          -sets[label]["validation_held_out"]["log_error_rmse"]))
    X.write_json(args.output / "results.json", {"alone": alone, "sets": sets, "chosen_on_validation": chosen,
                                                "exclude_voxels": args.exclude_voxels, "environment": X.environment()})
    body = X.markdown_table(["signal alone", "validation AUROC > 2 mm", "test1 AUROC > 4 mm"],
                            [[k, f"{v['validation_auroc_2mm']:.3f}", f"{v['test1_auroc_4mm']:.3f}"] for k, v in alone.items()])
    body += "\n\n" + X.markdown_table(
        ["error model's signals", "validation held out: AUROC > 2 mm", "log-error RMSE", "test1: AUROC > 4 mm",
         "flagged", "caught > 4 mm"],
        [[label, f"{s['validation_held_out']['auroc_2mm']:.3f}", f"{s['validation_held_out']['log_error_rmse']:.3f}",
          f"{s['test1']['auroc_4mm']:.3f}", X.pct(s["test1"]["flagged_fraction"]), X.pct(s["test1"]["caught_4mm"])]
         for label, s in sets.items()])
    body += f"\n\nChosen on validation (highest held-out AUROC > 2 mm): **{chosen}**."
    X.write_table(args.output, "Extra signals for the expected error",
                  "Shipped model; chosen on the 15 validation images, test1 reports only.", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
