"""The one fine-tuning recipe: landmark matching, what it trains, and the guard that keeps the better model."""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import synthetic_cases, tiny_model
from SCNLandmarksLib.learning import finetuning
from SCNLandmarksLib.learning.finetuning import fine_tune, plan_landmarks, suggested_iterations
from SCNLandmarksLib.data.landmarks import Landmarks
from SCNLandmarksLib.models.model_file import load_model, read_model_description, save_model
from SCNLandmarksLib.learning.refinement_training import attach_refiner
from SCNLandmarksLib.data.training_case import TrainingCase

REFINER = {"patch_size": 32, "spacing_mm": 0.5, "filters": (8, 16, 32), "target_sigma_mm": 1.0}


@pytest.fixture
def two_stage_file(tmp_path):
    cases = synthetic_cases(4, seed=3)
    torch.manual_seed(0)
    model = attach_refiner(tiny_model(cases[0].landmarks.names), **REFINER)
    return save_model(model, tmp_path / "start.scn.pt"), cases


def test_landmarks_are_matched_by_name_and_a_new_set_needs_asking(two_stage_file):
    path, cases = two_stage_file
    model = load_model(path)
    partial = [TrainingCase(c.image, Landmarks(c.landmarks.names[:3], c.landmarks.positions[:3]), c.name) for c in cases]
    assert plan_landmarks(model, partial, new_landmarks=False) is model  # a landmark a case lacks is missing
    renamed = [TrainingCase(c.image, Landmarks([f"X{i}" for i in range(4)], c.landmarks.positions), c.name) for c in cases]
    with pytest.raises(ValueError, match="not in the model.*--new-landmarks"):
        plan_landmarks(model, renamed, new_landmarks=False)
    adapted = plan_landmarks(model, renamed, new_landmarks=True)
    assert adapted.landmark_names == ["X0", "X1", "X2", "X3"] and adapted.refiner.config.num_landmarks == 4


def test_two_stage_model_fine_tunes_its_local_stage_only(two_stage_file, tmp_path):
    path, cases = two_stage_file
    reports = []
    report = fine_tune(cases, path, output=tmp_path / "new.scn.pt", iterations=3, keep_worse=True, device="cpu",
                       progress=reports.append)
    assert report.stages == ["local"] and report.folds == 3 and report.output == tmp_path / "new.scn.pt"
    assert len(report.per_fold) == 3 and sorted(n for f in report.per_fold for n in f["held_out"]) == sorted(c.name for c in cases)
    assert reports[-1].done == reports[-1].total == 12  # 3 folds + the final run, 3 steps each
    start, new = load_model(path), load_model(report.output)
    for key, value in start.network.state_dict().items():
        assert torch.equal(value, new.network.state_dict()[key]), key
    start_state, new_state = start.refiner.state_dict(), new.refiner.state_dict()
    # Alone, the local stage learns gently: weights move, batch-norm statistics stay as trained.
    assert any(not torch.equal(v, new_state[k]) for k, v in start_state.items() if k.endswith("weight"))
    statistics = [k for k in start_state if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(start_state[k], new_state[k]) for k in statistics)
    info = read_model_description(report.output)["info"]["fine_tune"]
    assert info["stages"] == ["local"] and info["folds"] == 3
    assert "local_trust" not in info  # the global stage did not learn: the local stage is read as trained
    assert info["local_recipe"] == {"learning_rate": finetuning.GENTLE_LOCAL_LEARNING_RATE, "batch_norm_statistics": "kept"}


def test_a_fine_tune_that_is_not_better_keeps_the_starting_model(two_stage_file, tmp_path, monkeypatch):
    path, cases = two_stage_file
    start = load_model(path)

    def measured(detections, held_out):  # the starting model is better on every case
        return [1.0] * len(held_out) if detections[0] == "start" else [2.0 + 0.1 * n for n in range(len(held_out))]

    monkeypatch.setattr(finetuning, "_detect_all", lambda model, cases, device: ["start" if model is start else "new"] * len(cases))
    monkeypatch.setattr(finetuning, "_case_errors", measured)
    report = fine_tune(cases, start, output=tmp_path / "new.scn.pt", iterations=2, device="cpu")
    assert report.verdict == "not better" and report.output is None and not (tmp_path / "new.scn.pt").exists()
    assert report.start_error_mm == 1.0 and 2.0 <= report.new_error_mm < 2.1
    assert "starting model is kept" in report.message and "1.00 mm" in report.message
    assert "can tell apart" not in report.message  # worse on every case: a clear verdict
    kept = fine_tune(cases, start, output=tmp_path / "anyway.scn.pt", iterations=2, device="cpu", keep_worse=True)
    assert kept.output.exists() and "NOT better" in kept.message


