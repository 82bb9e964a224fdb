"""Table 1b: the two-stage cephalometric model (global SCN + local refinement) on ISBI 2015.

Takes a trained global stage (by default the bundled model, itself trained by
``train_isbi.py`` on ``splits/train_N135.txt``), attaches the local refinement stage and trains
it on the same 135 images (mean of both annotations), selecting the best step on the 15 images
of ``splits/validation.txt``. Then evaluates the half-precision model file on test1 with the
global stage only and with refinement, against the senior annotation and the mean of both,
and prints the ablation table. test1 chooses nothing.

    python scripts/experiments/train_refiner.py --output scripts/experiments/results/cpu/refiner
    python scripts/experiments/train_refiner.py --quick ...   # a few minutes: pipeline check only

Rerunning with the same output folder resumes from the checkpoint there. The shipped model:

    python scripts/experiments/train_refiner.py --iterations 7000 --time-budget-min 55 \
        --output scripts/experiments/results/cpu/refiner

``--continue-from`` trains an existing local stage further (tried: 1500 steps at lr 5e-4 with
nearly upright crops, ``--rotation 0.05``; the validation error did not improve, 1.07-1.13 mm
against 1.02 mm, so the shipped recipe has one phase). The second refinement pass of the
ablation was chosen against on the validation images too (1.09 mm against 1.02 mm).
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

NAME = "train_refiner"
BUNDLED = X.REPOSITORY / "SCNLandmarks" / "Resources" / "Models" / "cephalometric_isbi2015.scn.pt"
MODEL_FILE = "cephalometric_isbi2015_two_stage.scn.pt"


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: $SCN_DATA_DIR or ../shared/data)")
    parser.add_argument("--global-model", type=Path, default=BUNDLED, help="trained global stage (default: the bundled model)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the model, checkpoint, tables and JSON")
    parser.add_argument("--iterations", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--spacing", type=float, default=0.3, help="crop pixel size, mm")
    parser.add_argument("--filters", default="16,32,48,64,96")
    parser.add_argument("--target-sigma", type=float, default=0.6, help="target Gaussian width, mm")
    parser.add_argument("--offset", type=float, default=2.5, help="std of the training crop offset, mm")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--rotation", type=float, default=0.25, help="crop rotation range, radians (+-)")
    parser.add_argument("--continue-from", type=Path, default=None,
                        help="a two-stage model whose local stage trains further (a second phase of the recipe)")
    parser.add_argument("--annotation", choices=("mean", "senior"), default="mean")
    parser.add_argument("--time-budget-min", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seeds the network's initial weights and the crops")
    parser.add_argument("--test-images", type=int, default=None, help="evaluate on this many test1 images (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny run: 200 steps, 20 training images, 10 test images")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the model file already in --output")
    return parser.parse_args(argv)


def evaluate_model(path: Path, cases: Sequence[Any], truths: dict[str, Any], device: str) -> dict[str, Any]:
    """Ablation rows: global stage only and two-stage, per ground truth, plus timing."""
    from SCNLandmarksLib.models.model_file import load_model

    import dataclasses

    model = load_model(path)
    shipped_passes = model.refiner.config.passes
    rows = {}
    variants = [("global SCN only", False, shipped_passes), ("global SCN + refinement", True, 1),
                ("global SCN + refinement, second pass", True, 2)]
    for label, refine, passes in variants:
        model.refiner.config = dataclasses.replace(model.refiner.config, passes=passes)
        predictions, seconds = X.detect_all(model, cases, device, refine=refine)
        reports = X.evaluate_against(predictions, {k: truths[k] for k in X.GROUND_TRUTHS})
        rows[label] = {
            "seconds_per_image": seconds / max(1, len(cases)),
            **{gt: {"summary": X.summary(r), "per_landmark": X.per_landmark(r)} for gt, r in reports.items()},
        }
    model.refiner.config = dataclasses.replace(model.refiner.config, passes=shipped_passes)
    return rows


def ablation_table(rows: dict[str, Any]) -> str:
    body = []
    for gt in X.GROUND_TRUTHS:
        table_rows = []
        for label, values in rows.items():
            s = values[gt]["summary"]
            table_rows.append([label, f"{X.fmt(s['mre_mm'])} ± {X.fmt(s['std_mm'])}", *X.sdr_cells(s),
                               X.fmt(values["seconds_per_image"])])
        headers = ["configuration", "MRE ± SD (mm)", *[f"SDR {r:g} mm (%)" for r in X.SDR_RADII_MM], "s / image"]
        body.append(f"### Ground truth: {gt}\n\n" + X.markdown_table(headers, table_rows))
    names = list(next(iter(rows.values()))["mean"]["per_landmark"])
    per = [[n, *[X.fmt(v["mean"]["per_landmark"][n]["mre_mm"]) for v in rows.values()]] for n in names]
    body.append("### Per landmark, MRE (mm), mean ground truth\n\n" + X.markdown_table(["landmark", *rows], per))
    shipped = rows["global SCN + refinement"]
    detail = []
    for n in names:
        senior, mean = shipped["senior"]["per_landmark"][n], shipped["mean"]["per_landmark"][n]
        detail.append([n, X.fmt(senior["mre_mm"]), X.pct(senior["sdr"]["2"]), X.fmt(mean["mre_mm"]),
                       X.pct(mean["sdr"]["2"]), X.pct(mean["sdr"]["4"])])
    headers = ["landmark", "MRE senior (mm)", "SDR 2 mm senior (%)", "MRE mean (mm)", "SDR 2 mm mean (%)",
               "SDR 4 mm mean (%)"]
    body.append("### Per landmark, two-stage model (one pass)\n\n" + X.markdown_table(headers, detail))
    return "\n\n".join(body)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    import torch

    torch.set_num_threads(args.threads)
    from SCNLandmarksLib.models.model_file import load_model, save_model
    from SCNLandmarksLib.learning.refinement_training import RefinerTrainingConfig, attach_refiner, train_refiner

    data = X.isbi_folder(X.find_data_folder(args.data))
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    train_ids = X.checked_training_ids("train_N135", data)
    validation_ids = X.checked_training_ids("validation", data)
    test_ids = X.test1_ids(data, 10 if args.quick else args.test_images)
    iterations = 200 if args.quick else args.iterations
    if args.quick:
        train_ids = X.spread(train_ids, 20)
        validation_ids = validation_ids[:5]
    full_precision = output / ("full-" + MODEL_FILE)
    shipped = output / MODEL_FILE
    timings: dict[str, float] = {}
    if not args.evaluate_only:
        started = time.perf_counter()
        cases = X.load_isbi_cases(data, train_ids, annotation=args.annotation)
        validation = X.load_isbi_cases(data, validation_ids, annotation=args.annotation)
        timings["load_s"] = time.perf_counter() - started
        if args.continue_from is not None:
            model = load_model(args.continue_from)
            if model.refiner is None:
                parser_error = f"{args.continue_from} has no local stage to continue training"
                raise SystemExit(parser_error)
        else:
            model = load_model(args.global_model)
            filters = tuple(int(f) for f in args.filters.split(","))
            if args.seed:
                # Seed 0 keeps torch's start-up state, with which the shipped local stage was made.
                torch.manual_seed(args.seed)
            attach_refiner(model, patch_size=args.patch_size, spacing_mm=args.spacing, filters=filters,
                           target_sigma_mm=args.target_sigma, passes=args.passes)
        config = RefinerTrainingConfig(
            iterations=iterations, batch_size=args.batch_size, learning_rate=args.learning_rate,
            offset_mm=args.offset, rotation_rad=args.rotation, validate_every=max(50, iterations // 12), checkpoint_every=100,
            device=args.device, time_budget_s=None if args.time_budget_min is None else 60 * args.time_budget_min,
            seed=args.seed,
        )
        result = train_refiner(cases, model, output=full_precision, config=config, validation_cases=validation,
                               checkpoint=output / "refiner.checkpoint.pt",
                               resume=(output / "refiner.checkpoint.pt").exists(),
                               progress=X.progress_bar(), overwrite=True)
        timings["refiner_training_s"] = result.seconds
        model.info = {**model.info, "annotation": args.annotation, "training_ids": "splits/train_N135.txt",
                      "validation_ids": "splits/validation.txt"}
        save_model(model, shipped, overwrite=True, half_precision=True)
        print(f"Refinement stage trained in {result.seconds / 60:.1f} min; best validation MRE "
              f"{X.fmt(result.best_validation_mre_mm)} mm ({args.annotation} annotation)")
    test_cases = X.load_isbi_cases(data, test_ids)
    truths = X.load_ground_truths(data, test_ids)
    rows = evaluate_model(shipped, test_cases, truths, args.device)
    note = "QUICK / REDUCED RUN, NOT A RESULT" if args.quick else f"ISBI 2015 test1, {len(test_ids)} images, half-precision model file"
    print(write_report(output, "Two-stage model: global SCN vs + local refinement", note, rows, timings, args))
    return 0


def write_report(output: Path, title: str, note: str, rows: dict[str, Any], timings: dict[str, float],
                 args: argparse.Namespace) -> str:
    """Write the ablation table (``table.md``) and ``results.json`` into ``output``; returns the table."""
    table = ablation_table(rows)
    X.write_table(output, title, note, table)
    X.write_json(output / "results.json", {"rows": rows, "timings": timings, "environment": X.environment(),
                                           "arguments": {k: str(v) for k, v in vars(args).items()}})
    return table


if __name__ == "__main__":
    sys.exit(main())
