"""The experiment scripts (scripts/experiments) run end to end in quick mode on a fake data set.

The fake data is laid out exactly like the shared data (see /work/shared/data/README.md):
``isbi2015/images/NNN.jpg`` (grey stored as 3 equal RGB channels, no spacing), senior and
junior CSVs in mm at 0.1 mm per pixel without header, ``splits/train.txt`` and ``test1.txt``;
``hand9/images/ID.mha`` (uint8, one slice, normalising spacing in the header) and a pixel
``landmarks.csv``. The images are small synthetic ones with known landmarks, so the runs
take seconds; the real data is never needed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from SCNLandmarksLib.data.synthetic import make_synthetic_case
from SCNLandmarksLib.models.quality import SIGNALS

REPOSITORY = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPOSITORY / "scripts" / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import choose_recipe
import cross_validation
import detection_speed
import error_model_terms
import ensemble_refiners
import few_cases
import hand_transfer
import isbi2015
import miss_sources
import oof_error_model
import second_global
import stage_blend
import train_isbi

ISBI_SIZE = (80, 96)  # x, y pixels of the fake cephalograms (0.1 mm each)
HAND_SIZE = (64, 80)
HAND_SPACING = 0.108075  # a normalising spacing as in the real hand9 headers
# One torch thread: on a shared 2-core machine two spinning threads can be 20x slower than one.
TINY = ["--quick", "--device", "cpu", "--grid-size", "64", "--filters", "8", "--threads", "1"]


def _uint8(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    return np.clip(np.round(255 * (array - low) / (high - low)), 0, 255).astype(np.uint8)


def _coordinates(values: np.ndarray, digits: int) -> str:
    return ",".join(f"{v:.{digits}f}" if digits else str(round(v)) for v in values.reshape(-1))


def _write_isbi(folder: Path) -> None:
    images, landmarks, splits = folder / "images", folder / "landmarks", folder / "splits"
    for sub in (images, landmarks, splits):
        sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    senior_rows, junior_rows = [], []
    for number in range(1, 301):
        image, points = make_synthetic_case(dimension=2, size=ISBI_SIZE, spacing=0.1, num_landmarks=19, seed=number,
                                            noise=0.01)
        grey = sitk.GetImageFromArray(_uint8(image.array))
        # The real files are grey pictures saved as 3 equal RGB channels, without spacing.
        sitk.WriteImage(sitk.Compose(grey, grey, grey), str(images / f"{number:03d}.jpg"))
        image_id = f"{number:03d}"
        senior_rows.append(f"{image_id},{_coordinates(points.positions, 1)}")
        junior = points.positions + rng.normal(0.0, 0.15, points.positions.shape)
        junior_rows.append(f"{image_id},{_coordinates(junior, 1)}")
    (landmarks / "senior.csv").write_text("\n".join(senior_rows) + "\n", encoding="utf-8")
    (landmarks / "junior.csv").write_text("\n".join(junior_rows) + "\n", encoding="utf-8")
    (splits / "train.txt").write_text("".join(f"{i:03d}\n" for i in range(1, 151)), encoding="utf-8")
    (splits / "test1.txt").write_text("".join(f"{i:03d}\n" for i in range(151, 301)), encoding="utf-8")


def _hand_ids() -> list[str]:
    ids = []
    for fold in (1, 2, 3):
        ids += isbi2015.read_split(f"hand9_fold{fold}_test")
    return sorted(ids)


def _write_hand(folder: Path) -> None:
    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for seed, image_id in enumerate(_hand_ids()):
        image, points = make_synthetic_case(dimension=2, size=HAND_SIZE, spacing=HAND_SPACING, num_landmarks=37,
                                            seed=1000 + seed, noise=0.01)
        volume = sitk.GetImageFromArray(_uint8(image.array)[None])  # one slice, as the real .mha files
        volume.SetSpacing((HAND_SPACING,) * 3)
        sitk.WriteImage(volume, str(images / f"{image_id}.mha"))
        rows.append(f"{image_id},{_coordinates(points.positions / HAND_SPACING, 0)}")  # pixels, integers
    (folder / "landmarks.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> object:
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _write_isbi(root / "isbi2015")
    _write_hand(root / "hand9")
    return root


@pytest.fixture(scope="module")
def ceph_results(fake_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("train_isbi")
    results = train_isbi.main(["--data", str(fake_data), "--output", str(output), *TINY, "--iterations", "2",
                               "--validate-every", "1", "--test-images", "3", "--configs", "scn-paper,scn-mean"])
    return output, results


def _all_finite(values: object) -> bool:
    if isinstance(values, dict):
        return all(_all_finite(v) for v in values.values())
    if isinstance(values, (list, tuple)):
        return all(_all_finite(v) for v in values)
    if isinstance(values, float):
        return math.isfinite(values)
    return True


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ splits and helpers


def test_committed_isbi_splits_are_what_the_seed_gives() -> None:
    generated = isbi2015.generate_isbi_splits([f"{i:03d}" for i in range(1, 151)])
    for name, ids in generated.items():
        assert isbi2015.read_split(name) == ids, name
    validation = set(generated["validation"])
    assert len(validation) == isbi2015.VALIDATION_COUNT
    previous: set[str] = set()
    for size in (5, 10, 25, 50, 135):
        subset = set(generated[f"train_N{size}"])
        assert len(subset) == size and previous <= subset and not subset & validation
        previous = subset
    assert generated["train_N150"] == [f"{i:03d}" for i in range(1, 151)]


def test_hand_folds_cover_every_image_once() -> None:
    ids = _hand_ids()
    assert len(ids) == 9 and len(set(ids)) == 9
    assert isbi2015.generate_hand_folds(ids) == [isbi2015.read_split(f"hand9_fold{k}_test") for k in (1, 2, 3)]
    train, test = isbi2015.hand_fold_ids(1, ids)
    assert len(train) == 6 and len(test) == 3 and not set(train) & set(test)


def test_missing_data_folder_names_the_environment_variable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="SCN_DATA_DIR"):
        isbi2015.find_data_folder(tmp_path / "nowhere")


def test_mean_ground_truth_is_the_midpoint(fake_data: Path) -> None:
    isbi = isbi2015.isbi_folder(fake_data)
    truths = isbi2015.load_ground_truths(isbi, ["151"])
    senior, junior, mean = (truths[k]["151"].positions for k in ("senior", "junior", "mean"))
    np.testing.assert_allclose(mean, (senior + junior) / 2)
    assert not np.allclose(senior, junior)
    case = isbi2015.load_isbi_cases(isbi, ["151"])[0]
    # JPEG pixels at 0.1 mm: the CSV millimetres are pixel indices / 10 in the image's frame.
    assert case.image.geometry.spacing == pytest.approx((0.1, 0.1))
    np.testing.assert_allclose(case.landmarks.positions, senior)


def test_hand_landmarks_go_through_the_header_spacing(fake_data: Path) -> None:
    hand = isbi2015.hand_folder(fake_data)
    image_id = _hand_ids()[0]
    case = isbi2015.load_hand_cases(hand, [image_id])[0]
    pixels = np.array([float(v) for v in (hand / "landmarks.csv").read_text().splitlines()[0].split(",")[1:]])
    np.testing.assert_allclose(case.landmarks.positions.reshape(-1), pixels * HAND_SPACING)
    assert len(case.landmarks) == 37


# ------------------------------------------------------------------------------ the scripts


def test_train_isbi_writes_model_card_table_and_plots(ceph_results: tuple[Path, dict]) -> None:
    output, results = ceph_results
    assert {p.name for p in output.iterdir()} >= {"table.md", "results.json", "learning_curves.png", "MODEL_CARD.md",
                                                   "cephalometric_isbi2015.scn.pt", "models.json.entry.json"}
    assert _is_png(output / "learning_curves.png")
    assert _is_png(output / "scn-paper" / "test1-senior" / "cumulative_error.png")
    table = (output / "table.md").read_text()
    assert "NOT THE REFERENCE PROTOCOL" in table and "junior doctor" in table and "sella" in table
    stored = json.loads((output / "results.json").read_text())
    assert stored["quick"] is True and len(stored["configurations"]) == 2
    for run in stored["configurations"]:
        for truth in ("senior", "mean"):
            numbers = run["test1"][truth]
            assert numbers["num_cases"] == 3 and numbers["num_points"] == 57
            assert math.isfinite(numbers["mre_mm"]) and 0 <= numbers["sdr"]["2"] <= 1
        assert run["training"]["iterations"] == 2 and run["training"]["seconds"] > 0
        assert run["detection"]["images_per_second"] > 0
    assert _all_finite(stored["inter_observer_junior_vs_senior"])
    assert 0 < stored["inter_observer_junior_vs_senior"]["mre_mm"] < 1  # fake junior = senior + 0.15 mm noise
    card = (output / "MODEL_CARD.md").read_text()
    assert "{{" not in card and "Wang" in card and "NOT THE REFERENCE PROTOCOL" in card
    entry = json.loads((output / "models.json.entry.json").read_text())
    from SCNLandmarksLib.models.catalog import file_sha256
    from SCNLandmarksLib.models.model_file import load_model

    assert entry["sha256"] == file_sha256(output / "cephalometric_isbi2015.scn.pt") and entry["default"] is True
    assert results["shipped"]["sha256"] == entry["sha256"] and results["shipped"]["configuration"] in ("scn-paper", "scn-mean")
    shipped = load_model(output / "cephalometric_isbi2015.scn.pt")
    assert shipped.landmark_names[0] == "sella" and shipped.info["measured"]["test1"]["mean"]["num_cases"] == 3


def test_few_cases_table_plot_and_reuse(fake_data: Path, tmp_path: Path) -> None:
    arguments = ["--data", str(fake_data), "--output", str(tmp_path), *TINY, "--iterations", "2", "--test-images", "2"]
    results = few_cases.main(arguments)
    runs = {(r["architecture"], r["n"]): r for r in results["runs"]}
    assert set(runs) == {(a, n) for a in ("scn", "unet") for n in (5, 10, 25, 50, 150)}
    for (architecture, size), run in runs.items():
        assert len(run["training_ids"]) == size
        assert run["training_ids"] == isbi2015.read_split(f"train_N{size}")
        for truth in ("senior", "mean"):
            assert math.isfinite(run["test1"][truth]["mre_mm"]) and run["test1"][truth]["num_cases"] == 2
        assert not (tmp_path / f"{architecture}-N{size:03d}" / "model.scn.pt").exists()  # not kept by default
    assert _is_png(tmp_path / "few_cases.png")
    table = (tmp_path / "table.md").read_text()
    assert "NOT THE REFERENCE PROTOCOL" in table and "U-Net MRE (mm)" in table and "| 150 |" in table
    stored = json.loads((tmp_path / "results.json").read_text())
    assert len(stored["runs"]) == 10 and _all_finite(stored["runs"])
    # Rerunning the same command reuses every finished run instead of training again.
    again = few_cases.main(arguments)
    assert [r["training"]["seconds"] for r in again["runs"]] == [r["training"]["seconds"] for r in results["runs"]]


def test_hand_transfer_fine_tunes_and_compares(fake_data: Path, ceph_results: tuple[Path, dict], tmp_path: Path) -> None:
    ceph = ceph_results[0] / "cephalometric_isbi2015.scn.pt"
    results = hand_transfer.main(["--data", str(fake_data), "--output", str(tmp_path), *TINY, "--iterations", "10",
                                  "--curve-every", "10", "--folds", "1,2", "--ceph-model", str(ceph)])
    runs = {(r["arm"], r["fold"]): r for r in results["runs"]}
    assert set(runs) == {(a, f) for a in ("fine-tuned", "scratch") for f in (1, 2)}
    for run in runs.values():
        assert len(run["train_ids"]) == 6 and len(run["test_ids"]) == 3
        assert [p["iteration"] for p in run["curve"]] == [0, 10]
        assert run["test"]["num_points"] == 3 * 37 and math.isfinite(run["test"]["mre_mm"])
    # The grid and network come from the cephalometric model for both arms.
    assert results["settings"]["grid_size"] == 64 and results["settings"]["filters"] == 8
    assert results["pooled"]["fine-tuned"]["num_cases"] == 6 and _all_finite(results["pooled"])
    assert _is_png(tmp_path / "hand_transfer.png")
    table = (tmp_path / "table.md").read_text()
    assert "NOT THE REFERENCE PROTOCOL" in table and "fine-tuned" in table and "scratch" in table


def test_detection_speed_times_load_to_points(fake_data: Path, ceph_results: tuple[Path, dict], tmp_path: Path) -> None:
    ceph = ceph_results[0] / "cephalometric_isbi2015.scn.pt"
    measured = detection_speed.main(["--data", str(fake_data), "--output", str(tmp_path), "--quick", "--device", "cpu",
                                    "--images", "3", "--threads", "1", "--model", str(ceph)])
    cpu = measured["measurements"]["cpu"]
    assert cpu["threads"] == 1 and len(cpu["per_image_seconds"]) == 3
    assert cpu["cold_seconds"] >= cpu["model_load_seconds"] > 0 and cpu["images_per_second"] > 0
    assert "gpu" not in measured["measurements"]
    assert _is_png(tmp_path / "detection_speed.png")
    assert "QUICK" in (tmp_path / "table.md").read_text()


def test_ensemble_takes_chosen_members_and_another_global_stage(tmp_path: Path) -> None:
    import copy

    import torch
    from engine_fixtures import tiny_model
    from SCNLandmarksLib.learning.refinement_training import attach_refiner
    from SCNLandmarksLib.models.model_file import save_model

    names = ["a", "b", "c"]
    refiner = {"patch_size": 32, "spacing_mm": 0.5, "filters": (8, 16), "target_sigma_mm": 1.0}
    torch.manual_seed(0)
    first = attach_refiner(tiny_model(names), **refiner)
    first.info = {"refiner_training": {"seed": 0}}
    second = attach_refiner(copy.deepcopy(first), **refiner)  # the same global stage, a new local network
    second.info = {"refiner_training": {"seed": 1}, "local_stage_members": [{"inherited": True}] * 2}
    save_model(first, tmp_path / "first.scn.pt")
    save_model(second, tmp_path / "second.scn.pt")
    pair = ensemble_refiners.combine([tmp_path / "first.scn.pt", tmp_path / "second.scn.pt"])
    # A single network's file describes itself, whatever its parent's ensemble left in its info.
    assert pair.info["local_stage_members"] == [{"file": "first.scn.pt", "refiner_training": {"seed": 0}},
                                                {"file": "second.scn.pt", "refiner_training": {"seed": 1}}]
    save_model(pair, tmp_path / "pair.scn.pt")
    other_global = tiny_model(names)
    save_model(other_global, tmp_path / "global.scn.pt")
    save_model(attach_refiner(copy.deepcopy(other_global), **refiner), tmp_path / "elsewhere.scn.pt")
    with pytest.raises(SystemExit, match="another global stage"):
        ensemble_refiners.combine([tmp_path / "first.scn.pt", tmp_path / "elsewhere.scn.pt"])
    picked = ensemble_refiners.combine([Path(f"{tmp_path / 'pair.scn.pt'}@2")], global_model=[tmp_path / "global.scn.pt"])
    assert picked.refiner.config.members == 1
    assert picked.info["local_stage_members"] == [pair.info["local_stage_members"][1]]
    assert all(torch.equal(a, b) for a, b in zip(picked.refiner.state_dict().values(),
                                                 second.refiner.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(picked.network.state_dict().values(),
                                                 other_global.network.state_dict().values()))
    with pytest.raises(SystemExit, match="no number 3"):
        ensemble_refiners.combine([Path(f"{tmp_path / 'pair.scn.pt'}@3")])
    both = ensemble_refiners.combine([tmp_path / "pair.scn.pt"],
                                     global_model=[tmp_path / "first.scn.pt", tmp_path / "global.scn.pt"])
    assert both.config.members == 2 and both.refiner.config.members == 2
    assert [m["file"] for m in both.info["global_stage_members"]] == ["first.scn.pt", "global.scn.pt"]
    for member, source in zip(both.network.members, (first, other_global)):
        assert all(torch.equal(a, b) for a, b in zip(member.state_dict().values(), source.network.state_dict().values()))
    save_model(both, tmp_path / "both.scn.pt")
    again = ensemble_refiners.combine([tmp_path / "pair.scn.pt"], global_model=[tmp_path / "both.scn.pt"])
    assert again.config.members == 2  # one file's ensemble global stage is taken as it is
    from SCNLandmarksLib.imaging.grid import GridSpec

    save_model(tiny_model(names, grid=GridSpec(size=(32, 32))), tmp_path / "small_grid.scn.pt")
    with pytest.raises(SystemExit, match="another grid"):
        ensemble_refiners.combine([tmp_path / "pair.scn.pt"],
                                  global_model=[tmp_path / "first.scn.pt", tmp_path / "small_grid.scn.pt"])
    save_model(tiny_model(["a", "b"]), tmp_path / "two_landmarks.scn.pt")
    with pytest.raises(SystemExit, match="other landmarks"):
        ensemble_refiners.combine([tmp_path / "pair.scn.pt"],
                                  global_model=[tmp_path / "first.scn.pt", tmp_path / "two_landmarks.scn.pt"])


def test_misses_are_sorted_by_where_they_come_from() -> None:
    zero = np.zeros((1, 4, 2))
    truths = {"mean": zero, "senior": zero.copy(), "junior": zero.copy()}
    truths["senior"][0, 3] = (-3.0, 0.0)  # the doctors 6 mm apart on landmark 4
    truths["junior"][0, 3] = (3.0, 0.0)
    found = {
        # 1: a global miss kept; 2: made worse by the local stage; 3: a global miss fixed; 4: one doctor's reading
        "points": np.array([[[5.0, 0.0], [0.0, 4.5], [1.0, 0.0], [-5.0, 0.0]]]),
        "global": np.array([[[6.0, 0.0], [0.0, 1.0], [9.0, 0.0], [-5.0, 0.0]]]),
        "check": np.array([[True, False, False, False]]),
    }
    counted = miss_sources.sources(found, truths, radius=4.0)
    assert counted["misses"] == {"points": 3, "flagged": 1}
    assert counted["global_miss_kept"]["points"] == 2 and counted["made_worse_by_local_stage"]["points"] == 1
    assert counted["global_misses_fixed"] == 1
    assert counted["doctors_disagree_and_near_one"] == {"points": 1, "flagged": 0}
    assert counted["per_landmark_misses"] == [1, 1, 0, 1] and counted["per_landmark_missed_unflagged"] == [0, 1, 0, 1]
    assert counted["flagged_fraction"] == 0.25


def test_a_candidate_recipe_is_read_or_explained() -> None:
    import argparse

    name, members, globals_ = choose_recipe.parse_candidate("two globals=b.scn.pt@1, b.scn.pt@2:b.scn.pt,g.scn.pt")
    assert name == "two globals" and members == [Path("b.scn.pt@1"), Path("b.scn.pt@2")]
    assert globals_ == [Path("b.scn.pt"), Path("g.scn.pt")]
    for wrong in ("b.scn.pt@1:b.scn.pt", "x=b.scn.pt@1", "x=:b.scn.pt"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=MEMBER"):
            choose_recipe.parse_candidate(wrong)


def test_folds_are_seeded_disjoint_and_cover_every_image() -> None:
    ids = [f"{i:03d}" for i in range(1, 136)]
    folds = cross_validation.fold_ids(ids, 3)
    assert folds == cross_validation.fold_ids(ids, 3)
    assert sorted(i for fold in folds for i in fold) == ids
    assert [len(f) for f in folds] == [45, 45, 45]
    assert folds != cross_validation.fold_ids(ids, 3, seed=cross_validation.FOLD_SEED + 1)


def test_each_fold_is_predicted_by_an_error_model_that_never_saw_it() -> None:
    rng = np.random.default_rng(4)
    images, landmarks = 60, 5
    width = rng.uniform(0.3, 3.0, (images, landmarks))
    signals = {"local_width_mm": width, "global_confidence": rng.uniform(0.2, 1.0, (images, landmarks))}
    errors = width * rng.lognormal(0.0, 0.3, (images, landmarks))  # the error grows with the width
    fold = np.repeat([1, 2, 3], images // 3)
    validation = {k: v[:10] for k, v in signals.items()}
    use = ["local_width_mm", "global_confidence"]
    expected = oof_error_model.leave_one_fold_out(signals, errors, fold, validation, errors[:10], use, 0.15)
    assert oof_error_model.scores(expected, errors)["auroc_2mm"] > 0.8
    # Fold 2's own errors play no part in its predictions; the other folds' do.
    changed = errors.copy()
    changed[fold == 2] *= 5.0
    again = oof_error_model.leave_one_fold_out(signals, changed, fold, validation, errors[:10], use, 0.15)
    np.testing.assert_allclose(again[fold == 2], expected[fold == 2])
    assert not np.allclose(again[fold == 1], expected[fold == 1])


def test_cross_validation_holds_each_fold_out_of_its_model_and_resumes(fake_data: Path, tmp_path: Path) -> None:
    from SCNLandmarksLib.models.model_file import load_model

    output = tmp_path / "folds"
    arguments = ["--data", str(fake_data), "--output", str(output), "--quick", "--grid-size", "64", "--filters", "8",
                 "--threads", "1"]
    assert cross_validation.main(arguments) == 0
    signals, errors, fold = cross_validation.read_out_of_fold(output)
    held_out = np.load(output / "folds.npz")["ids"].tolist()
    assert len(held_out) == len(set(held_out)) == errors.shape[0] == 30 and errors.shape[1] == 19
    assert sorted(set(fold.tolist())) == [1, 2, 3] and {"local_width_mm", "shape_deviation"} <= set(signals)
    planned = json.loads((output / "results.json").read_text(encoding="utf-8"))["folds"]
    for k in (1, 2, 3):
        predicted = set(np.load(output / f"fold{k}" / "held_out.npz")["ids"].tolist())
        assert predicted == set(planned[k - 1]) == {i for i, f in zip(held_out, fold) if f == k}
        model = load_model(output / f"fold{k}" / "two_stage.scn.pt")
        global_images = set(model.info["training"]["cases"]) | set(model.info["training"]["validation_cases"])
        local_images = set(model.info["refiner_training"]["cases"]) | set(model.info["refiner_training"]["validation_cases"])
        assert global_images and local_images and not (global_images | local_images) & predicted
        assert model.shape_model is not None and model.refiner is not None
    # A fold whose detections were lost is detected again with the model it has; the others are kept.
    kept = (output / "fold1" / "held_out.npz").stat().st_mtime_ns
    models = [(output / "fold2" / name).stat().st_mtime_ns for name in ("global.scn.pt", "two_stage.scn.pt")]
    (output / "fold2" / "held_out.npz").unlink()
    assert cross_validation.main(arguments) == 0
    assert (output / "fold1" / "held_out.npz").stat().st_mtime_ns == kept
    assert (output / "fold2" / "held_out.npz").is_file()
    assert models == [(output / "fold2" / name).stat().st_mtime_ns for name in ("global.scn.pt", "two_stage.scn.pt")]
    np.testing.assert_allclose(cross_validation.read_out_of_fold(output)[1], errors)
    # After a change of the detector every fold is detected again with its kept models.
    assert cross_validation.main([*arguments, "--detect-again"]) == 0
    assert (output / "fold1" / "held_out.npz").stat().st_mtime_ns != kept
    assert models == [(output / "fold2" / name).stat().st_mtime_ns for name in ("global.scn.pt", "two_stage.scn.pt")]
    np.testing.assert_allclose(cross_validation.read_out_of_fold(output)[1], errors)
    with pytest.raises(SystemExit, match="other settings"):
        cross_validation.main([*arguments, "--folds", "4"])
    # A second global stage per fold, trained on the fold's training images only, judged on its held-out ones.
    judged = tmp_path / "second"
    second = ["--data", str(fake_data), "--folds", str(output), "--work", str(tmp_path / "work"), "--output", str(judged),
              "--iterations", "3"]
    assert second_global.main(second) == 0
    assert second_global.SPREAD not in SIGNALS  # known to the engine only while the script judged it
    results = json.loads((judged / "results.json").read_text(encoding="utf-8"))
    assert {"A", "B", "rule_1_b_passes", "rule_2_adopted"} <= set(results)
    assert results["A"]["accuracy"]["images"] == results["B"]["accuracy"]["images"] == 30
    assert results["A"]["accuracy"]["mre_mm"] == pytest.approx(float(np.nanmean(errors)))  # A is the fold model as it is
    for k in (1, 2, 3):
        info = load_model(tmp_path / "work" / f"fold{k}" / "global_seed1.scn.pt").info["training"]
        assert set(info["cases"]) == {i for i, f in zip(held_out, fold) if f != k}
    trained = (tmp_path / "work" / "fold1" / "global_seed1.scn.pt").stat().st_mtime_ns
    assert second_global.main(second) == 0
    assert (tmp_path / "work" / "fold1" / "global_seed1.scn.pt").stat().st_mtime_ns == trained  # kept, not trained again


def test_caught_share_counts_the_far_points_among_those_expected_furthest_off() -> None:
    errors = np.array([[5.0, 0.5, 0.4, 6.0, 0.3, 0.2, 0.1, 0.6, 0.7, 4.5]])
    expected = np.array([[9.0, 1.0, 1.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])  # one far point ranked first, two not
    assert error_model_terms.caught_when_flagging(expected, errors, 0.1) == pytest.approx(1 / 3)
    assert error_model_terms.caught_when_flagging(expected, errors, 0.5) == pytest.approx(2 / 3)  # 0.8 is in the upper half


def test_validation_images_harder_than_unseen_ones_raise_the_share_to_flag() -> None:
    class Scaled:  # an error model whose expected error is the width times a factor
        def __init__(self, factor: float) -> None:
            self.factor = factor

        def expected_errors(self, signals: dict) -> np.ndarray:
            return self.factor * signals["local_width_mm"]

    rng = np.random.default_rng(5)
    fold = np.repeat([1, 2], 50)
    oof = {"local_width_mm": rng.uniform(0.5, 2.0, (100, 4))}
    same = {k: {"local_width_mm": rng.uniform(0.5, 2.0, (40, 4))} for k in (1, 2)}
    harder = {k: {"local_width_mm": v["local_width_mm"] * 1.3} for k, v in same.items()}
    models = {1: Scaled(1.0), 2: Scaled(1.0)}
    share, threshold, points = error_model_terms.transferred_fraction(models, oof, fold, same, ["local_width_mm"], 0.15)
    assert points == 320 and 0.08 < share < 0.22 and threshold == pytest.approx(np.quantile(oof["local_width_mm"], 0.85))
    harder_share, _, _ = error_model_terms.transferred_fraction(models, oof, fold, harder, ["local_width_mm"], 0.15)
    assert harder_share > share + 0.15


def test_the_blend_rule_needs_three_fewer_far_points_and_no_higher_error() -> None:
    results = {"blend 0.0": {"over_4mm": 91, "mre_mm": 1.120}, "blend 0.1": {"over_4mm": 88, "mre_mm": 1.115},
               "blend 0.2": {"over_4mm": 89, "mre_mm": 1.110}, "blend 0.3": {"over_4mm": 85, "mre_mm": 1.130}}
    assert stage_blend.choose(results) == "blend 0.1"  # 0.3 has fewer far points but a higher error
    results["blend 0.2"]["over_4mm"] = 88
    assert stage_blend.choose(results) == "blend 0.2"  # a tie in far points goes to the lower error
    assert stage_blend.choose({"blend 0.0": results["blend 0.0"], "blend 0.3": results["blend 0.3"]}) == "blend 0.0"


def test_blend_variants_move_toward_the_global_points_or_keep_them_where_the_local_stage_jumped() -> None:
    local = np.array([[[0.0, 0.0], [10.0, 0.0]]])
    coarse = np.array([[[1.0, 0.0], [0.0, 0.0]]])
    found = stage_blend.variants(local, coarse)
    np.testing.assert_allclose(found["blend 0.1"], [[[0.1, 0.0], [9.0, 0.0]]])
    np.testing.assert_allclose(found["keep the global point beyond 4 mm"], [[[0.0, 0.0], [0.0, 0.0]]])
    truth = np.zeros((1, 2, 2))
    assert stage_blend.scores(found["keep the global point beyond 4 mm"], truth)["over_4mm"] == 0
    assert stage_blend.scores(local, truth)["over_4mm"] == 1
