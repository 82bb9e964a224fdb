"""After fine-tuning on another device: do the expected errors and check flags still mean something?

A fine-tune on cases unlike the training images learns the expected errors again from the
folds' held-out readings (``SCNLandmarksLib.learning.finetuning``). This script measures what
that changes on the device's own images: each model written by ``promise_loop.py`` for a device
(``--models DEVICE=PATH``) detects the other test1 images through that device, and the same
detections are judged twice, with the model's own error model (learned again) and with the
starting model's (what the user would otherwise get): share of points flagged, share of points
> 4 mm off caught, AUROC of the expected error for points > 4 mm off, and the mean expected
error beside the mean actual one. The shipped model before fine-tuning is measured too.

    python scripts/experiments/promise_loop.py --scenarios device --devices noisy,blurred --output <runs>
    python scripts/experiments/device_flags.py --models noisy=<runs>/other-device-noisy.scn.pt \
        blurred=<runs>/other-device.scn.pt --output scripts/experiments/results/cpu/device_flags
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
import promise_loop as P
from confidence_signals import auroc


def flag_figures(error_model: Any, signals: dict[str, np.ndarray], errors: np.ndarray) -> dict[str, float]:
    """What ``error_model`` makes of detections with these ``(M, N)`` signals and errors (mm)."""
    expected = error_model.expected_errors(signals)
    found = np.isfinite(errors) & np.isfinite(expected)
    e, p = errors[found], expected[found]
    flagged = p > error_model.check_above_mm
    return {"threshold_mm": float(error_model.check_above_mm), "flagged": float(flagged.mean()),
            "caught_4mm": float(flagged[e > 4].mean()) if (e > 4).any() else float("nan"),
            "auroc_4mm": auroc(p, e > 4), "mean_expected_mm": float(p.mean()), "mean_actual_mm": float(e.mean()),
            "points_over_4mm": int((e > 4).sum())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=P.SHIPPED, help="the starting model (default: the bundled one)")
    parser.add_argument("--models", nargs="+", required=True, metavar="DEVICE=PATH",
                        help=f"fine-tuned models, each with its simulated device ({', '.join(P.DEVICES)})")
    parser.add_argument("--corrected", default="151-160", help="the test1 ids the models were fine-tuned on (left out)")
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    pairs = [text.split("=", 1) for text in args.models]
    if any(len(pair) != 2 or pair[0] not in P.DEVICES for pair in pairs):
        parser.error(f"--models takes DEVICE=PATH with DEVICE one of {', '.join(P.DEVICES)}; got {args.models}")
    import torch

    torch.set_num_threads(2)
    from error_prediction import detect_with_signals
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.models.model_file import load_model

    first, last = (int(part) for part in args.corrected.split("-"))
    isbi = X.isbi_folder(X.find_data_folder(args.data))
    test_ids = X.spread([i for i in X.test1_ids(isbi) if not first <= int(i) <= last], args.test_images)
    tests = X.load_isbi_cases(isbi, test_ids)
    truths = X.load_ground_truths(isbi, test_ids)["mean"]
    start = load_model(args.model)
    rows: list[dict[str, Any]] = []
    for device, path in pairs:
        cases = [P.device_case(case, **P.DEVICES[device]) for case in tests]
        signals, errors, _, _ = detect_with_signals(Detector(start, device="cpu"), cases, truths)
        rows.append({"device": device, "model": "starting model", "error_model": "its own",
                     **flag_figures(start.error_model, signals, errors)})
        tuned = load_model(Path(path))
        signals, errors, _, _ = detect_with_signals(Detector(tuned, device="cpu"), cases, truths)
        rows.append({"device": device, "model": "fine-tuned", "error_model": "the starting model's",
                     **flag_figures(start.error_model, signals, errors)})
        rows.append({"device": device, "model": "fine-tuned", "error_model": "learned again (its own)",
                     "fitted_on": tuned.error_model.fitted_on, **flag_figures(tuned.error_model, signals, errors)})
        for row in rows[-3:]:
            print(row, flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    X.write_json(args.output / "results.json", {"rows": rows, "test_ids": test_ids, "models": dict(pairs),
                                                "environment": X.environment()})
    body = X.markdown_table(
        ["device", "model", "error model", "threshold mm", "flagged %", "caught > 4 mm %", "AUROC > 4 mm",
         "mean expected / actual mm"],
        [[r["device"], r["model"], r["error_model"], f"{r['threshold_mm']:.2f}", X.pct(r["flagged"]),
          f"{X.pct(r['caught_4mm'])} of {r['points_over_4mm']}", f"{r['auroc_4mm']:.3f}",
          f"{r['mean_expected_mm']:.2f} / {r['mean_actual_mm']:.2f}"] for r in rows])
    X.write_table(args.output, "Check flags on another device, before and after fine-tuning",
                  f"{len(test_ids)} test1 images through each simulated device (the corrected {args.corrected} left out); "
                  "mean of both doctors; 2 CPU threads", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
