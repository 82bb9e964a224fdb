"""Table 1c: two local stages trained apart, read as one (the shipped model).

Takes the two-stage model (global SCN + local stage A, ``train_refiner.py``; or a model whose local
stage is already an ensemble, such as the shipped one) and further local
stages trained the same way with other seeds (``train_refiner.py --seed 1``), and writes one
model whose local stage is their ensemble (``RefinementEnsemble``: the mean of the members'
positions). The shape model and the error model are fitted again on the same
data as before (the 135 training images' landmarks; detections on the 15 validation images,
mean of both doctors), because the ensemble's peaks differ from one member's. Then the
half-precision file is evaluated on test1 like ``train_refiner.py`` (test1 chooses nothing).

    python scripts/experiments/ensemble_refiners.py \\
        --members scripts/experiments/results/cpu/refiner/cephalometric_isbi2015_two_stage.scn.pt \\
                  scripts/experiments/results/cpu/refiner_seed1/cephalometric_isbi2015_two_stage.scn.pt \\
        --output scripts/experiments/results/cpu/refiner_ensemble

``--global-model`` takes the global stage from another file (a global stage trained again): the
local networks learned on crops around the true points, offset at random, so only the choice of
their best validation step saw the global stage beside them. Given several files, the global
stage is their ensemble (``NetworkEnsemble``: the mean of their heatmaps); they must read images
on the same grid with the same intensity mapping, and the first gives the target widths that
scale the confidence.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import isbi2015 as X
import train_refiner as R

NAME = "ensemble_refiners"
MODEL_FILE = "cephalometric_isbi2015_ensemble.scn.pt"


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: $SCN_DATA_DIR or ../shared/data)")
    parser.add_argument("--members", type=Path, nargs="+", required=True,
                        help="two-stage model files with the same global stage; the first gives it. "
                             "FILE@N takes only the N-th network (from 1) of FILE's local stage")
    parser.add_argument("--global-model", type=Path, nargs="+", default=None,
                        help="take the global stage from this file instead of the first member's; "
                             "several files: their global networks read as one")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--test-images", type=int, default=None, help="evaluate on this many test1 images (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the model file already in --output")
    parser.add_argument("--validation-only", action="store_true",
                        help="print the ensemble's error on the 15 validation images and stop (to choose the members)")
    return parser.parse_args(argv)


def member_choice(spec: Path) -> tuple[Path, int | None]:
    """``(file, member)`` from ``FILE`` or ``FILE@N`` (the N-th network, from 1, of a file's ensemble)."""
    name, at, number = str(spec).rpartition("@")
    return (Path(name), int(number)) if at and number.isdigit() else (spec, None)


def combine(specs: Sequence[Path], global_model: Sequence[Path] | None = None):  # noqa: ANN201 - a LandmarkModel
    """The first model (or ``global_model``) with the local stages of all of them as one ensemble.

    Several ``global_model`` files give a global stage that reads their networks as one.

    A member given as ``FILE@N`` contributes only the N-th network of that file's local stage.
    """
    import dataclasses

    import torch
    from SCNLandmarksLib.models.model_file import load_model
    from SCNLandmarksLib.models.network import ensemble_of
    from SCNLandmarksLib.models.refinement import RefinementEnsemble, build_refiner

    choices = [member_choice(spec) for spec in specs]
    paths = [path for path, _ in choices]
    models = [load_model(p) for p in paths]
    base = models[0]
    for path, model in zip(paths, models):
        if model.refiner is None:
            raise SystemExit(f"{path} has no local stage")
        if dataclasses.replace(model.refiner.config, members=1) != dataclasses.replace(base.refiner.config, members=1):
            raise SystemExit(f"{path}: its local stage is set up differently from {paths[0]}'s")
        same_global = all(torch.equal(a, b) for a, b in zip(base.network.state_dict().values(),
                                                            model.network.state_dict().values()))
        if not same_global and global_model is None:
            raise SystemExit(f"{path} has another global stage than {paths[0]}; "
                             "choose the ensemble's global stage with --global-model")
    # A file whose local stage is already an ensemble (the shipped model) gives all its members.
    networks, described = [], []
    for (path, chosen_member), model in zip(choices, models):
        if isinstance(model.refiner, RefinementEnsemble):
            inner = list(model.refiner.members)
            earlier = model.info.get("local_stage_members")
            # Files written before this check could list more members than they hold.
            known = earlier if isinstance(earlier, list) and len(earlier) == len(inner) else [
                {"file": path.name, "member": i + 1} for i in range(len(inner))]
        else:
            inner = [model.refiner]
            known = [{"file": path.name, "refiner_training": model.info.get("refiner_training")}]
        if chosen_member is not None:
            if not 1 <= chosen_member <= len(inner):
                raise SystemExit(f"{path} has {len(inner)} local network(s); there is no number {chosen_member}")
            inner, known = [inner[chosen_member - 1]], [known[chosen_member - 1]]
        networks += inner
        described += known
    ensemble = build_refiner(dataclasses.replace(base.refiner.config, members=len(networks)))
    for member, network in zip(ensemble.members if isinstance(ensemble, RefinementEnsemble) else [ensemble], networks):
        member.load_state_dict(network.state_dict())
    ensemble.eval()
    if global_model:
        chosen = [load_model(path) for path in global_model]
        for path, model in zip(global_model, chosen):
            if model.landmark_names != base.landmark_names:
                raise SystemExit(f"{path} detects other landmarks than {paths[0]}")
            if model.grid != chosen[0].grid or model.intensity != chosen[0].intensity:
                raise SystemExit(f"{path} reads images on another grid or with another intensity mapping than {global_model[0]}")
        try:
            # One file's global stage is taken as it is, even when it is an ensemble already.
            network = chosen[0].network if len(chosen) == 1 else ensemble_of([model.network for model in chosen])
        except ValueError as error:
            raise SystemExit(f"{', '.join(map(str, global_model))}: {error}") from error
        base = dataclasses.replace(chosen[0], network=network, shape_model=base.shape_model)
        if len(chosen) > 1:
            base.info = {**base.info, "global_stage_members": [
                {"file": path.name, "training": model.info.get("training")} for path, model in zip(global_model, chosen)]}
    base.refiner = ensemble
    base.info = {**base.info, "local_stage_members": described}
    return base


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    import torch

    torch.set_num_threads(args.threads)
    from SCNLandmarksLib.models.model_file import load_model, save_model
    from SCNLandmarksLib.learning.quality_fitting import fit_point_quality

    data = X.isbi_folder(X.find_data_folder(args.data))
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    shipped = output / MODEL_FILE
    timings: dict[str, float] = {}
    if not args.evaluate_only:
        started = time.perf_counter()
        model = combine(args.members, args.global_model)
        validation = X.load_isbi_cases(data, X.checked_training_ids("validation", data), annotation="mean")
        predictions, _ = X.detect_all(model, validation, args.device)
        numbers = X.summary(X.evaluate_against(predictions, {"mean": {c.name: c.landmarks for c in validation}})["mean"])
        print(f"validation (15 images, mean of both doctors): MRE {numbers['mre_mm']:.3f} mm, "
              f"SDR@2mm {100 * numbers['sdr']['2']:.1f} %, SDR@4mm {100 * numbers['sdr']['4']:.1f} %")
        if args.validation_only:
            return 0
        train = X.load_isbi_cases(data, X.checked_training_ids("train_N135", data), annotation="mean")
        print(fit_point_quality(model, train, validation, device=args.device,
                                description="15 ISBI 2015 validation images (mean of both doctors)"))
        save_model(model, shipped, overwrite=True, half_precision=True)
        timings["combine_and_fit_s"] = time.perf_counter() - started
    test_ids = X.test1_ids(data, args.test_images)
    rows = R.evaluate_model(shipped, X.load_isbi_cases(data, test_ids), X.load_ground_truths(data, test_ids), args.device)
    note = f"ISBI 2015 test1, {len(test_ids)} images, half-precision model file; local stage: {load_model(shipped).refiner.config.members} members"
    print(R.write_report(output, "Two-stage model with an ensemble local stage", note, rows, timings, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
