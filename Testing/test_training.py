"""Training really learns, and is safe: cancel, resume, missing landmarks, new landmark sets."""

import numpy as np
import pytest
import torch

from engine_fixtures import synthetic_cases, tiny_model
from SCNLandmarksLib.inference.detection import Detector
from SCNLandmarksLib.common.errors import TrainingCancelled
from SCNLandmarksLib.inference.evaluation import point_errors
from SCNLandmarksLib.models.heatmaps import HeatmapTargets, heatmap_loss
from SCNLandmarksLib.data.landmarks import Landmarks
from SCNLandmarksLib.models.model_file import load_model, save_model
from SCNLandmarksLib.learning.training import TrainingConfig, adapt_to_landmarks, train_model
from SCNLandmarksLib.data.training_case import TrainingCase


def mean_error(model_or_path, cases) -> float:
    detector = Detector(model_or_path, device="cpu")
    return float(np.nanmean(np.concatenate([point_errors(detector.detect(c.image), c.landmarks) for c in cases])))


def quick(iterations: int, **overrides) -> TrainingConfig:
    values = {"iterations": iterations, "learning_rate": 1e-3, "device": "cpu", "validate_every": 100, "progress_every": 10}
    values.update(overrides)
    return TrainingConfig(**values)


@pytest.mark.slow
def test_training_learns_synthetic_landmarks_to_below_a_millimetre(tmp_path):
    torch.manual_seed(0)
    cases = synthetic_cases(14)
    train, test = cases[:10], cases[10:]
    model = tiny_model(train[0].landmarks.names)
    before = mean_error(model, test)
    reports = []
    result = train_model(train, model, output=tmp_path / "m.scn.pt", config=quick(300), progress=reports.append)
    after = mean_error(tmp_path / "m.scn.pt", test)
    losses = [r.loss for r in reports if r.stage == "train"]
    assert before > 10.0
    assert after < 1.0, f"held-out error {after:.2f} mm after training (was {before:.1f} mm)"
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    assert result.best_validation_mre_mm is not None and result.iterations == 300
    assert reports[-1].done == 300 and reports[-1].validation_mre_mm is not None


def test_missing_landmarks_are_masked_out_of_loss_and_sigma_penalty():
    targets = HeatmapTargets(2, 2, initial_sigma=2.0, gamma=100.0)
    positions = torch.tensor([[[8.0, 8.0], [4.0, 4.0]]])
    maps = targets(positions, (16, 16))
    prediction = maps.detach().clone()
    prediction[0, 1] += 5.0  # wildly wrong on landmark 2 only
    valid_both = torch.tensor([[True, True]])
    valid_first = torch.tensor([[True, False]])
    sigmas = targets.sigmas
    with_second = heatmap_loss(prediction, maps, valid_both, sigmas, sigma_weight=1.0)
    without_second = heatmap_loss(prediction, maps, valid_first, sigmas, sigma_weight=1.0)
    assert float(without_second) == pytest.approx(0.5 * 4.0)  # only the first sigma's penalty remains
    assert float(with_second) > float(without_second) + 1000


def test_cases_with_missing_points_train_and_unknown_landmarks_are_explained(tmp_path):
    cases = synthetic_cases(3)
    cases[0].landmarks.positions[1] = np.nan
    model = tiny_model(cases[0].landmarks.names)
    result = train_model(cases, model, output=tmp_path / "m.scn.pt", config=quick(5, validation_fraction=0.0))
    assert np.isfinite(result.history[-1]["loss"])
    stranger = TrainingCase(cases[1].image, Landmarks(["X1", "X2"], np.zeros((2, 2))), "stranger")
    with pytest.raises(ValueError, match="has 2 landmarks but the model has 4.*X1"):
        train_model([stranger], model, output=tmp_path / "n.scn.pt", config=quick(5))


