"""How gently should the local stage learn from a few cases that look like its training images?

Chooses the same-domain fine-tuning recipe of ``SCNLandmarksLib.learning.finetuning`` on the 15 validation
images only (never on test1): three folds, each fine-tunes the bundled model's local stage on 10
validation images (mean of both doctors) and measures the other 5, so every validation image is
held out once. Each recipe varies the learning rate and whether the batch-norm statistics follow
the new images; everything else is the product's (steps, crops per step, augmentation). The
table gives the held-out MRE of the starting model and of each recipe, the paired difference with
its standard error, and the MRE on the 10 cases themselves (how much the recipe memorises them).

    python scripts/experiments/finetune_recipe.py --output scripts/experiments/results/cpu/finetune_recipe

``--other-device`` asks the same of cases from another device: the validation images go through
the simulated device of ``promise_loop.py`` (truths unchanged), and each recipe trains the global
stage, then the local stage (statistics following), both at the learning rates it names, for
``--iterations`` steps each (default: what the product's time limit gives on a 2-core CPU).

    python scripts/experiments/finetune_recipe.py --other-device --output scripts/experiments/results/cpu/finetune_recipe_device
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
import promise_loop as P

# name -> (peak learning rate, batch-norm statistics frozen)
RECIPES: dict[str, tuple[float, bool]] = {
    "lr 5e-4 / statistics follow": (5e-4, False),
    "lr 5e-4 / statistics frozen": (5e-4, True),
    "lr 1.5e-4 / statistics follow": (1.5e-4, False),
    "lr 1.5e-4 / statistics frozen": (1.5e-4, True),
    "lr 5e-5 / statistics frozen": (5e-5, True),
}
# name -> (global stage's peak learning rate, or None to leave it as it is; local stage's), for cases
# from another device
DEVICE_RECIPES: dict[str, tuple[float | None, float]] = {
    "global 5e-5 / local 5e-4": (5e-5, 5e-4),
    "global 2e-4 / local 5e-4": (2e-4, 5e-4),
    "global 5e-4 / local 5e-4": (5e-4, 5e-4),
    "local only 5e-4": (None, 5e-4),
}
DEVICE_STEPS = 90
FOLDS = 3


def case_errors(model: Any, cases: list[Any], truths: dict[str, Any]) -> np.ndarray:
    """Mean point error (mm) per case."""
    from SCNLandmarksLib.inference.evaluation import point_errors

    predictions, _ = X.detect_all(model, cases, "cpu")
    return np.array([np.nanmean(point_errors(predictions[c.name], truths[c.name])) for c in cases])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: $SCN_DATA_DIR or ../shared/data)")
    parser.add_argument("--model", type=Path, default=P.SHIPPED)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--recipes", default=None, help="comma-separated names of RECIPES (DEVICE_RECIPES)")
    parser.add_argument("--other-device", action="store_true", help="cases through the simulated other device")
    parser.add_argument("--iterations", type=int, default=None,
                        help="steps per stage (default: 200; with --other-device 90, what the time limit gives on a 2-core AMD EPYC)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    from SCNLandmarksLib.learning.finetuning import DEFAULT_ITERATIONS, LOCAL_BATCH_SIZE
    from SCNLandmarksLib.models.model_file import load_model
    from SCNLandmarksLib.learning.refinement_training import RefinerTrainingConfig, train_refiner
    from SCNLandmarksLib.learning.training import TrainingConfig, train_model

    torch.set_num_threads(args.threads)
    ids, cases = X.load_validation_cases(args.data)
    if args.other_device:
        cases = [P.device_case(case) for case in cases]
    recipes = DEVICE_RECIPES if args.other_device else RECIPES
    names = args.recipes.split(",") if args.recipes else list(recipes)
    steps = args.iterations or (DEVICE_STEPS if args.other_device else DEFAULT_ITERATIONS)
    truths = {c.name: c.landmarks for c in cases}
    start = load_model(args.model)
    members = start.refiner.config.members
    order = np.random.default_rng(0).permutation(len(cases))
    folds = np.array_split(order, FOLDS)
    start_errors = case_errors(start, cases, truths)
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        first_rate, second = recipes[name]
        # Same domain: (local learning rate, statistics frozen); other device: (global rate, local rate).
        local_rate, frozen = (second, False) if args.other_device else (first_rate, bool(second))
        held_out_errors = np.full(len(cases), np.nan)
        seen_errors = []
        started = time.monotonic()
        for number, held_out in enumerate(folds):
            training = [cases[i] for i in order if i not in set(held_out.tolist())]
            config = RefinerTrainingConfig(
                iterations=steps, learning_rate=local_rate, batch_size=max(1, LOCAL_BATCH_SIZE // members),
                freeze_batch_norm=frozen, device="cpu", seed=number, validate_every=0, checkpoint_every=0)
            with tempfile.TemporaryDirectory() as scratch:
                tuned = copy.deepcopy(start)
                if args.other_device and first_rate is not None:
                    tuned = train_model(training, tuned, output=Path(scratch) / "global.scn.pt", validation_cases=[],
                                        config=TrainingConfig(iterations=steps, learning_rate=first_rate, device="cpu",
                                                              seed=number, validate_every=0, validation_fraction=0.0,
                                                              checkpoint_every=0)).model
                tuned = train_refiner(training, tuned, output=Path(scratch) / "tuned.scn.pt",
                                      config=config, validation_cases=[]).model
            held_out_errors[held_out] = case_errors(tuned, [cases[i] for i in held_out], truths)
            seen_errors.append(case_errors(tuned, training, truths).mean())
        differences = held_out_errors - start_errors
        rows[name] = {
            "global_learning_rate": first_rate if args.other_device else None, "local_learning_rate": local_rate,
            "batch_norm_frozen": frozen, "steps": steps,
            "held_out_mre_mm": float(held_out_errors.mean()), "start_mre_mm": float(start_errors.mean()),
            "difference_mm": float(differences.mean()),
            "difference_se_mm": float(differences.std(ddof=1) / np.sqrt(len(differences))),
            "cases_worse": int((differences > 0).sum()),
            "fine_tune_cases_mre_mm": float(np.mean(seen_errors)), "seconds": time.monotonic() - started,
        }
        print(name, rows[name], flush=True)
    table = X.markdown_table(
        [f"recipe ({'global then local' if args.other_device else 'local'} stage, {steps} steps)", "held-out MRE (mm)", "change vs start (mm)", "images worse",
         "MRE on its 10 cases (mm)", "s per fold"],
        [[name, X.fmt(r["held_out_mre_mm"], 3), f"{r['difference_mm']:+.3f} ± {r['difference_se_mm']:.3f}",
          f"{r['cases_worse']} of {len(cases)}", X.fmt(r["fine_tune_cases_mre_mm"], 3), f"{r['seconds'] / FOLDS:.0f}"]
         for name, r in rows.items()])
    note = (f"15 ISBI validation images{' through the simulated other device' if args.other_device else ''}, {FOLDS} folds of 10 fine-tuning / 5 held-out images, mean of both doctors; "
            f"starting model (bundled) {start_errors.mean():.3f} mm on the same images; 2 CPU threads")
    args.output.mkdir(parents=True, exist_ok=True)
    title = "Other-device" if args.other_device else "Same-domain"
    X.write_table(args.output, f"{title} fine-tuning recipe, chosen on validation images", note, table)
    X.write_json(args.output / "results.json", {"rows": rows, "ids": ids, "folds": [[ids[i] for i in f] for f in folds],
                                                "start_case_errors_mm": start_errors.tolist(), "environment": X.environment()})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
