"""Speed benchmark: parameter counts and time per training iteration and per detection.

Prints one line per measurement. Sizes are the paper configurations: 2D SCN on a 512x512
grid with 19 landmarks (cephalograms), 3D SCN on a 96^3 grid with 32 landmarks; and the shipped
local refinement stage (19 landmarks, 128x128 crops): a training step of 32 crops in float32 and
with bfloat16 autocast, and the 19 crops of one detection; and the bundled global SCN's training
step (its own grid) in float32 and with bfloat16 autocast.

    python scripts/benchmark.py                    # CPU, 2 threads
    python scripts/benchmark.py --device cuda      # GPU, with peak memory
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from SCNLandmarksLib.inference.detection import Detector
from SCNLandmarksLib.common.device import describe_device, resolve_device
from SCNLandmarksLib.imaging.geometry import ImageGeometry
from SCNLandmarksLib.imaging.grid import GridSpec
from SCNLandmarksLib.models.heatmaps import heatmap_loss
from SCNLandmarksLib.imaging.image import Image
from SCNLandmarksLib.models.model import create_model
from SCNLandmarksLib.models.network import NetworkConfig, count_parameters
from SCNLandmarksLib.models.refinement import RefinementNetwork, RefinerConfig, crop_target, refinement_loss

CASES = {
    "2d-512": (NetworkConfig.paper_2d, 19, (512, 512)),
    "3d-96": (NetworkConfig.paper_3d, 32, (96, 96, 96)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_global_stage(device: torch.device, repeats: int) -> None:
    """The bundled model's global SCN: one training step (1 image on its grid), float32 vs bfloat16 autocast."""
    from pathlib import Path

    from SCNLandmarksLib.models.model_file import load_model

    bundled = Path(__file__).resolve().parents[1] / "SCNLandmarks" / "Resources" / "Models" / "cephalometric_isbi2015.scn.pt"
    model = load_model(bundled)
    size = tuple(model.grid.size)
    for amp in (False, True):
        step = time_training_step(model, device, size, repeats, amp, cpu_autocast=True)
        print(f"global-2d (bundled SCN, grid {'x'.join(map(str, size))}): training iteration "
              f"{'bfloat16 autocast' if amp else 'float32'} {statistics.median(step):.3f} s (min {min(step):.3f})")


def time_training_step(model, device: torch.device, size: tuple[int, ...], repeats: int, amp: bool, *,
                       cpu_autocast: bool = False) -> list[float]:
    network, targets = model.network.to(device).train(), model.targets.to(device)
    optimizer = torch.optim.AdamW(list(network.parameters()) + [targets.sigmas], lr=1e-5)
    image = torch.randn(1, 1, *size[::-1], device=device)
    positions = torch.rand(1, model.config.num_landmarks, len(size), device=device) * (size[0] - 1)
    valid = torch.ones(1, model.config.num_landmarks, dtype=torch.bool, device=device)
    times = []
    for _ in range(repeats + 1):  # the first one warms up kernels and allocators
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and (cpu_autocast or device.type == "cuda")):
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


def time_local_stage(device: torch.device, repeats: int) -> None:
    """Local refinement stage of the shipped model: training step (fp32 and bf16) and one detection's crops."""
    config = RefinerConfig(dimension=2, num_landmarks=19, filters=(16, 32, 48, 64, 96))
    network = RefinementNetwork(config).to(device)
    print(f"parameters local stage 2d ({config.num_landmarks} landmarks): {count_parameters(network):,}")
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    crops = torch.randn(32, 1, config.patch_size, config.patch_size, device=device)
    channels = torch.randint(0, config.num_landmarks, (32,), device=device)
    targets = crop_target(torch.rand(32, 2, device=device) * (config.patch_size - 1), config)
    for amp in (False, True):
        times = []
        for _ in range(repeats + 1):  # the first step warms up
            _sync(device)
            started = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                member_logits = network.member_logits(crops)
            loss = refinement_loss(member_logits, channels, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - started)
        print(f"local-2d: training step of 32 crops, {'bfloat16 autocast' if amp else 'float32'}: "
              f"{statistics.median(times[1:]):.3f} s (min {min(times[1:]):.3f})")
    network.eval()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            _sync(device)
            started = time.perf_counter()
            network(crops[:19])
            _sync(device)
            times.append(time.perf_counter() - started)
    print(f"local-2d: the 19 crops of one detection: {statistics.median(times[1:]):.3f} s (min {min(times[1:]):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=[*CASES, "local-2d", "global-2d"],
                        choices=[*CASES, "local-2d", "global-2d"])
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
    if "local-2d" in args.cases:
        time_local_stage(device, args.repeats)
    if "global-2d" in args.cases:
        time_global_stage(device, args.repeats)
    for name in [c for c in args.cases if c in CASES]:
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
