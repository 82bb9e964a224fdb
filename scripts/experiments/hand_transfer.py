"""Table 3: transfer to hand radiographs: fine-tuning the cephalometric model vs training from scratch.

hand9 has 9 images with 37 landmarks. Each fold (``splits/hand9_fold{k}_test.txt``) trains on
6 images and tests on the other 3; fold 1 is the reference 6/3 split, folds 2 and 3 let every
image be tested once. Two arms, identical in everything but the starting weights:

* ``fine-tuned``: the cephalometric model with new output heads for the 37 hand landmarks and
  its body reused (``SCNLandmarksLib.learning.training.adapt_to_landmarks``);
* ``scratch``: a freshly initialised network of the same configuration and input grid.

Both train for the same iterations and learning rate, without validation (the last iterate is
evaluated). The learning curve (test error every ``--curve-every`` iterations) is measured by
watching the model during training; it is never used to choose anything. Errors are in mm
through the spacing in each .mha header (a normalisation, see the data README).

    python scripts/experiments/hand_transfer.py                        # GPU, reference protocol
    python scripts/experiments/hand_transfer.py --quick --device cpu   # needs train_isbi.py --quick first
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X

NAME = "hand_transfer"
FULL_ITERATIONS = 4000
QUICK_ITERATIONS = 300
ARMS = ("fine-tuned", "scratch")


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    X.add_common_arguments(parser, name=NAME, full_iterations=FULL_ITERATIONS, quick_iterations=QUICK_ITERATIONS)
    parser.add_argument("--ceph-model", type=Path, default=None,
                        help="the cephalometric model to fine-tune (default: the one train_isbi.py shipped in its "
                             "results folder, else the bundled default model)")
    parser.add_argument("--folds", default=None, help="comma-separated folds 1-3 (default 1,2,3; 1 with --quick)")
    parser.add_argument("--curve-every", type=int, default=None,
                        help="iterations between learning-curve points (default a tenth of the run)")
    parser.add_argument("--keep-models", action="store_true", help="keep the trained hand models")
    return parser.parse_args(argv)


def find_ceph_model(args: argparse.Namespace) -> Path:
    """``--ceph-model``, else train_isbi's shipped output (quick or full), else the bundled default."""
    from SCNLandmarksLib.models.catalog import default_model

    if args.ceph_model is not None:
        if not args.ceph_model.is_file():
            msg = f"The cephalometric model {args.ceph_model} does not exist"
            raise SystemExit(msg)
        return args.ceph_model
    subfolder = X.RESULTS / ("quick-cpu/train_isbi" if args.quick else "train_isbi")
    candidate = subfolder / "cephalometric_isbi2015.scn.pt"
    if candidate.is_file():
        return candidate
    bundled = default_model()
    if bundled is not None and not args.quick:
        return bundled
    msg = (f"No cephalometric model found ({candidate} is missing). Run scripts/experiments/train_isbi.py"
           f"{' --quick' if args.quick else ''} first, or pass --ceph-model.")
    raise SystemExit(msg)


class CurveWatcher:
    """A progress callback that also scores the model under training on the test images.

    The model is trained in place by ``train_model``, so looking at it every ``every``
    iterations gives a learning curve without changing the training (evaluation mode is
    switched on and back off; no random numbers are drawn). The scores choose nothing.
    """

    def __init__(self, model: Any, cases: Sequence[Any], every: int, device: str, bar: Any) -> None:
        self.model, self.cases, self.every, self.device, self.bar = model, cases, every, device, bar
        self.points: list[dict[str, Any]] = []

    def score(self, iteration: int) -> None:
        predictions, _ = X.detect_all(self.model, self.cases, self.device)
        truths = {c.name: c.landmarks for c in self.cases}
        report = X.evaluate_against(predictions, {"truth": truths}, radii=X.HAND_RADII_MM)["truth"]
        self.points.append({"iteration": iteration, **X.summary(report)})

    def __call__(self, progress: Any) -> None:
        self.bar(progress)
        done = progress.done
        if progress.stage == "train" and done % self.every == 0 and all(p["iteration"] != done for p in self.points):
            self.score(done)


