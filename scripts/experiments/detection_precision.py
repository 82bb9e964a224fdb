"""What bfloat16 autocast changes at detection: time per image and accuracy, on this CPU.

Detects the 15 ISBI validation images (never test1) with the model in float32 and under bfloat16
autocast (``Detector(bfloat16=...)``), each read as it is, mirrored left-right and inverted (the
image readings of ``SCNLandmarksLib.inference.detection``), and prints per configuration the MRE
against the mean of both doctors, SDR@2mm, the largest shift of a point between the two
precisions, and the median seconds per image (warm, load to points, ``--threads`` threads).

    python scripts/experiments/detection_precision.py --output scripts/experiments/results/cpu/detection_precision
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
import promise_loop as P

READINGS = {"as it is": lambda case: case, "mirrored": P.mirrored_case, "inverted": P.inverted_case}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: $SCN_DATA_DIR or ../shared/data)")
    parser.add_argument("--model", type=Path, default=P.SHIPPED)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    from SCNLandmarksLib.common.device import bfloat16_is_native
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.inference.evaluation import point_errors
    from SCNLandmarksLib.models.model_file import load_model

    torch.set_num_threads(args.threads)
    ids, cases = X.load_validation_cases(args.data)
    model = load_model(args.model)
    rows: dict[str, dict[str, Any]] = {}
    found: dict[tuple[bool, str], list[np.ndarray]] = {}
    for bfloat16 in (False, True):
        detector = Detector(model, device="cpu", bfloat16=bfloat16)
        detector.detect(cases[0].image)  # warm
        for reading, transform in READINGS.items():
            errors, seconds, positions = [], [], []
            for case in map(transform, cases):
                started = time.perf_counter()
                landmarks = detector.detect(case.image)
                seconds.append(time.perf_counter() - started)
                errors.append(point_errors(landmarks, case.landmarks))
                positions.append(landmarks.positions)
            found[bfloat16, reading] = positions
            values = np.concatenate(errors)
            name = f"{'bfloat16' if bfloat16 else 'float32'}, {reading}"
            rows[name] = {"mre_mm": float(np.nanmean(values)), "sdr2": float(np.nanmean(values <= 2.0)),
                          "median_s": float(np.median(seconds)), "seconds": seconds}
            if bfloat16:
                shifts = [np.linalg.norm(a - b, axis=1) for a, b in zip(positions, found[False, reading])]
                rows[name]["largest_shift_mm"] = float(np.nanmax(np.concatenate(shifts)))
            print(name, {k: v for k, v in rows[name].items() if k != "seconds"}, flush=True)
    usual = rows["float32, as it is"]["median_s"]
    table = X.markdown_table(
        ["precision, reading", "MRE (mm)", "SDR@2mm", "largest shift vs float32 (mm)", "s / image (median)", "vs float32 as it is"],
        [[name, X.fmt(r["mre_mm"], 3), f"{100 * r['sdr2']:.1f} %", X.fmt(r.get("largest_shift_mm"), 3),
          f"{r['median_s']:.3f}", f"{r['median_s'] / usual:.2f}x"] for name, r in rows.items()])
    note = (f"15 ISBI validation images, mean of both doctors; {args.threads} CPU threads; "
            f"bfloat16 native on this CPU: {bfloat16_is_native(torch.device('cpu'))}")
    args.output.mkdir(parents=True, exist_ok=True)
    X.write_table(args.output, "Detection in float32 and under bfloat16 autocast", note, table)
    X.write_json(args.output / "results.json", {"rows": rows, "ids": ids, "model": str(args.model),
                                                "environment": X.environment()})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
