"""The main job: detect landmarks on the sample cephalogram and write .mrk.json, CSV and PNG.

With the bundled default model (``SCNLandmarks/Resources/Models``), this detects on the
sample image (ISBI 2015 image 151) and, where the data folder is reachable, reports the error
against the senior annotation. Without a bundled default model, it trains a small demonstration model on
the CPU from the cephalograms it can reach (``SCN_DATA_DIR`` or ``../shared/data``), or from
synthetic images when there are none, and detects with that. The demonstration model is
written under the output folder only; it is not a product model and is never bundled.

    python scripts/main_job.py [--output output/main-job] [--minutes 8] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SAMPLE = REPOSITORY / "SCNLandmarks" / "Resources" / "Sample" / "isbi2015_151.jpg"
NAMES = REPOSITORY / "SCNLandmarks" / "Resources" / "LandmarkSets" / "isbi2015_cephalometric.txt"
ISBI_SPACING = (0.1, 0.1)


def data_folder() -> Path | None:
    configured = os.environ.get("SCN_DATA_DIR")
    folder = Path(configured) if configured else REPOSITORY.parent / "shared" / "data"
    return folder if (folder / "isbi2015").is_dir() else None


def sample_truth():  # noqa: ANN201 - {annotation: Landmarks} or None
    """The sample's (ISBI image 151) senior annotation and the mean of both doctors, when the data is reachable."""
    folder = data_folder()
    if folder is None:
        return None
    from SCNLandmarksLib.data.dataset import read_landmark_names
    from SCNLandmarksLib.data.landmark_io import read_landmark_csv
    from SCNLandmarksLib.data.landmarks import Landmarks

    names, _ = read_landmark_names(NAMES)
    tables = {who: read_landmark_csv(folder / "isbi2015" / "landmarks" / f"{who}.csv", dimension=2, names=names)
              for who in ("senior", "junior")}
    if "151" not in tables["senior"] or "151" not in tables["junior"]:
        return None
    senior, junior = tables["senior"]["151"], tables["junior"]["151"]
    return {"senior annotation": senior,
            "mean of both doctors": Landmarks(names, 0.5 * (senior.positions + junior.positions))}


def detect_and_report(model_path: Path, image_path: Path, output: Path, *, device: str, spacing, truth=None) -> None:
    from SCNLandmarksLib.inference.batch import detect_files
    from SCNLandmarksLib.inference.evaluation import point_errors
    from SCNLandmarksLib.imaging.image_io import read_image
    from SCNLandmarksLib.inference.overlay import write_overlay_png

    started = time.perf_counter()
    report = detect_files([image_path], output, model_path, device=device, spacing=spacing, overwrite=True)
    item = report.items[0]
    if item.error:
        raise SystemExit(f"Detection failed: {item.error}")
    picture = write_overlay_png(read_image(image_path, spacing=spacing), item.landmarks, output / f"{image_path.stem}.png",
                                overwrite=True)
    print(f"Detected {len(item.landmarks)} landmarks on {image_path.name} with {model_path.name} on {report.device} "
          f"in {time.perf_counter() - started:.1f} s (model load included)")
    print(f"  markups: {item.output}\n  summary: {report.summary_csv}\n  picture: {picture}")
    found = item.landmarks
    if found.check is not None and found.check.any():
        rows = [f"{name} ({error:.1f} mm)" if found.expected_errors is not None else name
                for name, error, check in zip(found.names, found.expected_errors if found.expected_errors is not None
                                              else [float("nan")] * len(found), found.check) if check]
        print(f"  check first (expected error): {', '.join(rows)}")
    truths = truth if isinstance(truth, dict) else ({} if truth is None else {"senior annotation": truth})
    for label, reference in truths.items():
        errors = point_errors(item.landmarks, reference)
        print(f"  error against the {label}: mean {errors.mean():.2f} mm, "
              f"within 2 mm: {100 * (errors <= 2).mean():.0f} %")


