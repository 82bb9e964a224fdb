"""Speed benchmark: parameter counts and time per training iteration and per detection.

Prints one line per measurement. Sizes are the paper configurations: 2D SCN on a 512x512
grid with 19 landmarks (cephalograms), 3D SCN on a 96^3 grid with 32 landmarks.

    python scripts/benchmark.py                    # CPU, 2 threads
    python scripts/benchmark.py --device cuda      # GPU, with peak memory
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from SCNLandmarksLib.detection import Detector
from SCNLandmarksLib.device import describe_device, resolve_device
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.grid import GridSpec
from SCNLandmarksLib.heatmaps import heatmap_loss
from SCNLandmarksLib.image import Image
from SCNLandmarksLib.model import create_model
from SCNLandmarksLib.network import NetworkConfig, count_parameters

CASES = {
    "2d-512": (NetworkConfig.paper_2d, 19, (512, 512)),
    "3d-96": (NetworkConfig.paper_3d, 32, (96, 96, 96)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training_step(model, device: torch.device, size: tuple[int, ...], repeats: int, amp: bool) -> list[float]:
    network, targets = model.network.to(device).train(), model.targets.to(device)
    optimizer = torch.optim.AdamW(list(network.parameters()) + [targets.sigmas], lr=1e-5)
    image = torch.randn(1, 1, *size[::-1], device=device)
    positions = torch.rand(1, model.config.num_landmarks, len(size), device=device) * (size[0] - 1)
    valid = torch.ones(1, model.config.num_landmarks, dtype=torch.bool, device=device)
    times = []
    for _ in range(repeats + 1):  # the first one warms up kernels and allocators
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            predicted = network(image)
        loss = heatmap_loss(predicted.float(), targets(positions, size[::-1]), valid, targets.sigmas, sigma_weight=20.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def time_detection(model, device: torch.device, size: tuple[int, ...], repeats: int) -> list[float]:
    rng = np.random.default_rng(0)
    dimension = len(size)
    geometry = ImageGeometry(size=size, spacing=(1.0,) * dimension, origin=(0.0,) * dimension,
                             direction=tuple(np.eye(dimension).reshape(-1)))
    image = Image(rng.normal(size=size[::-1]).astype(np.float32), geometry)
    detector = Detector(model, device=device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        detector.detect(image)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on the GPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {describe_device(device)}, torch {torch.__version__}")
    for name in ("2d-512", "3d-96"):
        factory, landmarks, _ = CASES[name]
        for architecture in ("scn", "unet"):
            count = count_parameters(create_model(factory(landmarks, architecture=architecture),
                                                  grid=GridSpec(size=CASES[name][2]),
                                                  landmark_names=[f"L{i}" for i in range(landmarks)]).network)
            print(f"parameters {name} {architecture} ({landmarks} landmarks): {count:,}")
    for name in args.cases:
        factory, landmarks, size = CASES[name]
        model = create_model(factory(landmarks), grid=GridSpec(size=size), landmark_names=[f"L{i}" for i in range(landmarks)])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = time_training_step(model, device, size, args.repeats, not args.no_amp)
        detect = time_detection(model, device, size, args.repeats)
        memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"{name}: training iteration {statistics.median(step):.3f} s (min {min(step):.3f}), "
              f"detection {statistics.median(detect):.3f} s (min {min(detect):.3f}) over {args.repeats} runs{memory}")


if __name__ == "__main__":
    main()
