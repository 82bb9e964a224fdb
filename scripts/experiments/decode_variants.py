"""Two ways to decode the two-stage model differently: do they pay? (issues 7 and 8)

* **Test-time shifts of the local stage** (issue 7: "a second refinement pass or test-time shifts
  only if they pay"): besides the crop centred on the global estimate, crops centred 0.6 mm (or
  0.85 mm diagonally) around it, 4 ("plus") or 8 ("all 9"); the refined points are averaged (mean
  or median).
* **The shape model choosing among the global stage's candidates** (issue 8, item 4): a point is
  implausible where its distance from where the other points place it, in units of its spread on
  the training shapes (:class:`SCNLandmarksLib.models.shape_model.ShapeModel`), exceeds ``D``. The
  most implausible point is replaced, up to 3 times per image, by
  - ``candidate``: whichever other local maximum of its global heatmap (at least ``R`` times the
    highest, refined by the local stage like the detector's point) the shape model finds most
    plausible, if it is more plausible than the point itself;
  - ``shape estimate``: the shape model's own estimate from the other points.

Everything is computed once per image with the shipped model on the 15 validation images and the
150 test1 images (mean of both doctors). A variant is chosen on the validation images alone
(lowest MRE, then fewest points > 4 mm, then fewest points changed); test1 only reports. Nothing
is written into the model. With ``--out-of-fold <cross_validation.py's folder>`` the choosing
set is the 135 training images instead, each decoded by the fold model that did not train on it
(with that model's shape model).

    python scripts/experiments/decode_variants.py --output scripts/experiments/results/cpu/decode_variants
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X

SHIPPED = X.REPOSITORY / "SCNLandmarks" / "Resources" / "Models" / "cephalometric_isbi2015.scn.pt"
SHIFT_MM = 0.6
# Crop centres as offsets (x, y) in units of SHIFT_MM; index 4 is the detector's own crop.
OFFSETS = np.array([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)], dtype=float)
SHIFT_SETS = {"centre only (the engine)": [4], "plus (5 crops)": [1, 3, 4, 5, 7], "all 9 crops": list(range(9))}
CANDIDATES = 4  # the maximum and up to 3 other local maxima per heatmap
ANY_POSITIVE = 1e-9  # candidates: every local maximum above this share of the highest (the ratios choose later)
MAX_REPLACEMENTS = 3
DEVIATION_LIMITS = (2.0, 2.5, 3.0, 4.0, 5.0)
VALUE_RATIOS = (0.05, 0.2, 0.4)


def candidates(heatmaps: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, K, 2)`` grid positions (x, y) and ``(N, K)`` values: the detector's maximum first, then other local maxima."""
    from SCNLandmarksLib.inference.shape_choice import heatmap_candidates

    positions = np.full((len(heatmaps), CANDIDATES, 2), np.nan)
    values = np.full((len(heatmaps), CANDIDATES), np.nan)
    for channel, heatmap in enumerate(heatmaps):
        # The highest peak is the detector's own (sub-pixel) point; the others follow it.
        positions[channel, 0], values[channel, 0] = first[channel], heatmap.max()
        others, found = heatmap_candidates(heatmap, ratio=ANY_POSITIVE, count=CANDIDATES - 1)
        positions[channel, 1:1 + len(others)], values[channel, 1:1 + len(others)] = others, found
    return positions, values


