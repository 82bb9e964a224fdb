"""Choose among assembled models on the validation images alone (test1 is not read).

Each candidate is a global stage (one network, or several read as one) beside local networks,
assembled as ``ensemble_refiners.py`` does. On the 15 validation images (mean of both doctors)
it prints, per candidate:

* the validation MRE, SDR@2mm and points > 4 mm off;
* the error model's held-out AUROC for points > 2 mm off (each validation image left out of the
  fit in turn, :func:`error_prediction.leave_one_image_out`, with the engine's signals) and the
  error of the predicted log-error.

A candidate is ``NAME=MEMBER[,MEMBER...]:GLOBAL[,GLOBAL...]``, where a member is ``FILE`` or
``FILE@N`` (the N-th local network of FILE) and each global is a model file whose global stage
is taken. The held-out AUROC favours the model the error model's signals were chosen with; a
rule that requires it not to drop is a conservative one. Example (table 1g):

    python scripts/experiments/choose_recipe.py --output scripts/experiments/results/cpu/choose_recipe_seed1 \\
        --candidate "bundled=B@1,B@2:B" "two globals + network 1=B@1:B,G" "seed-1 global=B@1,B@2:G"

with ``B`` the bundled file and ``G`` the global stage of ``train_isbi.py --seed 1``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
from ensemble_refiners import combine
from error_prediction import detect_with_signals, leave_one_image_out, model_without_error_model


def parse_candidate(text: str) -> tuple[str, list[Path], list[Path]]:
    """``(name, local-stage members, global-stage files)`` from ``NAME=M1,M2:G1,G2``."""
    name, equals, spec = text.partition("=")
    members, colon, globals_ = spec.partition(":")
    if not equals or not colon or not name.strip() or not members.strip() or not globals_.strip():
        msg = f"A candidate reads NAME=MEMBER[,MEMBER...]:GLOBAL[,GLOBAL...], got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    split = lambda part: [Path(p.strip()) for p in part.split(",") if p.strip()]  # noqa: E731
    return name.strip(), split(members), split(globals_)


def judge(path: Path, isbi: Path, cases: Sequence[Any], truths: dict[str, Any]) -> dict[str, Any]:
    """Validation accuracy and the error model's held-out figures of the model file at ``path``."""
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.learning.quality_fitting import QUALITY_SIGNALS

    detector = Detector(model_without_error_model(path, isbi), device="cpu")
    signals, errors, _, _ = detect_with_signals(detector, cases, truths)
    held_out = leave_one_image_out(signals, errors, [name for name in QUALITY_SIGNALS if name in signals])
    return {"mre_mm": float(errors.mean()), "sdr_2mm": float((errors <= 2).mean()),
            "points_over_4mm": int((errors > 4).sum()), "held_out": held_out}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: $SCN_DATA_DIR or ../shared/data)")
    parser.add_argument("--candidate", type=parse_candidate, nargs="+", required=True,
                        help="NAME=MEMBER[,MEMBER...]:GLOBAL[,GLOBAL...] (see above)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from SCNLandmarksLib.models.model_file import save_model

    isbi = X.isbi_folder(X.find_data_folder(args.data))
    ids = X.checked_training_ids("validation", isbi)
    cases, truths = X.load_isbi_cases(isbi, ids), X.load_ground_truths(isbi, ids)["mean"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, members, globals_ in args.candidate:
            started = time.perf_counter()
            path = save_model(combine(members, globals_), Path(scratch) / "candidate.scn.pt", half_precision=True, overwrite=True)
            results[name] = {"members": [str(m) for m in members], "global_stage": [str(g) for g in globals_],
                             **judge(path, isbi, cases, truths)}
            held = results[name]["held_out"]
            print(f"{name}: validation MRE {results[name]['mre_mm']:.3f} mm, held-out AUROC > 2 mm {held['auroc_2mm']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    X.write_json(args.output / "results.json", {"candidates": results, "environment": X.environment()})
    body = X.markdown_table(
        ["candidate", "validation MRE (mm)", "SDR@2mm", "points > 4 mm", "error model held out: AUROC > 2 mm", "log-error RMSE"],
        [[name, f"{r['mre_mm']:.3f}", X.pct(r["sdr_2mm"]), str(r["points_over_4mm"]), f"{r['held_out']['auroc_2mm']:.3f}",
          f"{r['held_out']['log_error_rmse']:.3f}"] for name, r in results.items()])
    X.write_table(args.output, "Candidates judged on the validation images",
                  f"{len(ids)} validation images, mean of both doctors; test1 not read.", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
