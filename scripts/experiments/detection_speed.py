"""Detection speed of the shipped cephalometric model: CPU load-to-points time, GPU images/s and memory.

CPU (``--threads``, default 2, like a modest workstation running Slicer): the model file is
loaded once (timed), then every image is read from disk and detected (timed per image, from
reading the file to the landmark positions). "Cold" is model load + the first image: what a
user waits for on the first click; "warm" is the median of the later images.

GPU (when one is usable and ``--device`` is not ``cpu``): the same loop after one warm-up
image, giving images/s from file to points, and the peak GPU memory torch allocated.

    python scripts/experiments/detection_speed.py                     # CPU 2 threads (+ GPU if present)
    python scripts/experiments/detection_speed.py --model path/to/model.scn.pt --images 30
    python scripts/experiments/detection_speed.py --untrained     # before a model exists

``--untrained`` times an untrained model of the shipped architecture (SCN, 128 filters,
512x512 fit grid, 19 landmarks, half-precision file): the time does not depend on the weights,
so it measures the shipped model's cost before the shipped model exists. Its points are
meaningless and every output says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X

NAME = "detection_speed"
FULL_IMAGES = 20
QUICK_IMAGES = 4


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help=f"folder with isbi2015/ (default ${X.DATA_ENV} or <repo>/../shared/data)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results folder (default scripts/experiments/results/{NAME}/, quick-cpu/{NAME}/ with --quick)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CPU always, and the GPU too when one is usable; cpu: CPU only; cuda: both, GPU required")
    parser.add_argument("--model", type=Path, default=None,
                        help="model file (default: train_isbi.py's shipped output, else the bundled default model)")
    parser.add_argument("--images", type=int, default=None,
                        help=f"test1 images to time, spread over the list (default {FULL_IMAGES}; {QUICK_IMAGES} with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)  # shared interface; unused
    parser.add_argument("--quick", action="store_true", help="fewer images; results under results/quick-cpu/")
    parser.add_argument("--untrained", action="store_true",
                        help="time an untrained model of the shipped architecture instead of a trained file")
    return parser.parse_args(argv)


def untrained_model(folder: Path) -> Path:
    """An untrained model file of the shipped architecture, for timing only."""
    from SCNLandmarksLib.models.model_file import save_model

    names, descriptions = X.landmark_names()
    model = X.new_model("scn", names, descriptions, grid_size=X.FULL_GRID, filters=X.FULL_FILTERS)
    model.info["purpose"] = "UNTRAINED: timing of the architecture only"
    return save_model(model, folder / "untrained-timing-only.scn.pt", half_precision=True, overwrite=True)


def find_model(args: argparse.Namespace, folder: Path) -> Path:
    from SCNLandmarksLib.models.catalog import default_model

    if args.untrained:
        return untrained_model(folder)
    if args.model is not None:
        if not args.model.is_file():
            raise SystemExit(f"The model file {args.model} does not exist")
        return args.model
    for results in (["quick-cpu/train_isbi"] if args.quick else []) + ["train_isbi"]:
        candidate = X.RESULTS / results / "cephalometric_isbi2015.scn.pt"
        if candidate.is_file():
            return candidate
    bundled = default_model()
    if bundled is None:
        raise SystemExit("No model to time: run scripts/experiments/train_isbi.py first or pass --model")
    return bundled


def time_device(model_path: Path, paths: Sequence[Path], device: str, *, warm_up: bool) -> dict[str, Any]:
    """Model load time, then per-image seconds from reading the file to points, on one device."""
    import torch
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.imaging.image_io import read_image

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    detector = Detector(model_path, device=device)
    sync()
    load_seconds = time.perf_counter() - started
    if warm_up:
        # The first CUDA call compiles kernels and grows the allocator: not a per-image cost.
        detector.detect(read_image(paths[0], spacing=X.ISBI_SPACING))
        sync()
    X.reset_peak_memory(detector.device)
    seconds = []
    for path in paths:
        started = time.perf_counter()
        landmarks = detector.detect(read_image(path, spacing=X.ISBI_SPACING))
        sync()
        seconds.append(time.perf_counter() - started)
        if not landmarks.positions.size:
            raise RuntimeError(f"No landmarks detected on {path}")
    later = seconds[1:] or seconds
    return {
        "device": detector.device_description,
        "model_load_seconds": load_seconds,
        "per_image_seconds": seconds,
        "cold_seconds": load_seconds + seconds[0],
        "warm_median_seconds": statistics.median(later),
        "warm_mean_seconds": statistics.fmean(later),
        "images_per_second": len(later) / sum(later),
        "peak_gpu_memory_mib": X.peak_memory_mib(detector.device),
        "warm_up_image": warm_up,
    }


def plot(measurements: dict[str, dict[str, Any]], path: Path, note: str) -> Path:
    panels = []
    for name, m in measurements.items():
        times = m["per_image_seconds"]
        panels.append(("image (in reading order)", f"{name}: seconds, file to points",
                       [X.Series(m["device"], list(range(1, len(times) + 1)), times, "o-")]))
    return X.plot_panels(path, f"Detection time per image\n{note}", panels)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure detection speed; returns what ``results.json`` holds."""
    import torch
    from SCNLandmarksLib.models.catalog import file_sha256
    from SCNLandmarksLib.models.model_file import read_model_description

    args = parse_arguments(argv)
    folder = X.output_folder(args, NAME)
    model_path = find_model(args, folder)
    isbi = X.isbi_folder(X.find_data_folder(args.data))
    count = args.images or (QUICK_IMAGES if args.quick else FULL_IMAGES)
    paths = X.image_paths(isbi / "images", X.test1_ids(isbi, count))
    description = read_model_description(model_path)
    info, grid = description.info, description.grid_size
    note = (f"{'QUICK RUN (few images), ' if args.quick else ''}"
            f"{'UNTRAINED WEIGHTS (timing of the architecture only), ' if args.untrained else ''}model {model_path.name} "
            f"({description.architecture}, {description.network['filters']} filters, grid "
            f"{'x'.join(map(str, grid))}{', QUICK MODEL' if 'QUICK' in str(info) else ''}), "
            f"{len(paths)} test1 images of 1935x2400 pixels")
    print(note)
    measurements = {}
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads ...")
    measurements["cpu"] = time_device(model_path, paths, "cpu", warm_up=False)
    measurements["cpu"]["threads"] = args.threads
    if args.device != "cpu" and (torch.cuda.is_available() or args.device == "cuda"):
        print("GPU ...")
        measurements["gpu"] = time_device(model_path, paths, "cuda", warm_up=True)
    headers = ["device", "model load (s)", "cold: load + first image (s)", "warm per image, median (s)",
               "images/s (warm)", "peak GPU memory (MiB)"]
    rows = [[m["device"], X.fmt(m["model_load_seconds"]), X.fmt(m["cold_seconds"]), X.fmt(m["warm_median_seconds"], 3),
             X.fmt(m["images_per_second"], 2), X.fmt(m["peak_gpu_memory_mib"], 0)] for m in measurements.values()]
    body = ("Per image: reading the JPEG, grey conversion, resampling to the network grid, network, maxima, "
            "back to mm.\n\n" + X.markdown_table(headers, rows))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(f"# Detection speed\n\n**{note}**\n\n{body}\n", encoding="utf-8")
    plot(measurements, folder / "detection_speed.png", note)
    results = {"experiment": NAME, "quick": bool(args.quick), "untrained": bool(args.untrained), "note": note,
               "model": str(model_path),
               "model_sha256": file_sha256(model_path), "images": [p.name for p in paths],
               "environment": X.environment(), "measurements": measurements}
    X.write_json(folder / "results.json", results)
    if args.untrained:
        model_path.unlink(missing_ok=True)
    print((folder / "table.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