def test_a_checkpoint_never_replaces_a_model_or_any_other_file(tmp_path):
    """A run writes its checkpoint over and over and deletes it at the end: pointed at a model, that model was lost."""
    cases = synthetic_cases(3)
    precious = save_model(tiny_model(cases[0].landmarks.names), tmp_path / "precious.scn.pt")
    kept = precious.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for taken in (precious, notes):
        with pytest.raises(FileExistsError, match="is not a training checkpoint; it is kept"):
            train_model(cases, tiny_model(cases[0].landmarks.names), output=tmp_path / "new.scn.pt",
                        config=quick(2, validation_fraction=0.0, checkpoint_every=1), checkpoint=taken)
    assert precious.read_bytes() == kept and notes.read_text() == "mine"
    with pytest.raises(ValueError, match="checkpoint must be another file"):
        train_model(cases, tiny_model(cases[0].landmarks.names), output=tmp_path / "same.scn.pt",
                    config=quick(2, validation_fraction=0.0), checkpoint=tmp_path / "same.scn.pt")
    assert not (tmp_path / "new.scn.pt").exists() and not (tmp_path / "same.scn.pt").exists()

    # An earlier run's checkpoint is a checkpoint: a fresh start may replace it.
    earlier = tmp_path / "earlier.ckpt"
    with pytest.raises(TrainingCancelled):
        train_model(cases, tiny_model(cases[0].landmarks.names), output=tmp_path / "a.scn.pt",
                    config=quick(5, validation_fraction=0.0), checkpoint=earlier, should_cancel=lambda: True)
    assert earlier.exists()
    train_model(cases, tiny_model(cases[0].landmarks.names), output=tmp_path / "b.scn.pt",
                config=quick(2, validation_fraction=0.0), checkpoint=earlier)
    assert (tmp_path / "b.scn.pt").exists() and not earlier.exists()


def test_cancel_keeps_the_previous_model_and_resume_continues(tmp_path):
    cases = synthetic_cases(3)
    model = tiny_model(cases[0].landmarks.names)
    output = tmp_path / "model.scn.pt"
    checkpoint = tmp_path / "model.ckpt"
    calls = {"n": 0}

    def cancel_after_seven() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    with pytest.raises(TrainingCancelled, match="no model file was written"):
        train_model(cases, model, output=output, config=quick(20, validation_fraction=0.0), checkpoint=checkpoint,
                    should_cancel=cancel_after_seven)
    assert not output.exists() and checkpoint.exists()
    resumed = train_model(cases, tiny_model(cases[0].landmarks.names), output=output,
                          config=quick(20, validation_fraction=0.0), checkpoint=checkpoint, resume=True)
    assert resumed.iterations == 20 and output.exists() and not checkpoint.exists()
    assert resumed.history[0]["iteration"] > 7

    # A fine-tune that is cancelled leaves the model it started from byte for byte.
    before = output.read_bytes()
    with pytest.raises(TrainingCancelled):
        train_model(cases, load_model(output), output=tmp_path / "v2.scn.pt", config=quick(20),
                    should_cancel=lambda: True)
    assert output.read_bytes() == before and not (tmp_path / "v2.scn.pt").exists()
    with pytest.raises(FileExistsError):
        train_model(cases, load_model(output), output=output, config=quick(2))


def test_new_landmark_set_gets_new_heads_and_keeps_the_body(tmp_path):
    model = tiny_model(["A", "B", "C"])
    adapted = adapt_to_landmarks(model, ["C", "D"], ["kept", "new"])
    assert adapted.config.num_landmarks == 2 and adapted.landmark_names == ["C", "D"]
    old, new = model.network.state_dict(), adapted.network.state_dict()
    heads = adapted.network.head_parameter_names()
    for key in old:
        if key not in heads:
            torch.testing.assert_close(new[key], old[key])
    torch.testing.assert_close(new["local.heatmap.weight"][0], old["local.heatmap.weight"][2])
    torch.testing.assert_close(new["spatial.hidden.0.conv.weight"][:, 0], old["spatial.hidden.0.conv.weight"][:, 2])
    save_model(adapted, tmp_path / "adapted.scn.pt")
    assert load_model(tmp_path / "adapted.scn.pt").landmark_descriptions == ["kept", "new"]


