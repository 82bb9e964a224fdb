"""What limits fine-tuning on the simulated other device? (issue 13)

Two measurements with the shipped model, mean of both doctors, test1 images other than the 10
corrected cases (151-160):

1. **Which part of the device costs what**: the device of ``promise_loop.py`` (gamma 0.3, blur
   1.5 mm, noise 10 % of the grey range) one part at a time and all together, read by the global
   stage alone and with the local stage (``--images`` test images, 40 by default).
2. **How far more cases and steps go**: both stages trained on N device cases for ``--steps`` steps
   each (global lr 2e-4, local lr 5e-4, no cross-validation, no time limit), then measured on the
   140 other device images, global stage alone and with the local stage (trusted as trained, and
   only where its peak reaches half its target's: a fine-tuning choice). N = 10 are the corrected
   cases 151-160; N = 50 are the training images of ``splits/train_N50.txt``.

    python scripts/experiments/device_limits.py --output scripts/experiments/results/cpu/device_limits
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
import promise_loop as P

NO_DEVICE = {"gamma": 1.0, "blur_mm": 0.0, "noise": 0.0}
# Each entry: the parts of the device applied (P.simulate_device's options), the others left out.
PARTS = {
    "usual images": {},
    "gamma 0.3": {"gamma": P.DEVICE_GAMMA},
    "blur 1.5 mm": {"blur_mm": P.DEVICE_BLUR_MM},
    "noise 10 %": {"noise": P.DEVICE_NOISE},
    "blur and noise": {"blur_mm": P.DEVICE_BLUR_MM, "noise": P.DEVICE_NOISE},
    "the whole device": {"gamma": P.DEVICE_GAMMA, "blur_mm": P.DEVICE_BLUR_MM, "noise": P.DEVICE_NOISE},
}


def errors(model: Any, cases: Sequence[Any], truths: dict[str, Any], *, half_trust: bool = False) -> dict[str, dict[str, float]]:
    """MRE and SDR@2mm of the global stage alone and with the local stage (``half_trust``: also with the
    local stage trusted only where its peak reaches half its target's, a choice of the fine-tuning)."""
    import dataclasses

    def measure(refine: bool) -> dict[str, float]:
        numbers = X.summary(X.evaluate_against(X.detect_all(model, cases, "cpu", refine=refine)[0], {"t": truths})["t"])
        return {"mre_mm": numbers["mre_mm"], "sdr2": numbers["sdr"]["2"]}

    out = {"global stage": measure(False), "both stages": measure(True)}
    if half_trust:
        trained = model.refiner.config
        model.refiner.config = dataclasses.replace(trained, min_peak_fraction=0.5)
        out["local stage trusted at 0.5"] = measure(True)
        model.refiner.config = trained
    return out


def train_on(cases: Sequence[Any], steps: int, folder: Path) -> tuple[Any, float]:
    from SCNLandmarksLib.learning.refinement_training import RefinerTrainingConfig, train_refiner
    from SCNLandmarksLib.learning.training import TrainingConfig, train_model
    from SCNLandmarksLib.models.model_file import load_model

    began = time.perf_counter()
    model = load_model(P.SHIPPED)
    config = TrainingConfig(iterations=steps, learning_rate=2e-4, device="cpu", validate_every=0,
                            validation_fraction=0.0, checkpoint_every=0)
    model = train_model(cases, model, output=folder / f"global-{len(cases)}.scn.pt", config=config,
                        validation_cases=[], progress=X.progress_bar(), overwrite=True).model
    local = RefinerTrainingConfig(iterations=steps, learning_rate=5e-4, batch_size=8, device="cpu", validate_every=0,
                                  checkpoint_every=0)
    model = train_refiner(cases, model, output=folder / f"both-{len(cases)}.scn.pt", config=local, validation_cases=[],
                          progress=X.progress_bar(), overwrite=True).model
    return model, time.perf_counter() - began


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=40, help="test images for the parts of the device")
    parser.add_argument("--steps", type=int, default=400, help="steps of each stage when training on device cases")
    parser.add_argument("--counts", default="10,50", help="numbers of device cases to train on (10 or up to 50)")
    parser.add_argument("--test-images", type=int, default=None, help="measure the trained models on this many images")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.models.model_file import load_model

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    args.output.mkdir(parents=True, exist_ok=True)
    others = [i for i in X.test1_ids(isbi) if i not in P.CORRECTED_IDS]
    shipped = load_model(P.SHIPPED)
    few = X.spread(others, args.images)
    few_truths = X.load_ground_truths(isbi, few)["mean"]
    few_cases = X.load_isbi_cases(isbi, few)
    parts = {label: errors(shipped, [P.device_case(c, **{**NO_DEVICE, **options}) for c in few_cases], few_truths)
             for label, options in PARTS.items()}
    measured = X.spread(others, args.test_images)
    truths = X.load_ground_truths(isbi, measured)["mean"]
    tests = [P.device_case(c) for c in X.load_isbi_cases(isbi, measured)]
    trained = {}
    for count in (int(c) for c in args.counts.split(",")):
        ids = P.CORRECTED_IDS if count == 10 else X.read_split("train_N50")[:count]
        cases = [P.device_case(c) for c in X.load_isbi_cases(isbi, ids, annotation="mean")]
        model, seconds = train_on(cases, args.steps, args.output)
        trained[count] = {**errors(model, tests, truths, half_trust=True), "train_s": seconds, "ids": ids}
    X.write_json(args.output / "results.json", {"parts": parts, "trained": trained, "steps": args.steps,
                                                "environment": X.environment()})
    cell = lambda e: f"{e['mre_mm']:.3f} / {100 * e['sdr2']:.1f}"  # noqa: E731
    body = X.markdown_table(["images", "global stage alone: MRE mm / SDR@2mm %", "both stages"],
                            [[label, cell(row["global stage"]), cell(row["both stages"])] for label, row in parts.items()])
    body += "\n\n" + X.markdown_table(
        ["device cases", f"trained ({args.steps} steps per stage)", "global stage alone", "both stages",
         "both, local stage trusted at peak >= 0.5"],
        [[str(n), f"{row['train_s']:.0f} s", cell(row["global stage"]), cell(row["both stages"]),
          cell(row["local stage trusted at 0.5"])] for n, row in trained.items()])
    X.write_table(args.output, "What limits fine-tuning on the simulated other device",
                  f"Shipped model; mean of both doctors; parts on {len(few)} test1 images, trained models on the "
                  f"{len(measured)} test1 images other than 151-160", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
