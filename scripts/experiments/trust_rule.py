"""When may the local stage move a point? Any one network that trusts its crop, most of them, or all.

For the bundled model (an ensemble of local networks): the 15 validation images, every second test1 image after the 10
corrected ones (151-160), and the same images through the simulated other device of
``promise_loop.py``. For each, how many points 0, 1 or 2 networks trust (their crop distribution
peaks at least ``min_peak_fraction`` of the target's), and the MRE (mean of both doctors) and the share of points more than 4 mm off of the global estimate, of
"any trusted network moves the point", of "most networks trust" (more than half; the mean of the
trusting networks' points) and of "all must trust" (the rule ``refine_positions`` applies). Choose
on the validation images; the test1 rows are for the record.

    python scripts/experiments/trust_rule.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
import promise_loop as P


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: $SCN_DATA_DIR or ../shared/data)")
    args = parser.parse_args(argv)
    import torch
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.models.refinement import prepare_for_refiner, refine_positions

    torch.set_num_threads(2)
    isbi = X.isbi_folder(X.find_data_folder(args.data))
    detector = Detector(P.SHIPPED, device="cpu", refine=False)
    refiner = detector.model.refiner
    members = list(getattr(refiner, "members", [refiner]))
    threshold = refiner.config.min_peak_fraction * refiner.config.target_peak
    test_ids = [i for i in X.test1_ids(isbi) if i not in P.CORRECTED_IDS][::2]
    for name, ids, device in (("validation", X.checked_training_ids("validation", isbi), False),
                              ("test1", test_ids, False), ("other device", test_ids, True)):
        cases = X.load_isbi_cases(isbi, ids)
        truths = X.load_ground_truths(isbi, ids)["mean"]
        if device:
            cases = [P.device_case(case) for case in cases]
        errors: dict[str, list[np.ndarray]] = {"global": [], "any network": [], "most networks": [], "all networks": []}
        counts = np.zeros(len(members) + 1, dtype=int)
        for case in cases:
            estimates = detector.detect(case.image).positions
            fine = detector.last_reading.apply(prepare_for_refiner(case.image, refiner.config, detector.model.intensity))
            found = [refine_positions(member, fine, estimates, device=detector.device) for member in members]
            trusted = np.stack([f.peaks >= threshold for f in found])
            points = np.stack([f.positions for f in found])
            votes = trusted.sum(axis=0)
            counts += np.bincount(votes, minlength=len(members) + 1)
            trusted_mean = (points * trusted[..., None]).sum(axis=0) / np.maximum(votes, 1)[:, None]
            any_rule = np.where((votes > 0)[:, None], trusted_mean, estimates)
            majority_rule = np.where((2 * votes > len(members))[:, None], trusted_mean, estimates)
            all_rule = np.where((votes == len(members))[:, None], points.mean(axis=0), estimates)
            truth = truths[case.name].positions
            for key, positions in (("global", estimates), ("any network", any_rule), ("most networks", majority_rule),
                                   ("all networks", all_rule)):
                errors[key].append(np.linalg.norm(positions - truth, axis=1))
        mre = ", ".join(f"{key} {np.mean(values):.3f} mm ({100 * np.mean(np.concatenate(values) > 4):.2f} % > 4 mm)"
                        for key, values in errors.items())
        print(f"{name} ({len(cases)} images): points trusted by 0..{len(members)} networks {counts.tolist()}; MRE {mre}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