def collect(model: Any, cases: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per image: the refined candidates ``(N, K, 2)`` mm, their values, and the shifted refinements ``(N, 9, 2)``."""
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.models.decode import heatmap_maxima
    from SCNLandmarksLib.models.refinement import prepare_for_refiner, refine_positions

    detector = Detector(model, device="cpu")
    found: dict[str, list[np.ndarray]] = {"candidates": [], "values": [], "shifted": [], "seconds": []}
    for number, case in enumerate(cases):
        heatmaps, grid = detector.heatmaps(case.image)
        first, _ = heatmap_maxima(heatmaps)
        grid_positions, values = candidates(heatmaps, first)
        physical = np.stack([grid.grid_to_physical(grid_positions[:, k]) for k in range(CANDIDATES)], axis=1)
        fine = prepare_for_refiner(case.image, model.refiner.config, model.intensity)

        def refine(estimates: np.ndarray) -> np.ndarray:
            with detector._precision():  # the detector's own precision
                return refine_positions(model.refiner, fine, estimates, device=detector.device).positions

        refined = np.stack([refine(physical[:, k]) for k in range(CANDIDATES)], axis=1)
        began = time.perf_counter()
        shifted = np.stack([refined[:, 0] if i == 4 else refine(physical[:, 0] + SHIFT_MM * o)
                            for i, o in enumerate(OFFSETS)], axis=1)
        found["seconds"].append(np.array(time.perf_counter() - began))
        found["candidates"].append(refined)
        found["values"].append(values)
        found["shifted"].append(shifted)
        print(f"{number + 1}/{len(cases)}", end="\r", flush=True)
    print()
    return {name: np.stack(arrays) for name, arrays in found.items()}


def shape_choice(refined: np.ndarray, values: np.ndarray, shape: Any, limit: float, ratio: float | None) -> tuple[np.ndarray, int]:
    """One image's points after up to MAX_REPLACEMENTS implausible ones were replaced (``ratio`` None: shape estimate).

    With a ``ratio`` this is the detector's own choice (:func:`replace_implausible_points`) among
    the refined candidates whose heatmap value is at least ``ratio`` of the maximum's.
    """
    from SCNLandmarksLib.inference.shape_choice import replace_implausible_points

    if ratio is not None:
        def propose(channel: int) -> np.ndarray:
            usable = np.isfinite(values[channel, 1:]) & (values[channel, 1:] >= ratio * values[channel, 0])
            return np.where(usable[:, None], refined[channel, 1:], np.nan)

        positions, chosen = replace_implausible_points(refined[:, 0], shape, propose, limit=limit,
                                                       max_replacements=MAX_REPLACEMENTS)
        return positions, len(chosen)
    positions = refined[:, 0].copy()
    changed = 0
    for _ in range(MAX_REPLACEMENTS):
        deviation = shape.deviations(positions) / shape.spread_mm
        worst = int(np.nanargmax(deviation))
        if deviation[worst] <= limit:
            break
        positions[worst] = shape.prediction(positions, worst)
        changed += 1
    return positions, changed


def scores(positions: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    errors = np.linalg.norm(positions - truth, axis=-1)
    return {"mre_mm": float(errors.mean()), "sdr2": float((errors <= 2).mean()), "sdr4": float((errors <= 4).mean()),
            "over_4mm": int((errors > 4).sum())}


def variants(found: dict[str, np.ndarray], shape: Any) -> dict[str, tuple[np.ndarray, int]]:
    """``{label: (positions (M, N, 2), points changed)}`` for every variant."""
    table: dict[str, tuple[np.ndarray, int]] = {}
    for label, crops in SHIFT_SETS.items():
        for how, combine in (("mean", np.mean), ("median", np.median)):
            if len(crops) == 1 and how == "median":
                continue
            name = label if len(crops) == 1 else f"shifts: {label}, {how}"
            table[name] = (combine(found["shifted"][:, :, crops], axis=2), 0)
    for limit in DEVIATION_LIMITS:
        for ratio in (*VALUE_RATIOS, None):
            chosen = [shape_choice(r, v, shape, limit, ratio) for r, v in zip(found["candidates"], found["values"])]
            name = f"shape: D {limit}, " + ("shape estimate" if ratio is None else f"candidate, R {ratio}")
            table[name] = (np.stack([c[0] for c in chosen]), sum(c[1] for c in chosen))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--out-of-fold", type=Path, default=None,
                        help="cross_validation.py's output folder: choose on its held-out training images, each decoded "
                             "by its fold model, instead of on the validation images")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.models.model_file import load_model

    model = load_model(args.model)
    if model.refiner is None or model.shape_model is None:
        print("This experiment needs a model with a local stage and a shape model")
        return 1
    isbi = X.isbi_folder(X.find_data_folder(args.data))
    args.output.mkdir(parents=True, exist_ok=True)
    choosing = "validation" if args.out_of_fold is None else "out of fold"
    if args.out_of_fold is None:
        runs = {"validation": [(model, X.checked_training_ids("validation", isbi))]}
    else:
        folds = json.loads((args.out_of_fold / "results.json").read_text(encoding="utf-8"))["folds"]
        runs = {choosing: [(load_model(args.out_of_fold / f"fold{k + 1}" / "two_stage.scn.pt"), ids)
                           for k, ids in enumerate(folds)]}
    runs["test1"] = [(model, X.test1_ids(isbi, args.test_images))]
    sets = {split: [i for _, ids in parts for i in ids] for split, parts in runs.items()}
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for split, parts in runs.items():
        positions_by_variant: dict[str, list[np.ndarray]] = {}
        changed_by_variant: dict[str, int] = {}
        truths, times = [], []
        for part_model, ids in parts:
            truths.append(np.stack([X.load_ground_truths(isbi, ids)["mean"][i].positions for i in ids]))
            found = collect(part_model, X.load_isbi_cases(isbi, ids, annotation="mean"))
            times.append(found["seconds"])
            for name, (positions, changed) in variants(found, part_model.shape_model).items():
                positions_by_variant.setdefault(name, []).append(positions)
                changed_by_variant[name] = changed_by_variant.get(name, 0) + changed
        seconds[split] = float(np.concatenate(times).mean())
        truth = np.concatenate(truths)
        for name, positions in positions_by_variant.items():
            results.setdefault(name, {})[split] = {**scores(np.concatenate(positions), truth),
                                                   "changed": changed_by_variant[name]}
    chosen = min(results, key=lambda n: (round(results[n][choosing]["mre_mm"], 4), results[n][choosing]["over_4mm"],
                                         results[n][choosing]["changed"]))
    X.write_json(args.output / "results.json", {"variants": results, "chosen_on": choosing, "chosen": chosen,
                                                "eight_shifted_crops_seconds_per_image": seconds,
                                                "environment": X.environment()})
    rows = []
    for name, row in results.items():
        cells = [name]
        for split in sets:
            r = row[split]
            cells += [f"{r['mre_mm']:.3f}", f"{100 * r['sdr2']:.2f}", f"{100 * r['sdr4']:.2f}", str(r["over_4mm"]), str(r["changed"])]
        rows.append(cells)
    headers = ["variant"] + [f"{s}: {h}" for s in sets for h in ("MRE mm", "SDR@2mm %", "SDR@4mm %", "> 4 mm", "points changed")]
    body = X.markdown_table(headers, rows)
    body += (f"\n\nChosen on the {choosing} images (lowest MRE, then fewest points > 4 mm, then fewest changed): **{chosen}**. "
             f"The 8 shifted crops cost {seconds['test1']:.2f} s per image on top of detection (2 threads).\n")
    X.write_table(args.output, "Decoding variants: test-time shifts and shape-guided candidates",
                  f"Shipped model (the {choosing} images: {'their fold models' if args.out_of_fold else 'it'}); mean of both "
                  f"doctors; {len(sets[choosing])} {choosing} images choose, {len(sets['test1'])} test1 images report", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