def run_arm(arm: str, fold: int, ceph_path: Path, settings: X.Settings, folder: Path, data: dict[str, Any], *,
            curve_every: int, fresh: bool, keep_model: bool) -> dict[str, Any]:
    """Train one arm on one fold's 6 images (or reuse it) and evaluate on its 3 test images."""
    from SCNLandmarksLib.common.device import resolve_device
    from SCNLandmarksLib.inference.evaluation import write_evaluation
    from SCNLandmarksLib.models.model import create_model
    from SCNLandmarksLib.models.model_file import load_model
    from SCNLandmarksLib.models.network import NetworkConfig
    from SCNLandmarksLib.learning.training import adapt_to_landmarks, train_model

    train_ids, test_ids = data["folds"][fold]
    key = {"arm": arm, "fold": fold, "train_ids": train_ids, "test_ids": test_ids,
           "ceph_sha256": data["ceph_sha256"], "settings": settings.key(), "curve_every": curve_every}
    stored = X.reusable_run(folder, key, fresh=fresh)
    if stored is not None:
        print(f"[{arm} fold {fold}] reusing the finished run in {folder}")
        return stored
    names = X.hand_names()
    ceph = load_model(ceph_path)
    if arm == "fine-tuned":
        model = adapt_to_landmarks(ceph, names)
    else:
        config = NetworkConfig.from_dict({**ceph.config.to_dict(), "num_landmarks": len(names)})
        model = create_model(config, grid=ceph.grid, landmark_names=names, intensity=ceph.intensity)
    print(f"[{arm} fold {fold}] training on {', '.join(train_ids)}; testing on {', '.join(test_ids)}")
    device = resolve_device(settings.device)
    model.to(device)
    test_cases = [data["cases"][i] for i in test_ids]
    watcher = CurveWatcher(model, test_cases, curve_every, settings.device, X.progress_bar())
    watcher.score(0)
    X.reset_peak_memory(device)
    result = train_model([data["cases"][i] for i in train_ids], model, output=folder / "model.scn.pt",
                         config=X.training_config(settings, validate_every=0), validation_cases=[],
                         checkpoint=folder / "checkpoint.pt", resume=(folder / "checkpoint.pt").exists(), progress=watcher, overwrite=True)
    peak = X.peak_memory_mib(device)
    predictions, _ = X.detect_all(result.model, test_cases, settings.device)
    report = X.evaluate_against(predictions, {"truth": {c.name: c.landmarks for c in test_cases}},
                                radii=X.HAND_RADII_MM)["truth"]
    write_evaluation(report, folder / "test", overwrite=True)
    if not watcher.points or watcher.points[-1]["iteration"] != result.iterations:
        watcher.points.append({"iteration": result.iterations, **X.summary(report)})
    if not keep_model:
        (folder / "model.scn.pt").unlink(missing_ok=True)
    results = {
        "arm": arm, "fold": fold, "train_ids": train_ids, "test_ids": test_ids,
        "training": {"iterations": result.iterations, "seconds": result.seconds, "device": result.device,
                     "peak_gpu_memory_mib": peak},
        "test": X.summary(report),
        "errors_mm": [e for case in report["per_case"].values() for e in case["errors_mm"].values() if e is not None],
        "curve": watcher.points,
    }
    return X.finish_run(folder, key, results)


