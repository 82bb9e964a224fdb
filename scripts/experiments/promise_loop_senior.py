"""Table 5, same-domain row, against the senior doctor: the convention the 10 corrected cases follow.

``promise_loop.py`` corrects the 10 cases with the senior annotation (as one doctor would) and
measures the held-out images against the mean of both doctors. This measures the same two models
(the shipped one and the fine-tuned one it wrote) against the senior doctor, the user whose
corrections the fine-tuned model learned from.

    python scripts/experiments/promise_loop_senior.py --output scripts/experiments/results/cpu/promise_loop
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
    parser.add_argument("--output", type=Path, required=True, help="the promise_loop.py output folder")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from SCNLandmarksLib.models.model_file import load_model

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    test_ids = [i for i in X.test1_ids(isbi) if i not in L.CORRECTED_IDS]
    truths = X.load_ground_truths(isbi, test_ids)["senior"]
    tests = X.load_isbi_cases(isbi, test_ids)
    rows = {}
    for label, path in (("shipped model", L.SHIPPED), ("fine-tuned on the 10 cases", args.output / "same-domain.scn.pt")):
        rows[label] = L.measure(load_model(path), tests, truths, args.device)
        print(f"{label}: MRE {rows[label]['mre_mm']:.3f} mm, SDR@2mm {100 * rows[label]['sdr2']:.1f} % (senior)")
    X.write_json(args.output / "same_domain_senior.json", {"rows": rows, "test_ids": test_ids})
    return 0


if __name__ == "__main__":
    sys.exit(main())