def train_demo_model(output: Path, *, minutes: float, device: str) -> tuple[Path, Path, object, tuple | None]:
    """Train a small model on reachable data; returns (model, image to detect on, truth, spacing)."""
    from SCNLandmarksLib.data.dataset import load_cases, read_landmark_names
    from SCNLandmarksLib.imaging.grid import GridSpec
    from SCNLandmarksLib.imaging.image_io import write_image
    from SCNLandmarksLib.data.landmark_io import write_mrk_json
    from SCNLandmarksLib.models.model import create_model
    from SCNLandmarksLib.models.network import NetworkConfig
    from SCNLandmarksLib.common.progress import TextProgressBar
    from SCNLandmarksLib.learning.training import TrainingConfig, train_model

    model_path = output / "demo-model.scn.pt"
    if model_path.exists():
        model_path.unlink()  # our own previous demonstration output, not a user's model
    folder = data_folder()
    if folder is not None:
        names, descriptions = read_landmark_names(NAMES)
        isbi = folder / "isbi2015"
        print(f"No bundled default model yet: training a small demonstration model on 30 ISBI 2015 training "
              f"cephalograms from {isbi} for {minutes:g} minutes (CPU is fine).")
        ids = [f"{i:03d}" for i in range(1, 31)]
        cases = load_cases(isbi / "images", dimension=2, landmarks=isbi / "landmarks" / "senior.csv", ids=ids,
                           spacing=ISBI_SPACING, names=names, descriptions=descriptions)
        test = load_cases(isbi / "images", dimension=2, landmarks=isbi / "landmarks" / "senior.csv", ids=["151"],
                          spacing=ISBI_SPACING, names=names, descriptions=descriptions)[0]
        image_path, spacing, truth = isbi / "images" / "151.jpg", ISBI_SPACING, test.landmarks
        config = NetworkConfig.paper_2d(len(names), filters=32)
        grid = GridSpec(size=(256, 256))
    else:
        from SCNLandmarksLib.data.synthetic import make_synthetic_dataset
        from SCNLandmarksLib.data.training_case import TrainingCase

        print("No bundled default model and no real data reachable (set SCN_DATA_DIR): training on synthetic images.")
        data = make_synthetic_dataset(21, seed=7, dimension=2, size=(96, 96), spacing=(1.0, 1.0), num_landmarks=5)
        cases = [TrainingCase(image, landmarks, f"synthetic{n}") for n, (image, landmarks) in enumerate(data[:-1])]
        image_path, spacing, truth = output / "synthetic-test.nrrd", None, data[-1][1]
        write_image(data[-1][0], image_path, overwrite=True)
        write_mrk_json(truth, output / "synthetic-test-truth.mrk.json", overwrite=True)
        names = cases[0].landmarks.names
        config = NetworkConfig(dimension=2, num_landmarks=len(names), filters=16, levels=3, spatial_downsample=8,
                               spatial_kernel=5)
        grid = GridSpec(size=(64, 64))
        descriptions = None
    model = create_model(config, grid=grid, landmark_names=names, landmark_descriptions=descriptions)
    model.info["purpose"] = "demonstration model trained by scripts/main_job.py; not for clinical or research use"
    train_model(cases, model, output=model_path, progress=TextProgressBar(),
                config=TrainingConfig(iterations=100_000, time_budget_s=60 * minutes, learning_rate=5e-4,
                                      validation_fraction=0.1, validate_every=200, device=device))
    return model_path, image_path, truth, spacing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPOSITORY / "output" / "main-job")
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SCN_DEMO_MINUTES", "8")),
                        help="training time of the demonstration model when no default model is bundled")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)

    from SCNLandmarksLib.models.catalog import default_model

    model = default_model()
    if model is not None and SAMPLE.exists():
        detect_and_report(model, SAMPLE, args.output, device=args.device, spacing=ISBI_SPACING,
                          truth=sample_truth())
        return 0
    model, image, truth, spacing = train_demo_model(args.output, minutes=args.minutes, device=args.device)
    detect_and_report(model, image, args.output, device=args.device, spacing=spacing, truth=truth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