def test_a_verdict_within_the_noise_of_few_cases_says_so(two_stage_file, tmp_path, monkeypatch):
    path, cases = two_stage_file
    start = load_model(path)
    swings = iter([0.5, -0.6, 0.55, -0.45])  # better on some cases, worse on others

    def measured(detections, held_out):
        return [1.0] * len(held_out) if detections[0] == "start" else [1.0 + next(swings) for _ in held_out]

    monkeypatch.setattr(finetuning, "_detect_all", lambda model, cases, device: ["start" if model is start else "new"] * len(cases))
    monkeypatch.setattr(finetuning, "_case_errors", measured)
    report = fine_tune(cases, start, output=tmp_path / "new.scn.pt", iterations=2, device="cpu", keep_worse=True)
    assert "within what 4 cases can tell apart" in report.message
    assert all(len(f["start_cases_mm"]) == len(f["held_out"]) for f in report.per_fold)


def test_few_cases_are_written_but_reported_unchecked(two_stage_file, tmp_path):
    path, cases = two_stage_file
    report = fine_tune(cases[:2], path, output=tmp_path / "new.scn.pt", iterations=2, device="cpu")
    assert report.verdict == "unchecked" and report.folds == 0 and report.output.exists()
    assert "not checked" in report.message
    with pytest.raises(FileExistsError):
        fine_tune(cases[:2], path, output=tmp_path / "new.scn.pt", iterations=2, device="cpu")


def test_suggested_steps_grow_with_the_cases():
    assert suggested_iterations(5) <= suggested_iterations(20) <= suggested_iterations(100)


def _with_error_model(path, tmp_path, *, validation_mean_mm: float):
    """The starting model with an error model on the global confidence whose validation mean is given."""
    import numpy as np

    from SCNLandmarksLib.models.quality import ErrorModel

    model = load_model(path)
    rng = np.random.default_rng(0)
    signals = {"global_confidence": rng.uniform(0.01, 1.0, (20, 4))}
    model.error_model = ErrorModel.fit(signals, np.exp(-np.log(signals["global_confidence"])), use=["global_confidence"])
    model.error_model.extra["validation_mean_mm"] = validation_mean_mm
    return save_model(model, tmp_path / f"start-{validation_mean_mm:g}.scn.pt")


def test_cases_unlike_the_training_images_fine_tune_both_stages(two_stage_file, tmp_path):
    path, cases = two_stage_file
    # Validation images were expected 1000x closer than any point can be here: these cases look foreign.
    foreign = fine_tune(cases, _with_error_model(path, tmp_path, validation_mean_mm=1e-3),
                        output=tmp_path / "a.scn.pt", iterations=2, keep_worse=True, device="cpu")
    assert foreign.stages == ["global", "local"] and "look unlike the model's training images" in foreign.message
    recipe = read_model_description(foreign.output)["info"]["fine_tune"]
    assert recipe["local_recipe"] == {"learning_rate": finetuning.LOCAL_LEARNING_RATE, "batch_norm_statistics": "follow the cases"}
    assert recipe["global_learning_rate"] == finetuning.UNLIKE_GLOBAL_LEARNING_RATE
    foreign_start, foreign_new = load_model(path).refiner.state_dict(), load_model(foreign.output).refiner.state_dict()
    assert any(not torch.equal(v, foreign_new[k]) for k, v in foreign_start.items() if k.endswith("running_mean"))
    # Their expected errors are learned again on the folds' held-out cases: the old ones describe other images.
    refitted = load_model(foreign.output).error_model
    assert refitted.fitted_on == "held-out detections of 4 fine-tuning cases (cross-validation)"
    assert refitted.signals == ["global_confidence"] and refitted.validation_mean_mm > 1.0
    assert recipe["error_model"] == refitted.fitted_on and "learned again on your cases" in foreign.message
    familiar = fine_tune(cases, _with_error_model(path, tmp_path, validation_mean_mm=1e6),
                         output=tmp_path / "b.scn.pt", iterations=2, keep_worse=True, device="cpu")
    assert familiar.stages == ["local"] and "look unlike" not in familiar.message
    assert load_model(familiar.output).error_model.validation_mean_mm == 1e6  # like the training images: kept
    assert "error_model" not in read_model_description(familiar.output)["info"]["fine_tune"]
    chosen = fine_tune(cases, path, output=tmp_path / "c.scn.pt", iterations=2, keep_worse=True, device="cpu",
                       stages=["global"])
    assert chosen.stages == ["global"]
    assert read_model_description(chosen.output)["info"]["fine_tune"]["global_learning_rate"] == finetuning.GLOBAL_LEARNING_RATE
    with pytest.raises(ValueError, match="Stages must be"):
        fine_tune(cases, path, output=tmp_path / "d.scn.pt", iterations=2, device="cpu", stages=["everything"])


