"""Table 2: few-case training from scratch, N = 5, 10, 25, 50, 150 ISBI images, SCN vs U-Net.

For every architecture ("scn": SpatialConfiguration-Net; "unet": its local-appearance U-Net
alone, a plain heatmap U-Net) and every N, a model is trained from scratch on the committed
subset ``splits/train_N{N}.txt`` (nested, seeded; see isbi2015.py) for the same number of
iterations, with no validation and no model selection (the last iterate is evaluated): a
held-out validation set would give the small-N runs more annotated images than N. Each model
is evaluated on test1 against the senior and the mean annotation.

    python scripts/experiments/few_cases.py                        # GPU, reference protocol
    python scripts/experiments/few_cases.py --quick --device cpu   # small CPU pipeline check

With ``--refiner MODEL`` every global model is evaluated a second time with the local refinement
stage of that file attached (the same networks for every N and both architectures: "the same
refinement"). When that file's local stage was trained on more than N images, the refined columns
are not few-case results: they show how much of each global stage's error one local stage recovers.

CPU protocol of the shipped global stage (grid 256, 32 filters, lr 5e-4, batch 1), with a stated
budget per run and the shipped local stage::

    python scripts/experiments/few_cases.py --device cpu --threads 2 --grid-size 256 --filters 32 \
        --learning-rate 5e-4 --batch-size 1 --iterations 1500 --test-images 75 \
        --refiner SCNLandmarks/Resources/Models/cephalometric_isbi2015.scn.pt \
        --output scripts/experiments/results/cpu/few_cases

Rerunning the same command reuses finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X

NAME = "few_cases"
FULL_ITERATIONS = 10_000
QUICK_ITERATIONS = 300
ARCHITECTURES = ("scn", "unet")
LABELS = {"scn": "SCN", "unet": "U-Net"}


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    X.add_common_arguments(parser, name=NAME, full_iterations=FULL_ITERATIONS, quick_iterations=QUICK_ITERATIONS)
    parser.add_argument("--sizes", default=",".join(str(n) for n in X.FEW_CASE_SIZES),
                        help="comma-separated N (each needs a committed splits/train_N{N}.txt)")
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES), help="comma-separated: scn, unet")
    parser.add_argument("--train-annotation", default="mean", choices=["senior", "mean"],
                        help="training labels (default: the mean of both doctors)")
    parser.add_argument("--keep-models", action="store_true", help="keep every run's model file")
    parser.add_argument("--refiner", type=Path, default=None,
                        help="also evaluate each model with the local refinement stage of this model file")
    return parser.parse_args(argv)


def _parse_list(text: str, allowed: Sequence[str] | None, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if not items or bad:
        msg = f"Unknown {what}: {', '.join(bad) or '(none)'}; choose from {', '.join(allowed or [])}"
        raise SystemExit(msg)
    return items


def run_one(architecture: str, size: int, settings: X.Settings, folder: Path, data: dict[str, Any], *,
            annotation: str, fresh: bool, keep_model: bool) -> dict[str, Any]:
    """Train one (architecture, N) model from scratch (or reuse it) and evaluate it on test1."""
    from SCNLandmarksLib.common.device import resolve_device
    from SCNLandmarksLib.inference.evaluation import write_evaluation
    from SCNLandmarksLib.learning.training import train_model

    ids = data["subsets"][size]
    key = {"architecture": architecture, "n": size, "ids": ids, "annotation": annotation,
           "settings": settings.key(), "test_ids": data["test_ids"], "refiner": data["refiner_sha256"]}
    stored = X.reusable_run(folder, key, fresh=fresh)
    if stored is not None:
        print(f"[{architecture} N={size}] reusing the finished run in {folder}")
        return stored
    print(f"[{architecture} N={size}] training from scratch on {len(ids)} images, {settings.iterations} iterations")
    device = resolve_device(settings.device)
    cases = [data["training"][i] for i in ids]
    model = X.new_model(architecture, data["names"], data["descriptions"], grid_size=settings.grid_size,
                        filters=settings.filters)
    X.reset_peak_memory(device)
    result = train_model(cases, model, output=folder / "model.scn.pt",
                         config=X.training_config(settings, validate_every=0), validation_cases=[],
                         checkpoint=folder / "checkpoint.pt", resume=(folder / "checkpoint.pt").exists(), progress=X.progress_bar(), overwrite=True)
    peak = X.peak_memory_mib(device)
    predictions, seconds = X.detect_all(result.model, data["test"], settings.device)
    reports = X.evaluate_against(predictions, data["test_truths"])
    for truth, report in reports.items():
        write_evaluation(report, folder / f"test1-{truth}", overwrite=True)
    refined: dict[str, Any] = {}
    if data["refiner"] is not None:
        with_local_stage = dataclasses.replace(result.model, refiner=data["refiner"])
        refined_reports = X.evaluate_against(X.detect_all(with_local_stage, data["test"], settings.device)[0],
                                             data["test_truths"])
        for truth, report in refined_reports.items():
            write_evaluation(report, folder / f"test1-refined-{truth}", overwrite=True)
        refined = {t: X.summary(r) for t, r in refined_reports.items()}
    if not keep_model:
        (folder / "model.scn.pt").unlink(missing_ok=True)
    results = {
        "architecture": architecture, "n": size, "training_ids": ids,
        "training": {"iterations": result.iterations, "seconds": result.seconds, "device": result.device,
                     "peak_gpu_memory_mib": peak, "final_loss": result.history[-1]["loss"] if result.history else None},
        "detection_images_per_second": len(data["test"]) / max(seconds, 1e-9),
        "test1": {t: X.summary(r) for t, r in reports.items()},
        "test1_refined": refined,
    }
    return X.finish_run(folder, key, results)


def tables(runs: dict[tuple[str, int], dict[str, Any]], architectures: Sequence[str], sizes: Sequence[int]) -> str:
    parts = []
    refined = all(run.get("test1_refined") for run in runs.values())
    for truth in X.GROUND_TRUTHS:
        for key, title in (("test1", "global stage"), ("test1_refined", "global stage + the local stage")):
            if key == "test1_refined" and not refined:
                continue
            headers = ["N"] + [f"{LABELS[a]} {what}" for a in architectures for what in ("MRE (mm)", "SDR 2 mm (%)")]
            rows = []
            for size in sizes:
                row: list[str] = [str(size)]
                for architecture in architectures:
                    numbers = runs[(architecture, size)][key][truth]
                    row += [f"{X.fmt(numbers['mre_mm'])} ± {X.fmt(numbers['std_mm'])}", X.pct(numbers["sdr"]["2"])]
                rows.append(row)
            parts.append(f"## test1 vs the {truth} annotation: {title}\n\n" + X.markdown_table(headers, rows))
    headers = ["architecture", "N", "training (min)", "device", "peak GPU memory (MiB)", "SDR 2.5/3/4 mm vs mean (%)"]
    rows = [[LABELS[a], n, X.fmt(r["training"]["seconds"] / 60, 1), r["training"]["device"],
             X.fmt(r["training"]["peak_gpu_memory_mib"], 0), " / ".join(X.sdr_cells(r["test1"]["mean"])[1:])]
            for (a, n), r in runs.items()]
    parts.append("## Time\n\n" + X.markdown_table(headers, rows))
    return "\n\n".join(parts)


def plot(runs: dict[tuple[str, int], dict[str, Any]], architectures: Sequence[str], sizes: Sequence[int],
         path: Path, note: str) -> Path:
    styles = {"scn": "o", "unet": "s"}
    colors = {"scn": "tab:blue", "unet": "tab:orange"}
    mre, sdr = [], []
    for architecture in architectures:
        for truth, line in (("mean", "-"), ("senior", "--")):
            values = [runs[(architecture, n)]["test1"][truth] for n in sizes]
            label = f"{LABELS[architecture]} vs {truth}"
            style, color = styles.get(architecture, "o") + line, colors.get(architecture)
            mre.append(X.Series(label, sizes, [v["mre_mm"] for v in values], style, color=color))
            sdr.append(X.Series(label, sizes, [None if v["sdr"]["2"] is None else 100 * v["sdr"]["2"] for v in values],
                                style, color=color))
    return X.plot_panels(path, f"Few-case training on ISBI 2015, test1\n{note}",
                         [("training images N", "MRE (mm, log scale)", mre), ("training images N", "SDR 2 mm (%)", sdr)],
                         log_x=True, log_y=(0,), x_ticks=sizes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run table 2; returns what ``results.json`` holds."""
    args = parse_arguments(argv)
    settings = X.settings_from_arguments(args, full_iterations=FULL_ITERATIONS, quick_iterations=QUICK_ITERATIONS)
    architectures = _parse_list(args.architectures, ARCHITECTURES, "architecture")
    sizes = sorted({int(s) for s in _parse_list(args.sizes, None, "size")})
    folder = X.output_folder(args, NAME)
    isbi = X.isbi_folder(X.find_data_folder(args.data))
    note = X.quick_note(settings)
    print(note)
    subsets = {n: X.checked_training_ids(f"train_N{n}", isbi) for n in sizes}
    needed = sorted({i for ids in subsets.values() for i in ids})
    test_ids = X.test1_ids(isbi, settings.test_images)
    print(f"Loading {len(needed)} training and {len(test_ids)} test1 images from {isbi}")
    names, descriptions = X.landmark_names()
    refiner, refiner_sha256 = None, None
    if args.refiner is not None:
        from SCNLandmarksLib.models.catalog import file_sha256
        from SCNLandmarksLib.models.model_file import load_model

        refiner = load_model(args.refiner).refiner
        if refiner is None:
            raise SystemExit(f"{args.refiner} has no local refinement stage")
        refiner_sha256 = file_sha256(args.refiner)
    training = X.load_isbi_cases(isbi, needed, annotation=args.train_annotation)
    truths = X.load_ground_truths(isbi, test_ids)
    data = {"names": names, "descriptions": descriptions, "subsets": subsets, "test_ids": test_ids,
            "training": {c.name: c for c in training}, "test": X.load_isbi_cases(isbi, test_ids),
            "test_truths": {t: truths[t] for t in X.GROUND_TRUTHS}, "refiner": refiner, "refiner_sha256": refiner_sha256}
    runs = {}
    for architecture in architectures:
        for size in sizes:
            runs[(architecture, size)] = run_one(architecture, size, settings, folder / f"{architecture}-N{size:03d}",
                                                 data, annotation=args.train_annotation, fresh=args.fresh,
                                                 keep_model=args.keep_models)
    body = (f"Trained from scratch on `splits/train_N{{N}}.txt` ({args.train_annotation} annotation), "
            f"{settings.iterations} iterations each, no validation (last iterate); test1 {len(test_ids)} images. "
            "MRE ± SD; SDR = share of points with error <= r mm."
            + (f" Refined: the local stage of `{args.refiner.name}` (SHA-256 {refiner_sha256[:12]}...), the same "
               "networks for every run." if refiner_sha256 else "") + "\n\n" + tables(runs, architectures, sizes))
    X.write_table(folder, "Table 2: few-case training, SCN vs U-Net, ISBI 2015 test1", note, body)
    plot(runs, architectures, sizes, folder / "few_cases.png", note)
    results = {"experiment": NAME, "quick": settings.quick, "note": note, "settings": settings.to_dict(),
               "training_annotation": args.train_annotation, "refiner": None if args.refiner is None else
               {"file": str(args.refiner), "sha256": refiner_sha256}, "environment": X.environment(),
               "test_ids": test_ids, "runs": list(runs.values())}
    X.write_json(folder / "results.json", results)
    print((folder / "table.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
