"""Table 1: the default cephalometric model on ISBI 2015 (train.txt only; reported on test1).

Trains each chosen configuration on the 135 images of ``splits/train_N135.txt``, selects the
best iteration on the 15 images of ``splits/validation.txt`` (both from the challenge's
train.txt), and evaluates the half-precision model file (what ships) on test1 against the
senior annotation and against the mean of senior and junior. The configuration with the
lowest validation MRE against the mean annotation is shipped as
``<output>/cephalometric_isbi2015.scn.pt`` with a filled model card; test1 never chooses.

Configurations (``--configs``; all by default, ``scn-paper`` only with ``--quick``):

* ``scn-paper``: the plain SCN of Payer et al. (2019): 512x512 fit grid (~0.47 mm), 128 filters,
  trained on the senior annotation as in the paper (AdamW instead of SGD, see SCNLandmarksLib/learning/training.py).
* ``scn-mean``: the same network trained on the mean of both annotations.
* ``scn-768-mean``: a 768x768 grid (~0.31 mm, finer heatmaps) trained on the mean annotation,
  with 1.5 times the iterations.

    python scripts/experiments/train_isbi.py                        # GPU, reference protocol
    python scripts/experiments/train_isbi.py --quick --device cpu   # small CPU pipeline check

Rerunning the same command reuses finished configurations and resumes interrupted ones from
their checkpoint (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X

NAME = "train_isbi"
FULL_ITERATIONS = 20_000
QUICK_ITERATIONS = 800
SHIPPED_FILE = "cephalometric_isbi2015.scn.pt"
SHIPPED_NAME = "Cephalometric 2D (ISBI 2015, 19 landmarks)"
# Published test1 numbers, shown beside ours for orientation (not measured here).
PUBLISHED = [
    ("landmarker PyTorch SCN (published)", 1.20, 0.845),
    ("best 2019-2020 methods, e.g. Zhong et al. 2019 (published)", 1.12, 0.869),
]
TARGET_MRE_MM = 1.15
TARGET_SDR2 = 0.86


@dataclass(frozen=True)
class Configuration:
    """One trained configuration of table 1.

    Attributes:
        name: short name (folder and table row).
        architecture: "scn" or "unet".
        annotation: training (and validation) labels: "senior" or "mean".
        grid_scale: input grid side relative to the settings' grid (1.5: 768 instead of 512).
        iteration_scale: training steps relative to the settings' iterations.
        description: one line for the table and the model card.
    """

    name: str
    architecture: str
    annotation: str
    grid_scale: float
    iteration_scale: float
    description: str

    def grid_size(self, base: int) -> int:
        # Multiples of 16 keep the SCN's 16x spatial pooling exact.
        return max(16, round(base * self.grid_scale / 16) * 16)


CONFIGURATIONS = {
    c.name: c
    for c in (
        Configuration("scn-paper", "scn", "senior", 1.0, 1.0,
                      "plain SCN (Payer et al. 2019 configuration), trained on the senior annotation"),
        Configuration("scn-mean", "scn", "mean", 1.0, 1.0,
                      "plain SCN, trained on the mean of the senior and junior annotations"),
        Configuration("scn-768-mean", "scn", "mean", 1.5, 1.5,
                      "SCN on a 1.5x finer input grid, trained on the mean annotation, 1.5x iterations"),
    )
}


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    X.add_common_arguments(parser, name=NAME, full_iterations=FULL_ITERATIONS, quick_iterations=QUICK_ITERATIONS)
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated configurations: {', '.join(CONFIGURATIONS)} "
                             "(default all; scn-paper with --quick)")
    parser.add_argument("--validate-every", type=int, default=None,
                        help="iterations between validations (default 1000; a quarter of the run with --quick)")
    return parser.parse_args(argv)


def chosen_configurations(args: argparse.Namespace) -> list[Configuration]:
    text = args.configs or ("scn-paper" if args.quick else ",".join(CONFIGURATIONS))
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown or not names:
        msg = f"Unknown configuration(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CONFIGURATIONS)}"
        raise SystemExit(msg)
    return [CONFIGURATIONS[n] for n in names]


def train_configuration(config: Configuration, settings: X.Settings, folder: Path, data: dict[str, Any], *,
                        validate_every: int, fresh: bool) -> dict[str, Any]:
    """Train (or reuse) one configuration and evaluate its half-precision file on val and test1."""
    from SCNLandmarksLib.common.device import resolve_device
    from SCNLandmarksLib.inference.evaluation import write_evaluation
    from SCNLandmarksLib.models.model_file import save_model
    from SCNLandmarksLib.learning.training import train_model

    grid = config.grid_size(settings.grid_size)
    iterations = max(1, round(settings.iterations * config.iteration_scale))
    key = {"configuration": asdict(config), "settings": settings.key(), "grid": grid, "iterations": iterations,
           "training_ids": data["training_ids"], "validation_ids": data["validation_ids"],
           "test_ids": data["test_ids"]}
    stored = X.reusable_run(folder, key, fresh=fresh)
    if stored is not None:
        print(f"[{config.name}] reusing the finished run in {folder} (--fresh retrains)")
        return stored
    print(f"[{config.name}] training {config.description}: {len(data['training'][config.annotation])} images, "
          f"grid {grid}x{grid}, {settings.filters} filters, {iterations} iterations")
    device = resolve_device(settings.device)
    # Seed 0 keeps the initial weights every earlier run (and the bundled model) started from;
    # another seed draws other initial weights as well as another augmentation stream.
    model = X.new_model(config.architecture, data["names"], data["descriptions"], grid_size=grid,
                        filters=settings.filters, seed=None if settings.seed == 0 else settings.seed)
    model.info["experiment"] = {"script": "scripts/experiments/train_isbi.py", "configuration": config.name,
                                "training_annotation": config.annotation}
    X.reset_peak_memory(device)
    result = train_model(data["training"][config.annotation], model, output=folder / "model-full.scn.pt",
                         config=X.training_config(settings, iterations=iterations, validate_every=validate_every),
                         validation_cases=data["validation"][config.annotation], checkpoint=folder / "checkpoint.pt",
                         resume=(folder / "checkpoint.pt").exists(), progress=X.progress_bar(), overwrite=True)
    peak = X.peak_memory_mib(device)
    # Evaluate exactly what ships: the half-precision file, loaded back.
    model_path = save_model(result.model, folder / "model.scn.pt", half_precision=True, overwrite=True)
    (folder / "model-full.scn.pt").unlink(missing_ok=True)
    validation_predictions, _ = X.detect_all(model_path, data["validation"]["senior"], settings.device)
    validation = X.evaluate_against(validation_predictions, data["validation_truths"])
    test_predictions, detect_seconds = X.detect_all(model_path, data["test"], settings.device)
    test = X.evaluate_against(test_predictions, data["test_truths"])
    for truth, report in test.items():
        write_evaluation(report, folder / f"test1-{truth}", overwrite=True)
    results = {
        "configuration": asdict(config),
        "grid_size": grid,
        "model": str(model_path),
        "training": {"iterations": result.iterations, "seconds": result.seconds, "device": result.device,
                     "images_per_second": result.iterations * settings.batch_size / max(result.seconds, 1e-9),
                     "peak_gpu_memory_mib": peak, "best_validation_mre_mm": result.best_validation_mre_mm,
                     "history": result.history},
        "detection": {"images": len(data["test"]), "seconds": detect_seconds,
                      "images_per_second": len(data["test"]) / max(detect_seconds, 1e-9),
                      "device": result.device, "note": "image preprocessing and decoding included"},
        "validation": {t: X.summary(r) for t, r in validation.items()},
        "test1": {t: X.summary(r) for t, r in test.items()},
        "test1_per_landmark": {t: X.per_landmark(r) for t, r in test.items()},
    }
    return X.finish_run(folder, key, results)


def inter_observer(data: dict[str, Any]) -> dict[str, Any]:
    """The junior annotation scored against the senior one on the same test images: the floor."""
    report = X.evaluate_against(data["test_truths_junior"], {"senior": data["test_truths"]["senior"]})["senior"]
    return X.summary(report)


def ship(best: dict[str, Any], folder: Path, settings: X.Settings, data: dict[str, Any], note: str,
         floor: dict[str, Any]) -> dict[str, Any]:
    """Write the shipped model (half precision, measured numbers in its info) and its model card."""
    from SCNLandmarksLib.models.catalog import file_sha256
    from SCNLandmarksLib.models.model_file import load_model, save_model

    model = load_model(best["model"])
    model.info["measured"] = {"test1": best["test1"], "validation": best["validation"], "protocol_note": note,
                              "data": "ISBI 2015 cephalometric challenge (Wang et al. 2016), train.txt only"}
    model.info["purpose"] = ("research use: cephalometric landmark detection on lateral cephalograms; "
                             "not for clinical decisions without review")
    path = save_model(model, folder / SHIPPED_FILE, half_precision=True, overwrite=True)
    digest = file_sha256(path)
    entry = {"name": SHIPPED_NAME, "file": SHIPPED_FILE, "sha256": digest, "default": True,
             "description": (f"SCN, 19 ISBI 2015 landmarks; test1 MRE {X.fmt(best['test1']['mean']['mre_mm'])} mm "
                             f"(mean of both doctors)" + ("; QUICK RUN, not for use" if settings.quick else ""))}
    X.write_json(folder / "models.json.entry.json", entry)
    card = fill_model_card(best, settings, data, note, digest, floor)
    (folder / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    return {"path": str(path), "sha256": digest, "catalog_entry": entry, "model_card": str(folder / "MODEL_CARD.md")}


def fill_model_card(best: dict[str, Any], settings: X.Settings, data: dict[str, Any], note: str, digest: str,
                    floor: dict[str, Any]) -> str:
    """The model card template with every ``{{field}}`` filled in."""
    template = X.MODEL_CARD_TEMPLATE.read_text(encoding="utf-8")
    training = best["training"]
    config = best["configuration"]
    values = {
        "model_name": SHIPPED_NAME,
        "file_name": SHIPPED_FILE,
        "sha256": digest,
        "run_note": note,
        "architecture": (f"{config['architecture'].upper()}, {settings.filters} filters, input grid "
                         f"{best['grid_size']}x{best['grid_size']} fitted to the image"),
        "landmarks": ", ".join(data["names"]),
        "training_data": (f"ISBI 2015 challenge train.txt: {len(data['training_ids'])} images "
                          f"(scripts/experiments/splits/train_N135.txt), {config['annotation']} annotation; "
                          f"{len(data['validation_ids'])} images held out for validation (validation.txt)"),
        "training_procedure": (f"{training['iterations']} AdamW iterations, batch {settings.batch_size}, "
                               f"peak learning rate {settings.learning_rate:g}, cosine decay, augmentation; best "
                               f"validation iteration kept; {training['seconds'] / 60:.1f} min on {training['device']}"),
        "evaluation_data": f"ISBI 2015 test1 (151-300): {len(data['test_ids'])} of its 150 images, 0.1 mm pixels",
        "results_table": results_markdown([best], data, include_published=True, floor=floor),
        "per_landmark_table": per_landmark_markdown(best),
        "selection": (f"{config['name']} had the lowest validation MRE against the mean annotation among the "
                      "trained configurations; test1 was not used for any choice"),
    }
    text = template
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    if "{{" in text:
        missing = text[text.index("{{") : text.index("}}", text.index("{{")) + 2]
        msg = f"The model card template has a field this script does not fill: {missing}"
        raise ValueError(msg)
    return text


def results_markdown(runs: Sequence[dict[str, Any]], data: dict[str, Any], *, include_published: bool,
                     floor: dict[str, Any] | None = None) -> str:
    headers = ["configuration", "trained on", "ground truth", "MRE ± SD (mm)", "median (mm)",
               "SDR 2 mm (%)", "2.5 mm", "3 mm", "4 mm", "val MRE vs mean (mm)"]
    rows = []
    for run in runs:
        for truth in X.GROUND_TRUTHS:
            numbers = run["test1"][truth]
            rows.append([run["configuration"]["name"], run["configuration"]["annotation"], truth,
                         f"{X.fmt(numbers['mre_mm'])} ± {X.fmt(numbers['std_mm'])}", X.fmt(numbers["median_mm"]),
                         *X.sdr_cells(numbers), X.fmt(run["validation"]["mean"]["mre_mm"])])
    if floor is not None:
        rows.append(["junior doctor (inter-observer)", "-", "senior", f"{X.fmt(floor['mre_mm'])} ± {X.fmt(floor['std_mm'])}",
                     X.fmt(floor["median_mm"]), *X.sdr_cells(floor), "-"])
    if include_published:
        for label, mre, sdr2 in PUBLISHED:
            rows.append([label, "-", "see paper", f"{mre:.2f}", "-", f"{100 * sdr2:.1f}", "-", "-", "-", "-"])
    return (f"test1: {len(data['test_ids'])} images; SDR = share of points with error <= r mm.\n\n"
            + X.markdown_table(headers, rows))


def per_landmark_markdown(run: dict[str, Any]) -> str:
    headers = ["landmark", "MRE vs senior (mm)", "SDR 2 mm vs senior (%)", "MRE vs mean (mm)",
               "SDR 2 mm vs mean (%)", "SDR 4 mm vs mean (%)"]
    senior, mean = run["test1_per_landmark"]["senior"], run["test1_per_landmark"]["mean"]
    rows = [[name, X.fmt(senior[name]["mre_mm"]), X.pct(senior[name]["sdr"]["2"]), X.fmt(mean[name]["mre_mm"]),
             X.pct(mean[name]["sdr"]["2"]), X.pct(mean[name]["sdr"]["4"])] for name in mean]
    return X.markdown_table(headers, rows)


def timing_markdown(runs: Sequence[dict[str, Any]]) -> str:
    headers = ["configuration", "grid", "device", "iterations", "training (min)", "training images/s",
               "detection images/s", "peak GPU memory (MiB)"]
    rows = [[r["configuration"]["name"], f"{r['grid_size']}x{r['grid_size']}", r["training"]["device"],
             r["training"]["iterations"],
             X.fmt(r["training"]["seconds"] / 60, 1), X.fmt(r["training"]["images_per_second"], 1),
             X.fmt(r["detection"]["images_per_second"], 2), X.fmt(r["training"]["peak_gpu_memory_mib"], 0)]
            for r in runs]
    return X.markdown_table(headers, rows) + "\n\nDetection images/s: images already in memory; resampling, normalisation, network and decoding included."


def plot_learning_curves(runs: Sequence[dict[str, Any]], path: Path, note: str) -> Path:
    series = []
    for run in runs:
        points = [(h["iteration"], h["validation_mre_mm"]) for h in run["training"]["history"]
                  if h.get("validation_mre_mm") is not None]
        if points:
            series.append(X.Series(f"{run['configuration']['name']} (vs its training labels)",
                                   [p[0] for p in points], [p[1] for p in points]))
    reference = {0: [(TARGET_MRE_MM, f"target {TARGET_MRE_MM} mm")]}
    return X.plot_panels(path, f"Validation MRE during training (15 images of train.txt)\n{note}",
                         [("iteration", "validation MRE (mm)", series)], reference_lines=reference)


def load_data(isbi: Path, settings: X.Settings, annotations: set[str]) -> dict[str, Any]:
    """Training, validation and test cases (images read once) and the test ground truths."""
    names, descriptions = X.landmark_names()
    training_ids = X.checked_training_ids("train_N135", isbi)
    validation_ids = X.checked_training_ids("validation", isbi)
    test_ids = X.test1_ids(isbi, settings.test_images)
    print(f"Loading {len(training_ids)} training, {len(validation_ids)} validation and {len(test_ids)} test1 "
          f"images from {isbi}")
    truths_train = X.load_ground_truths(isbi, training_ids + validation_ids)
    senior_train = X.load_isbi_cases(isbi, training_ids)
    senior_validation = X.load_isbi_cases(isbi, validation_ids)
    training = {a: senior_train if a == "senior" else X.with_landmarks(senior_train, truths_train[a])
                for a in annotations | {"senior"}}
    validation = {a: senior_validation if a == "senior" else X.with_landmarks(senior_validation, truths_train[a])
                  for a in annotations | {"senior"}}
    test_truths = X.load_ground_truths(isbi, test_ids)
    return {
        "names": names, "descriptions": descriptions,
        "training_ids": training_ids, "validation_ids": validation_ids, "test_ids": test_ids,
        "training": training, "validation": validation,
        "validation_truths": {t: v for t, v in X.load_ground_truths(isbi, validation_ids).items() if t in X.GROUND_TRUTHS},
        "test": X.load_isbi_cases(isbi, test_ids),
        "test_truths": {t: test_truths[t] for t in X.GROUND_TRUTHS},
        "test_truths_junior": test_truths["junior"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run table 1; returns what ``results.json`` holds."""
    args = parse_arguments(argv)
    settings = X.settings_from_arguments(args, full_iterations=FULL_ITERATIONS, quick_iterations=QUICK_ITERATIONS)
    configurations = chosen_configurations(args)
    folder = X.output_folder(args, NAME)
    isbi = X.isbi_folder(X.find_data_folder(args.data))
    note = X.quick_note(settings)
    print(note)
    data = load_data(isbi, settings, {c.annotation for c in configurations})
    validate_every = args.validate_every or (max(1, settings.iterations // 4) if settings.quick else 1000)
    runs = [train_configuration(c, settings, folder / c.name, data, validate_every=validate_every, fresh=args.fresh)
            for c in configurations]
    best = min(runs, key=lambda r: (r["validation"]["mean"]["mre_mm"] is None, r["validation"]["mean"]["mre_mm"] or 0))
    floor = inter_observer(data)
    shipped = ship(best, folder, settings, data, note, floor)
    met = {t: {"mre": best["test1"][t]["mre_mm"] is not None and best["test1"][t]["mre_mm"] <= TARGET_MRE_MM,
               "sdr2": (best["test1"][t]["sdr"]["2"] or 0) >= TARGET_SDR2} for t in X.GROUND_TRUTHS}
    body = "\n\n".join([
        "## Test1 accuracy\n\n" + results_markdown(runs, data, include_published=True, floor=floor),
        f"Shipped: **{best['configuration']['name']}** (lowest validation MRE vs the mean annotation) as "
        f"`{SHIPPED_FILE}`, sha256 `{shipped['sha256']}`.\n"
        f"Targets (MRE <= {TARGET_MRE_MM} mm, SDR 2 mm >= {100 * TARGET_SDR2:.0f} %): "
        + "; ".join(f"vs {t}: MRE {'met' if m['mre'] else 'not met'}, SDR 2 mm {'met' if m['sdr2'] else 'not met'}"
                    for t, m in met.items()),
        f"## Per landmark ({best['configuration']['name']})\n\n" + per_landmark_markdown(best),
        "## Time and memory\n\n" + timing_markdown(runs),
    ])
    X.write_table(folder, "Table 1: default cephalometric model, ISBI 2015 test1", note, body)
    plot_learning_curves(runs, folder / "learning_curves.png", note)
    results = {"experiment": NAME, "quick": settings.quick, "note": note, "settings": settings.to_dict(),
               "environment": X.environment(), "configurations": runs, "inter_observer_junior_vs_senior": floor,
               "shipped": {**shipped, "configuration": best["configuration"]["name"]}, "targets_met": met,
               "published_reference": [{"method": m, "mre_mm": e, "sdr_2mm": s} for m, e, s in PUBLISHED]}
    X.write_json(folder / "results.json", results)
    print((folder / "table.md").read_text(encoding="utf-8"))
    print(f"Results in {folder}. To ship, copy {SHIPPED_FILE} into SCNLandmarks/Resources/Models and add the entry "
          f"of models.json.entry.json to models.json.")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