def test_steps_that_fit_share_the_time_between_stages():
    # Two stages: 1 s + 0.1 s per step and 2 s + 0.4 s per step; 13 s hold 20 steps of each.
    assert finetuning._steps_that_fit(13.0, [(1.0, 0.1), (2.0, 0.4)]) == 20
    assert finetuning._steps_that_fit(103.0, [(1.0, 0.1), (2.0, 0.4)]) == 200
    assert finetuning._steps_that_fit(1.0, [(1.0, 0.1), (2.0, 0.4)]) == finetuning.MIN_FITTED_STEPS


def test_a_timed_run_rescales_the_probed_step_times():
    # Probed: 1 s + 0.1 s per step and 2 s + 0.4 s per step, 13 s for 20 steps; the run took 26 s.
    timed = finetuning._timed_speeds({"global": (1.0, 0.1), "local": (2.0, 0.4)}, 26.0, 20)
    assert timed["global"] == pytest.approx((2.0, 0.2)) and timed["local"] == pytest.approx((4.0, 0.8))
    # A run shorter than the probe's set-up estimate still leaves every step a cost.
    faster = finetuning._timed_speeds({"local": (5.0, 0.1)}, 3.5, 20)
    assert faster["local"] == pytest.approx((2.5, 0.05))
    assert finetuning._steps_that_fit(10.0, list(faster.values())) == 150  # (10 - 2.5) / 0.05


def test_runs_after_the_first_are_fitted_again_when_the_probe_misjudged_the_speed(two_stage_file, tmp_path, monkeypatch):
    path, cases = two_stage_file
    monkeypatch.setattr(finetuning, "DEFAULT_ITERATIONS", 25)  # the recipe's steps, kept small for the test
    # A probe that judges every step to take 10 s fits the fewest steps; the first run shows the truth.
    monkeypatch.setattr(finetuning, "_probe_speed", lambda train: (0.0, 10.0))
    # The refitting is checked, not the time ceiling: a machine busy with other work must not cut a run.
    monkeypatch.setattr(finetuning, "RUN_CEILING", 1e6)
    reports = []
    report = fine_tune(cases, path, output=tmp_path / "new.scn.pt", keep_worse=True, device="cpu", progress=reports.append)
    assert [fold["steps"] for fold in report.per_fold] == [finetuning.MIN_FITTED_STEPS, 25, 25]
    assert report.steps_per_run == 25 and "instead of" not in report.message
    assert reports[-1].done == reports[-1].total == finetuning.MIN_FITTED_STEPS + 3 * 25