def pooled(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """MRE, SD, median and SDR over all test points of the given runs (each image tested once)."""
    import numpy as np

    errors = np.array([e for r in runs for e in r["errors_mm"]], dtype=float)
    return {"mre_mm": float(errors.mean()), "std_mm": float(errors.std()), "median_mm": float(np.median(errors)),
            "sdr": {f"{r:g}": float((errors <= r).mean()) for r in X.HAND_RADII_MM},
            "num_points": int(errors.size), "num_cases": sum(r["test"]["num_cases"] for r in runs)}


def table(runs: dict[tuple[str, int], dict[str, Any]], folds: Sequence[int]) -> str:
    headers = ["arm", "fold", "test images", "MRE ± SD (mm)", "median (mm)",
               *(f"SDR {r:g} mm (%)" for r in X.HAND_RADII_MM), "training (min)"]
    rows = []
    for arm in ARMS:
        for fold in folds:
            r = runs[(arm, fold)]
            rows.append([arm, fold, ", ".join(r["test_ids"]), f"{X.fmt(r['test']['mre_mm'])} ± {X.fmt(r['test']['std_mm'])}",
                         X.fmt(r["test"]["median_mm"]), *X.sdr_cells(r["test"], X.HAND_RADII_MM),
                         X.fmt(r["training"]["seconds"] / 60, 1)])
        if len(folds) > 1:
            p = pooled([runs[(arm, f)] for f in folds])
            rows.append([f"**{arm}**", "all", f"{p['num_cases']} images", f"{X.fmt(p['mre_mm'])} ± {X.fmt(p['std_mm'])}",
                         X.fmt(p["median_mm"]), *X.sdr_cells(p, X.HAND_RADII_MM), "-"])
    return X.markdown_table(headers, rows)


def plot(runs: dict[tuple[str, int], dict[str, Any]], folds: Sequence[int], path: Path, note: str) -> Path:
    """Test MRE and SDR 4 mm against training iterations, per fold (thin) and their mean (thick)."""
    import numpy as np

    mre, sdr = [], []
    for arm, style, color in (("fine-tuned", "o-", "tab:blue"), ("scratch", "s--", "tab:orange")):
        curves = [runs[(arm, f)]["curve"] for f in folds]
        for fold, curve in zip(folds, curves):
            if len(folds) > 1:
                x = [p["iteration"] for p in curve]
                mre.append(X.Series("", x, [p["mre_mm"] for p in curve], style, alpha=0.3, color=color))
        shared = sorted(set.intersection(*({p["iteration"] for p in c} for c in curves)))
        by = [{p["iteration"]: p for p in c} for c in curves]
        mean_mre = [float(np.mean([b[i]["mre_mm"] for b in by])) for i in shared]
        mean_sdr = [100 * float(np.mean([b[i]["sdr"]["4"] for b in by])) for i in shared]
        label = f"{arm} (mean of {len(folds)} fold{'s' if len(folds) > 1 else ''})"
        mre.append(X.Series(label, shared, mean_mre, style, color=color))
        sdr.append(X.Series(arm, shared, mean_sdr, style, color=color))
    return X.plot_panels(path, f"hand9: fine-tuning the cephalometric model vs scratch (6 train / 3 test)\n{note}",
                         [("iteration", "test MRE (mm, log scale)", mre), ("iteration", "test SDR 4 mm (%)", sdr)],
                         log_y=(0,))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run table 3; returns what ``results.json`` holds."""
    from SCNLandmarksLib.models.catalog import file_sha256
    from SCNLandmarksLib.models.model_file import read_model_description

    args = parse_arguments(argv)
    settings = X.settings_from_arguments(args, full_iterations=FULL_ITERATIONS, quick_iterations=QUICK_ITERATIONS)
    ceph_path = find_ceph_model(args)
    description = read_model_description(ceph_path)
    # Both arms use the cephalometric model's network and grid: the comparison is about weights only.
    settings.grid_size = description.grid_size[0]
    settings.filters = int(description.network["filters"])
    folds = sorted({int(f) for f in (args.folds or ("1" if args.quick else "1,2,3")).split(",") if f.strip()})
    if not folds or any(f not in (1, 2, 3) for f in folds):
        raise SystemExit(f"Folds must be among 1, 2, 3; got {args.folds}")
    curve_every = args.curve_every or max(10, settings.iterations // 10)
    curve_every = max(10, (curve_every + 9) // 10 * 10)  # progress reports come every 10 iterations
    folder = X.output_folder(args, NAME)
    hand = X.hand_folder(X.find_data_folder(args.data))
    settings.test_images = None  # every fold tests on its own 3 hand images
    tested = f"hand9 fold{'s' if len(folds) > 1 else ''} {','.join(map(str, folds))}"
    note = X.quick_note(settings, tested=tested) + f"; from {ceph_path.name}"
    print(note)
    all_ids = X.read_landmark_rows(hand / "landmarks.csv")
    fold_ids = {f: X.hand_fold_ids(f, all_ids) for f in folds}
    needed = sorted({i for train, test in fold_ids.values() for i in train + test})
    print(f"Loading {len(needed)} hand images from {hand}")
    data = {"folds": fold_ids, "cases": {c.name: c for c in X.load_hand_cases(hand, needed)},
            "ceph_sha256": file_sha256(ceph_path)}
    runs = {}
    for fold in folds:
        for arm in ARMS:
            runs[(arm, fold)] = run_arm(arm, fold, ceph_path, settings, folder / f"{arm}-fold{fold}", data,
                                        curve_every=curve_every, fresh=args.fresh, keep_model=args.keep_models)
    body = (f"{settings.iterations} iterations per run, learning rate {settings.learning_rate:g}, no validation "
            f"(last iterate); network and grid of `{ceph_path.name}` ({settings.filters} filters, "
            f"{settings.grid_size}x{settings.grid_size}). Errors in mm through the normalising .mha spacing. "
            "SDR = share of points with error <= r mm.\n\n" + table(runs, folds))
    X.write_table(folder, "Table 3: hand9 transfer, fine-tuned cephalometric model vs scratch", note, body)
    plot(runs, folds, folder / "hand_transfer.png", note)
    results = {"experiment": NAME, "quick": settings.quick, "note": note, "settings": settings.to_dict(),
               "ceph_model": str(ceph_path), "ceph_sha256": data["ceph_sha256"], "environment": X.environment(),
               "runs": list(runs.values()),
               "pooled": {arm: pooled([runs[(arm, f)] for f in folds]) for arm in ARMS}}
    X.write_json(folder / "results.json", results)
    print((folder / "table.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
