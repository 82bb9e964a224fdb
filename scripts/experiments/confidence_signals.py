"""Which per-point signals of the two-stage model predict its error? (groundwork for issue 8)

For every point of the shipped model on ISBI images, records the global stage's confidence,
the distance the local stage moved the point, and the local stage's peak probability (as a
fraction of its target's), then prints the AUROC of each signal as a detector of points more than
2 and 4 mm from the mean of both doctors. Nothing is fitted or chosen here.

    python scripts/experiments/confidence_signals.py --split validation
    python scripts/experiments/confidence_signals.py --split test1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X

SHIPPED = X.REPOSITORY / "SCNLandmarks" / "Resources" / "Models" / "cephalometric_isbi2015.scn.pt"


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a positive scores above a negative (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    count_pos, count_neg = int(positive.sum()), int((~positive).sum())
    if count_pos == 0 or count_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - count_pos * (count_pos + 1) / 2) / (count_pos * count_neg))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--split", choices=("validation", "test1"), default="validation")
    parser.add_argument("--model", type=Path, default=SHIPPED)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.inference.evaluation import point_errors
    from SCNLandmarksLib.data.landmarks import Landmarks
    from SCNLandmarksLib.models.refinement import prepare_for_refiner, refine_positions

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    ids = X.checked_training_ids("validation", isbi) if args.split == "validation" else X.test1_ids(isbi)
    cases = X.load_isbi_cases(isbi, ids)
    truths = X.load_ground_truths(isbi, ids)["mean"]
    detector = Detector(args.model, device="cpu", refine=False)
    refiner = detector.model.refiner
    rows = []
    for case in cases:
        found = detector.detect(case.image)
        fine = detector.last_reading.apply(prepare_for_refiner(case.image, refiner.config, detector.model.intensity))
        refined, peaks, *_ = refine_positions(refiner, fine, found.positions, device=detector.device)
        errors = point_errors(Landmarks(found.names, refined), truths[case.name])
        shift = np.linalg.norm(refined - found.positions, axis=1)
        rows.append(np.stack([errors, found.confidences, shift, peaks / refiner.config.target_peak], axis=1))
    table = np.concatenate(rows)
    errors = table[:, 0]
    signals = {"low global confidence": -table[:, 1], "refinement shift": table[:, 2],
               "low local peak": -table[:, 3]}
    print(f"{args.split}: {len(cases)} images, {len(errors)} points, MRE {errors.mean():.2f} mm (mean ground truth)")
    for limit in (2.0, 4.0):
        bad = errors > limit
        print(f"  points > {limit:g} mm: {int(bad.sum())} ({100 * bad.mean():.1f} %)")
        for name, score in signals.items():
            print(f"    AUROC of {name}: {auroc(score, bad):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