def test_a_slow_computer_gets_fewer_steps_within_the_time_limit_and_is_told(two_stage_file, tmp_path, monkeypatch):
    path, cases = two_stage_file
    monkeypatch.setattr(finetuning, "DEFAULT_TIME_LIMIT_S", 0.5)  # no computer is this fast: fit the fewest steps
    # What is tested is the fitting of steps, not the ceiling that stops a run slowed down mid-way
    # (as a CI machine busy with something else can): the fitted steps must all run.
    monkeypatch.setattr(finetuning, "RUN_CEILING", 1e6)
    reports = []
    report = fine_tune(cases, path, output=tmp_path / "new.scn.pt", keep_worse=True, device="cpu", progress=reports.append)
    assert report.steps_per_run == finetuning.MIN_FITTED_STEPS < suggested_iterations(len(cases))
    assert f"took {finetuning.MIN_FITTED_STEPS} steps instead of {suggested_iterations(len(cases))}" in report.message
    assert "measuring" in reports[0].message and reports[-1].done == reports[-1].total == 4 * finetuning.MIN_FITTED_STEPS
    assert read_model_description(report.output)["info"]["fine_tune"]["steps_per_run"] == report.steps_per_run
    # Asked-for iterations are run as asked, with no time limit and no probe.
    exact = fine_tune(cases, path, output=tmp_path / "exact.scn.pt", iterations=3, keep_worse=True, device="cpu")
    assert exact.steps_per_run == 3 and "instead of" not in exact.message


def test_when_both_stages_learn_the_folds_choose_how_far_to_trust_the_local_stage(two_stage_file, tmp_path, monkeypatch):
    import math

    path, cases = two_stage_file
    start = load_model(path)
    trained = start.refiner.config.min_peak_fraction
    read_with: list[float] = []

    def detect(model, cases, device, signals=None):
        if model is start:
            return ["start"] * len(cases)
        read_with.append(model.refiner.config.min_peak_fraction)
        return [model.refiner.config.min_peak_fraction] * len(cases)

    def run(errors_by_fraction, name, stages=("global", "local")):
        monkeypatch.setattr(finetuning, "_case_errors", lambda found, held_out: [
            2.0 if found[0] == "start" else errors_by_fraction.get(found[0], 1.5)] * len(held_out))
        read_with.clear()
        return fine_tune(cases, start, output=tmp_path / name, iterations=2, device="cpu", stages=list(stages))

    monkeypatch.setattr(finetuning, "_detect_all", detect)
    # On these cases the global stage's points beat an unsure local stage's.
    report = run({math.inf: 1.2}, "global.scn.pt")
    assert sorted(set(read_with)) == sorted([trained, 0.5, math.inf])  # every fold read every choice
    assert report.verdict == "better" and report.new_error_mm == pytest.approx(1.2)
    assert load_model(report.output).refiner.config.min_peak_fraction == math.inf
    assert read_model_description(report.output)["info"]["fine_tune"]["local_trust"] == "inf"
    assert "keeps the global stage's points" in report.message
    assert all(set(f["local_trust_cases_mm"]) == {"as trained", "0.5", "inf"} for f in report.per_fold)
    # Where the local stage as trained is best, the new model reads it as trained.
    kept = run({trained: 1.0}, "trained.scn.pt")
    assert kept.new_error_mm == pytest.approx(1.0)
    assert load_model(kept.output).refiner.config.min_peak_fraction == trained
    assert read_model_description(kept.output)["info"]["fine_tune"]["local_trust"] == "as trained"
    assert "global stage" not in kept.message
    # The global stage learning alone beside a local stage it did not retrain: the folds choose too.
    alone = run({0.5: 1.1}, "global-alone.scn.pt", stages=["global"])
    assert alone.stages == ["global"] and load_model(alone.output).refiner.config.min_peak_fraction == 0.5
    assert "only where it is sure" in alone.message


def test_a_new_landmark_set_fills_the_default_time_limit(two_stage_file, tmp_path, monkeypatch):
    path, cases = two_stage_file
    renamed = [TrainingCase(c.image, Landmarks([f"X{i}" for i in range(4)], c.landmarks.positions), c.name) for c in cases]
    monkeypatch.setattr(finetuning, "DEFAULT_ITERATIONS", 2)
    monkeypatch.setattr(finetuning, "DEFAULT_TIME_LIMIT_S", 6.0)
    same_set = fine_tune(cases, path, output=tmp_path / "same.scn.pt", keep_worse=True, device="cpu")
    new_set = fine_tune(renamed, path, output=tmp_path / "new.scn.pt", new_landmarks=True, device="cpu")
    assert same_set.steps_per_run == 2  # the recipe's steps for the same set, time left over or not
    assert new_set.steps_per_run > 2 and new_set.output == tmp_path / "new.scn.pt"
