"""Issue 8, item 3: does correcting the images the tool ranks first help a fine-tuning more than random ones?

A user has a pool of detected images and time to correct 10. Pool: ISBI test1 151-200 (50
images); held out: test1 201-300 (100 images). Two arms, both corrected with the mean of both
doctors (the convention the model learned, so that only the choice of cases differs):

* **ranked**: the 10 images with the highest mean expected error (``review_order.csv``'s top 10);
* **random**: 10 images drawn from the pool (seeded); ``--random-draws`` gives several such arms,
  each its own draw, for a fairer comparison with the one ranked arm.

Each arm fine-tunes the shipped model with the engine's own recipe and defaults; the new model
is kept regardless of the cross-validation verdict (``keep_worse``), so that both recipes are
measured; the verdict is printed. Before and after on the held-out images, mean ground truth.

    python scripts/experiments/review_first.py --output scripts/experiments/results/cpu/review_first
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
import promise_loop as L

POOL_IDS = [f"{i:03d}" for i in range(151, 201)]
HELD_OUT_IDS = [f"{i:03d}" for i in range(201, 301)]
RANDOM_SEED = 8


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=L.SHIPPED)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--random-draws", type=int, default=1,
                        help="random arms, each its own draw of --cases images (seeds 8, 9, ...; the first is the earlier runs' draw)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.models.model_file import load_model
    from SCNLandmarksLib.models.quality import review_order

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    args.output.mkdir(parents=True, exist_ok=True)
    pool = X.load_isbi_cases(isbi, POOL_IDS, annotation="mean")
    held_out = X.load_isbi_cases(isbi, HELD_OUT_IDS)
    truths = X.load_ground_truths(isbi, HELD_OUT_IDS)["mean"]
    detector = Detector(args.model, device=args.device)
    order = review_order([(case.name, detector.detect(case.image)) for case in pool])
    ranked_ids = [image for image, _, _ in order[: args.cases]]
    draws = {("random" if draw == 0 else f"random-{draw + 1}"):
             sorted(np.random.default_rng(RANDOM_SEED + draw).choice(POOL_IDS, args.cases, replace=False).tolist())
             for draw in range(args.random_draws)}
    random_ids = draws["random"]
    print(f"ranked first: {ranked_ids}\n" + "\n".join(f"{arm}: {ids}" for arm, ids in draws.items()))
    rows = {"starting model": L.measure(load_model(args.model), held_out, truths, args.device)}
    verdicts = {}
    for arm, ids in (("ranked", ranked_ids), *draws.items()):
        cases = [case for case in pool if case.name in ids]
        path = args.output / f"{arm}.scn.pt"
        report = L.fine_tune_run(cases, args.model, path, args.device, keep_worse=True)
        verdicts[arm] = {k: report[k] for k in ("verdict", "start_error_mm", "new_error_mm", "seconds")}
        rows[f"fine-tuned on the {arm} {args.cases}"] = L.measure(load_model(path), held_out, truths, args.device)
    random_mre = [rows[f"fine-tuned on the {arm} {args.cases}"]["mre_mm"] for arm in draws]
    X.write_json(args.output / "results.json", {"rows": rows, "verdicts": verdicts, "ranked_ids": ranked_ids,
                                                "random_ids": random_ids, "random_draws": draws,
                                                "random_mean_mre_mm": float(np.mean(random_mre)), "review_order": order,
                                                "environment": X.environment()})
    body = X.markdown_table(["model", "held-out MRE (mm)", "SDR@2mm (%)", "CV on its cases (start → new)", "verdict"], [
        [label, f"{row['mre_mm']:.3f}", X.pct(row["sdr2"]),
         "" if label == "starting model" else
         f"{verdicts[label.split()[3]]['start_error_mm']:.2f} → {verdicts[label.split()[3]]['new_error_mm']:.2f}",
         "" if label == "starting model" else verdicts[label.split()[3]]["verdict"]]
        for label, row in rows.items()])
    if len(draws) > 1:
        body += (f"\n\nRandom draws: held-out MRE {np.mean(random_mre):.3f} mm on average "
                 f"({min(random_mre):.3f}-{max(random_mre):.3f}); ranked: {rows[f'fine-tuned on the ranked {args.cases}']['mre_mm']:.3f} mm.")
    X.write_table(args.output, "Correct the top-ranked images first, or random ones?",
                  f"Pool test1 151-200, {args.cases} cases corrected with the mean annotation; held out test1 201-300.", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
