"""Issue 13, another device: which stages should 10 corrected cases of a new device train?

The simulated device of ``promise_loop.py`` (gamma 0.3, blur 1.5 mm, noise 10 %) on test1: 10
device cases (151-160) corrected with the **mean of both doctors** (the ground truth the table
measures against, so that only the device differs; ``promise_loop.py`` corrects with the senior
annotation, which adds a change of convention) fine-tune the shipped model with the engine's
recipe, once with the local stage only and once with the recipe's own choice (which, for cases
that look unlike the training images, is both stages: global, then local; the table prints the
stages it chose). Before and after on test1 161-300 through the device; the gap is measured against
the same images as they are.

    python scripts/experiments/device_stages.py --output scripts/experiments/results/cpu/device_stages
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
import promise_loop as L


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--test-images", type=int, default=None, help="measure on this many of test1 161-300")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.models.model_file import load_model

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    args.output.mkdir(parents=True, exist_ok=True)
    test_ids = X.spread([i for i in X.test1_ids(isbi) if i not in L.CORRECTED_IDS], args.test_images)
    truths = X.load_ground_truths(isbi, test_ids)["mean"]
    tests = X.load_isbi_cases(isbi, test_ids)
    device_tests = [L.device_case(c) for c in tests]
    corrected = [L.device_case(c) for c in X.load_isbi_cases(isbi, L.CORRECTED_IDS, annotation="mean")]
    start = load_model(L.SHIPPED)
    usual = L.measure(start, tests, truths, args.device)
    before = L.measure(start, device_tests, truths, args.device)
    gap = before["mre_mm"] - usual["mre_mm"]
    print(f"usual {usual['mre_mm']:.3f} mm, device {before['mre_mm']:.3f} mm (gap {gap:.3f} mm)")
    rows = {}
    for label, stages in (("local stage only", ["local"]), ("the recipe's choice", None)):
        path = args.output / ("device-" + "-".join(stages or ["default"]) + ".scn.pt")
        report = L.fine_tune_run(corrected, L.SHIPPED, path, args.device, keep_worse=True, stages=stages)
        after = L.measure(load_model(path), device_tests, truths, args.device)
        rows[label] = {"after": after, "fine_tune": report, "gap_closed": (before["mre_mm"] - after["mre_mm"]) / gap}
        print(label, after, report["verdict"], report["start_error_mm"], report["new_error_mm"])
    X.write_json(args.output / "results.json", {"usual": usual, "before": before, "rows": rows, "test_ids": test_ids,
                                                "environment": X.environment()})
    body = X.markdown_table(
        ["fine-tuned stages", "device MRE before → after (mm)", "SDR@2mm after (%)", "gap closed", "CV on the cases (start → new)",
         "verdict", "fine-tune s"],
        [[f"{label}: {' + '.join(r['fine_tune']['stages'])}", f"{before['mre_mm']:.2f} → {r['after']['mre_mm']:.2f}", X.pct(r["after"]["sdr2"]), f"{100 * r['gap_closed']:.0f} %",
          f"{r['fine_tune']['start_error_mm']:.2f} → {r['fine_tune']['new_error_mm']:.2f}", r["fine_tune"]["verdict"],
          f"{r['fine_tune']['seconds']:.0f}"] for label, r in rows.items()])
    note = (f"Simulated device; 10 cases (test1 151-160, mean annotation); measured on {len(test_ids)} other test1 images "
            f"(mean GT). Usual images: {usual['mre_mm']:.2f} mm; the device before fine-tuning: {before['mre_mm']:.2f} mm.")
    X.write_table(args.output, "Another device: which stages to fine-tune", note, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