def test_an_ensemble_global_stage_adapts_every_member_and_fine_tunes(tmp_path):
    from SCNLandmarksLib.models.network import NetworkEnsemble, ensemble_of

    cases = synthetic_cases(2)
    names = list(cases[0].landmarks.names)
    torch.manual_seed(0)
    model = tiny_model([*names, "extra"])
    model.network = ensemble_of([model.network, tiny_model([*names, "extra"]).network])
    adapted = adapt_to_landmarks(model, names)
    assert isinstance(adapted.network, NetworkEnsemble) and adapted.config.num_landmarks == len(names)
    for member, old in zip(adapted.network.members, model.network.members):
        torch.testing.assert_close(member.local.heatmap.weight, old.local.heatmap.weight[: len(names)])
        torch.testing.assert_close(member.spatial.hidden[0].conv.weight, old.spatial.hidden[0].conv.weight[:, : len(names)])
    before = [p.detach().clone() for p in adapted.network.parameters()]
    result = train_model(cases, adapted, output=tmp_path / "m.scn.pt", config=quick(3, validation_fraction=0.0))
    changed = [not torch.equal(a, b) for a, b in zip(before, result.model.network.parameters())]
    half = len(changed) // 2
    assert any(changed[:half]) and any(changed[half:])  # both members learn
    loaded = load_model(tmp_path / "m.scn.pt")
    assert loaded.config.members == 2
    found = Detector(loaded, device="cpu").detect(cases[0].image)
    assert np.isfinite(found.positions).all() and len(found) == len(names)


def test_new_heads_start_from_the_seed_whatever_ran_before():
    from SCNLandmarksLib.learning.refinement_training import attach_refiner

    model = attach_refiner(tiny_model(["A", "B", "C"]), patch_size=32, spacing_mm=0.5, filters=(8, 16, 32))
    torch.manual_seed(1)
    first = adapt_to_landmarks(model, ["C", "D"])
    torch.rand(1000)  # another global random state
    again = adapt_to_landmarks(model, ["C", "D"])
    other = adapt_to_landmarks(model, ["C", "D"], seed=1)
    heads = first.network.head_parameter_names()
    new_head = "local.heatmap.weight"
    assert new_head in heads
    for key, value in first.network.state_dict().items():
        torch.testing.assert_close(again.network.state_dict()[key], value)
    assert not torch.equal(other.network.state_dict()[new_head][1], first.network.state_dict()[new_head][1])
    torch.testing.assert_close(other.network.state_dict()[new_head][0], first.network.state_dict()[new_head][0])
    for key, value in first.refiner.state_dict().items():
        torch.testing.assert_close(again.refiner.state_dict()[key], value)


def test_time_budget_ends_training_successfully(tmp_path):
    cases = synthetic_cases(2)
    result = train_model(cases, tiny_model(cases[0].landmarks.names), output=tmp_path / "m.scn.pt",
                         config=quick(100_000, time_budget_s=1.0, validation_fraction=0.0))
    assert 0 < result.iterations < 100_000 and (tmp_path / "m.scn.pt").exists()


@pytest.mark.parametrize("native", [True, False])
def test_training_computes_in_bfloat16_only_where_the_hardware_does(tmp_path, monkeypatch, native):
    import SCNLandmarksLib.learning.training as training

    monkeypatch.setattr(training, "bfloat16_is_native", lambda device: native)
    cases = synthetic_cases(2)
    model = tiny_model(cases[0].landmarks.names)
    seen: set[torch.dtype] = set()
    first_convolution = next(m for m in model.network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    first_convolution.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    train_model(cases, model, output=tmp_path / "m.scn.pt",
                config=quick(2, validate_every=0, validation_fraction=0.0))
    assert seen == ({torch.bfloat16} if native else {torch.float32})
