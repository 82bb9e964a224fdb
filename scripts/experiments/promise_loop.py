"""Table 5: the promise loop. Detect, correct 10 cases, fine-tune, detect better: does it hold?

Scenarios, all with the shipped model and the tool's defaults (no option set):

* **same domain**: 10 corrected ISBI test1 cases (151-160; ``--corrected`` picks others) fine-tune
  the model; before and after on the other test1 images, against the same annotation as the
  corrections (``--annotation``: the mean of both doctors by default, which the model learned;
  ``senior``: as one doctor would correct them, see ``promise_loop_senior.py``).
* **left-facing** and **inverted**: the test images mirrored left-right, and as negatives.
* **other device** (simulated): every image through a device the model never saw
  (``simulate_device``; ``--devices`` picks them, see ``DEVICES``):

  - ``blurred`` (the default): a low-dose, low-resolution device: gamma 0.3, Gaussian blur
    sigma 1.5 mm, additive noise 10 % of the grey range. The blur removes detail that no
    fine-tuning brings back (``device_limits.py``).
  - ``noisy``: the same low dose at the usual resolution: gamma 0.3 and noise 10 %, no blur.

  A milder device (gamma 0.5, blur 0.8 mm, noise 4 %) cost the global stage only 0.04 mm on 6
  images, and a smaller field of view (the images cropped by up to 55 mm) 0.01-0.04 mm on 20:
  neither would test adaptation.
  10 corrected cases of the device fine-tune the model; the gap is the error on the device's
  images minus the error on the usual ones, and the table states how much of it closed.
* **hand radiographs**, a new landmark set (37 points): 6 hand9 images fine-tune the
  cephalometric model (``--new-landmarks``) and, with the same steps, train the same network
  from scratch; both are measured on the 3 other images (fold 1; ``--hand-folds 1,2,3`` runs the
  three committed folds, so that each of the 9 images is tested once, and adds their pooled row).

Each fine-tune is the engine's own recipe (``SCNLandmarksLib.learning.finetuning.fine_tune``: the
local stage for the same landmark set, checked by 3-fold cross-validation on the 10 cases and
kept only when better). The table prints before, after, time and the model the tool kept.

    python scripts/experiments/promise_loop.py --output scripts/experiments/results/cpu/promise_loop
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X

NAME = "promise_loop"
SHIPPED = X.REPOSITORY / "SCNLandmarks" / "Resources" / "Models" / "cephalometric_isbi2015.scn.pt"
CORRECTED_IDS = [f"{i:03d}" for i in range(151, 161)]
DEVICE_GAMMA = 0.3
DEVICE_BLUR_MM = 1.5
DEVICE_NOISE = 0.10
DEVICE_SEED = 2015
# Named simulated devices: simulate_device's options.
DEVICES = {
    "blurred": {"gamma": DEVICE_GAMMA, "blur_mm": DEVICE_BLUR_MM, "noise": DEVICE_NOISE},
    "noisy": {"gamma": DEVICE_GAMMA, "blur_mm": 0.0, "noise": DEVICE_NOISE},
}


def simulate_device(image: Any, seed: int, *, gamma: float = DEVICE_GAMMA, blur_mm: float = DEVICE_BLUR_MM,
                    noise: float = DEVICE_NOISE) -> Any:
    """``image`` as another device would record it: gamma, blur and noise (see the module docstring).

    The parts can be set apart (``device_limits.py``): gamma 1, blur 0 and noise 0 leave each out.
    """
    from scipy import ndimage
    from SCNLandmarksLib.imaging.image import Image

    array = image.array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    unit = (array - low) / max(high - low, 1e-6)
    unit = unit ** gamma
    if blur_mm:
        unit = ndimage.gaussian_filter(unit, sigma=[blur_mm / s for s in image.geometry.spacing[::-1]])
    if noise:
        unit = unit + np.random.default_rng(seed).normal(0.0, noise, size=unit.shape).astype(np.float32)
    return Image(np.clip(unit, 0.0, 1.0) * 255.0, image.geometry)


def mirrored_case(case: Any) -> Any:
    """The case flipped along its image x axis (a left-facing radiograph), points moved with it."""
    from SCNLandmarksLib.imaging.image import Image
    from SCNLandmarksLib.data.landmarks import Landmarks
    from SCNLandmarksLib.data.training_case import TrainingCase

    geometry = case.image.geometry
    index = geometry.physical_to_index(case.landmarks.positions)
    index[:, 0] = geometry.size[0] - 1 - index[:, 0]
    image = Image(np.ascontiguousarray(case.image.array[:, ::-1]), geometry)
    return TrainingCase(image, Landmarks(case.landmarks.names, geometry.index_to_physical(index)), case.name)


def inverted_case(case: Any) -> Any:
    from SCNLandmarksLib.imaging.image import Image
    from SCNLandmarksLib.data.training_case import TrainingCase

    array = case.image.array
    return TrainingCase(Image(array.max() + array.min() - array, case.image.geometry), case.landmarks, case.name)


def device_case(case: Any, **parts: float) -> Any:
    """The case through the simulated device (``parts``: :func:`simulate_device`'s gamma, blur_mm, noise)."""
    from SCNLandmarksLib.data.training_case import TrainingCase

    return TrainingCase(simulate_device(case.image, DEVICE_SEED + int(case.name), **parts), case.landmarks, case.name)


def measure(model: Any, cases: Sequence[Any], truths: dict[str, Any], device: str) -> dict[str, Any]:
    """MRE and SDR@2mm against ``truths`` (id -> Landmarks) and seconds per image."""
    predictions, seconds = X.detect_all(model, cases, device)
    report = X.evaluate_against(predictions, {"truth": truths})["truth"]
    numbers = X.summary(report)
    return {"mre_mm": numbers["mre_mm"], "sdr2": numbers["sdr"]["2"], "seconds_per_image": seconds / len(cases)}


def fine_tune_run(cases: Sequence[Any], model: Path, output: Path, device: str, **options: Any) -> dict[str, Any]:
    from SCNLandmarksLib.learning.finetuning import fine_tune

    if output.exists():
        output.unlink()
    report = fine_tune(cases, model, output=output, device=device, progress=X.progress_bar(), **options)
    print(report.message)
    return report.to_dict()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--test-images", type=int, default=None, help="evaluate on this many of the other test1 images")
    parser.add_argument("--hand-iterations", type=int, default=600,
                        help="steps of each stage for the hand set; 0: the fine-tune recipe's own time limit, "
                             "no from-scratch row")
    parser.add_argument("--hand-folds", default="1", help="hand9 folds to run, for example 1,2,3 (default 1)")
    parser.add_argument("--scenarios", default="same,left,inverted,device,hand")
    parser.add_argument("--annotation", choices=("mean", "senior"), default="mean",
                        help="what the corrected cases follow, and what the errors are measured against")
    parser.add_argument("--corrected", default="151-160",
                        help="the test1 ids the user corrects, FIRST-LAST (default 151-160); the others are measured")
    parser.add_argument("--devices", default="blurred",
                        help=f"comma-separated simulated devices for the device scenario, of {', '.join(DEVICES)} (default blurred)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        first, last = (int(part) for part in args.corrected.split("-"))
    except ValueError:
        parser.error(f"--corrected takes FIRST-LAST test1 ids, for example 201-210; got {args.corrected!r}")
    corrected_ids = [f"{i:03d}" for i in range(first, last + 1)]
    devices = args.devices.split(",")
    unknown = [name for name in devices if name not in DEVICES]
    if unknown:
        parser.error(f"unknown --devices {unknown}; known: {', '.join(DEVICES)}")
    import torch

    torch.set_num_threads(args.threads)
    from SCNLandmarksLib.models.model_file import load_model
    from SCNLandmarksLib.data.training_case import TrainingCase

    scenarios = args.scenarios.split(",")
    data = X.find_data_folder(args.data)
    isbi = X.isbi_folder(data)
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    test_ids = X.spread([i for i in X.test1_ids(isbi) if i not in corrected_ids], args.test_images)
    truths = X.load_ground_truths(isbi, test_ids)[args.annotation]
    tests = X.load_isbi_cases(isbi, test_ids)
    corrected = X.load_isbi_cases(isbi, corrected_ids, annotation=args.annotation)
    start = load_model(args.model)
    rows: dict[str, dict[str, Any]] = {}
    usual = measure(start, tests, truths, args.device)
    rows["usual images"] = {"before": usual}
    print(f"usual: {usual}")
    if "same" in scenarios:
        report = fine_tune_run(corrected, args.model, output / "same-domain.scn.pt", args.device)
        after = measure(load_model(report["output"]), tests, truths, args.device) if report["output"] else usual
        rows["same domain, 10 corrected cases"] = {"before": usual, "after": after, "fine_tune": report}
    if "left" in scenarios:
        # Mirror the ground truth with the image (the test cases carry the senior annotation).
        mirrored = [mirrored_case(TrainingCase(c.image, truths[c.name], c.name)) for c in tests]
        rows["left-facing"] = {"before": measure(start, mirrored, {c.name: c.landmarks for c in mirrored}, args.device)}
    if "inverted" in scenarios:
        rows["inverted"] = {"before": measure(start, [inverted_case(c) for c in tests], truths, args.device)}
    for name in devices if "device" in scenarios else []:
        parts = DEVICES[name]
        device_tests = [device_case(c, **parts) for c in tests]
        before = measure(start, device_tests, truths, args.device)
        path = output / ("other-device.scn.pt" if name == "blurred" else f"other-device-{name}.scn.pt")
        report = fine_tune_run([device_case(c, **parts) for c in corrected], args.model, path, args.device)
        after = measure(load_model(report["output"]), device_tests, truths, args.device) if report["output"] else before
        gap = before["mre_mm"] - usual["mre_mm"]
        closed = (before["mre_mm"] - after["mre_mm"]) / gap if gap > 0 else float("nan")
        label = "other device (simulated)" if name == "blurred" else f"other device (simulated, {name})"
        rows[label] = {"before": before, "after": after, "fine_tune": report, "gap_closed": closed, "device": parts}
    if "hand" in scenarios:
        folds = [int(fold) for fold in args.hand_folds.split(",")]
        for fold in folds:
            rows.update(hand_rows(data, args, output, fold))
        if len(folds) > 1:
            rows.update(pooled_hand_rows(rows, folds))
    table = loop_table(rows)
    note = (f"ISBI 2015 test1 without the {len(corrected_ids)} corrected cases ({args.corrected}): {len(test_ids)} images; "
            "corrections and ground truth: "
            f"{'mean of both doctors' if args.annotation == 'mean' else 'senior doctor'}; 2 CPU threads")
    X.write_table(output, "The promise loop: before and after 10 corrected cases", note, table)
    X.write_json(output / "results.json", {"rows": rows, "test_ids": test_ids, "corrected_ids": corrected_ids,
                                           "environment": X.environment()})
    print(table)
    return 0


HAND_FINE_TUNED = "hand9 fold {fold} (6 train / 3 test), fine-tuned from ceph"
HAND_FINE_TUNED_DEFAULT = HAND_FINE_TUNED + ", default time limit"
HAND_SCRATCH = "hand9 fold {fold}, same network from scratch (lr 5e-4 / 2e-3)"


def hand_rows(data: Path, args: argparse.Namespace, output: Path, fold: int) -> dict[str, dict[str, Any]]:
    """One hand fold: fine-tuned from the cephalometric model vs from scratch, same steps."""
    from SCNLandmarksLib.models.model import create_model
    from SCNLandmarksLib.models.model_file import load_model
    from SCNLandmarksLib.models.network import NetworkConfig
    from SCNLandmarksLib.learning.refinement_training import RefinerTrainingConfig, attach_refiner, train_refiner
    from SCNLandmarksLib.learning.training import TrainingConfig, train_model

    hand = X.hand_folder(data)
    all_ids = sorted(p.stem for p in (hand / "images").glob("*.mha"))
    train_ids, test_ids = X.hand_fold_ids(fold, all_ids)
    train, test = X.load_hand_cases(hand, train_ids), X.load_hand_cases(hand, test_ids)
    truths = {c.name: c.landmarks for c in test}
    fine = fine_tune_run(train, args.model, output / f"hand{fold}-finetuned.scn.pt", args.device,
                         new_landmarks=True, iterations=args.hand_iterations or None)
    fine_row = {"after": measure(load_model(fine["output"]), test, truths, args.device), "fine_tune": fine}
    if not args.hand_iterations:
        return {HAND_FINE_TUNED_DEFAULT.format(fold=fold): fine_row}
    ceph = load_model(args.model)
    names = X.hand_names()
    config = NetworkConfig.from_dict({**ceph.config.to_dict(), "num_landmarks": len(names)})
    scratch = create_model(config, grid=ceph.grid, landmark_names=names, intensity=ceph.intensity)
    if ceph.refiner is not None:
        attach_refiner(scratch, **{k: v for k, v in ceph.refiner.config.to_dict().items()
                                   if k not in ("dimension", "num_landmarks")})
    started = time.perf_counter()
    steps = args.hand_iterations
    scratch_file = output / f"hand{fold}-scratch.scn.pt"
    global_config = TrainingConfig(iterations=steps, learning_rate=5e-4, device=args.device, validate_every=0,
                                   checkpoint_every=0)
    scratch = train_model(train, scratch, output=output / f"hand{fold}-scratch-global.scn.pt", config=global_config,
                          validation_cases=[], progress=X.progress_bar(), overwrite=True).model
    if scratch.refiner is not None:
        local_config = RefinerTrainingConfig(iterations=steps, batch_size=16, device=args.device, validate_every=0,
                                             checkpoint_every=0)
        scratch = train_refiner(train, scratch, output=scratch_file, config=local_config, validation_cases=[],
                                progress=X.progress_bar(), overwrite=True).model
    fresh = {"output": str(scratch_file), "seconds": time.perf_counter() - started, "start_error_mm": None}
    return {
        HAND_FINE_TUNED.format(fold=fold): fine_row,
        HAND_SCRATCH.format(fold=fold): {
            "after": measure(load_model(scratch_file), test, truths, args.device), "fine_tune": fresh},
    }


def pooled_hand_rows(rows: dict[str, dict[str, Any]], folds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """The hand folds' rows pooled (those the run made): every fold tests 3 images of 37 points, so the folds weigh the same."""
    pooled = {}
    for label, template in (("fine-tuned from ceph", HAND_FINE_TUNED),
                            ("fine-tuned from ceph, default time limit", HAND_FINE_TUNED_DEFAULT),
                            ("same network from scratch", HAND_SCRATCH)):
        parts = [rows[key] for key in (template.format(fold=fold) for fold in folds) if key in rows]
        if len(parts) < len(folds):
            continue
        mean = lambda key: sum(part["after"][key] for part in parts) / len(parts)  # noqa: E731
        pooled[f"hand9 folds {','.join(map(str, folds))} pooled, {label}"] = {
            "after": {key: mean(key) for key in ("mre_mm", "sdr2", "seconds_per_image")},
            "fine_tune": {"output": "per fold", "start_error_mm": None,
                          "seconds": sum(part["fine_tune"]["seconds"] for part in parts) / len(parts)},
        }
    return pooled


def loop_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = []
    for label, row in rows.items():
        before, after, report = row.get("before"), row.get("after"), row.get("fine_tune")
        cell = lambda m: "–" if m is None else f"{m['mre_mm']:.2f} / {100 * m['sdr2']:.1f}"  # noqa: E731
        kept = "–" if report is None else ("new model" if report["output"] else "starting model")
        check = "–" if report is None or report["start_error_mm"] is None else (
            f"{report['start_error_mm']:.2f} → {report['new_error_mm']:.2f}")
        extra = f"gap closed {100 * row['gap_closed']:.0f} %" if "gap_closed" in row else ""
        seconds = "–" if report is None else f"{report['seconds']:.0f}"
        speed = (after or before)["seconds_per_image"]
        lines.append([label, cell(before), cell(after), seconds, kept, check, f"{speed:.2f}", extra])
    headers = ["scenario", "before: MRE mm / SDR@2mm %", "after", "fine-tune s", "kept",
               "CV error on the cases (start → new)", "s / image", ""]
    return X.markdown_table(headers, lines)


if __name__ == "__main__":
    sys.exit(main())
