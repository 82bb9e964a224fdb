"""The two-stage model: crop targets, the local stage learning, model files, any orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import synthetic_cases, tiny_model
from SCNLandmarksLib.inference.detection import AS_IS, Detector, ImageReading
from SCNLandmarksLib.common.errors import ModelFileError, TrainingCancelled
from SCNLandmarksLib.inference.evaluation import point_errors
from SCNLandmarksLib.imaging.grid import GridSpec
from SCNLandmarksLib.imaging.image import Image
from SCNLandmarksLib.imaging.image_io import read_image
from SCNLandmarksLib.data.landmarks import Landmarks
from SCNLandmarksLib.models.model_file import load_model, read_model_description, save_model
from SCNLandmarksLib.models.refinement import RefinerConfig, crop_target
from SCNLandmarksLib.learning.refinement_training import RefinerTrainingConfig, attach_refiner, train_refiner
from SCNLandmarksLib.learning.training import TrainingConfig, train_model

REPOSITORY = Path(__file__).resolve().parents[1]
REFINER = {"patch_size": 32, "spacing_mm": 0.5, "filters": (8, 16, 32), "target_sigma_mm": 1.0}


def mean_error(detector: Detector, cases) -> float:
    return float(np.nanmean(np.concatenate([point_errors(detector.detect(c.image), c.landmarks) for c in cases])))


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """A tiny global SCN trained on oblique, anisotropic synthetic cases, then its local stage."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("two_stage")
    cases = synthetic_cases(14)
    train, test = cases[:10], cases[10:]
    model = tiny_model(train[0].landmarks.names)
    config = TrainingConfig(iterations=300, learning_rate=1e-3, device="cpu", validate_every=100)
    train_model(train, model, output=folder / "global.scn.pt", config=config)
    model = attach_refiner(load_model(folder / "global.scn.pt"), **REFINER)
    refiner_config = RefinerTrainingConfig(iterations=200, batch_size=16, device="cpu", validate_every=100, offset_mm=2.0)
    result = train_refiner(train, model, output=folder / "two_stage.scn.pt", config=refiner_config)
    return {"folder": folder, "train": train, "test": test, "result": result}


def test_crop_target_is_a_distribution_peaking_at_the_subpixel_position():
    config = RefinerConfig(dimension=2, num_landmarks=1, patch_size=32, spacing_mm=0.5, filters=(4, 8), target_sigma_mm=1.0)
    position = torch.tensor([[10.3, 20.7]])  # x, y crop index
    target = crop_target(position, config)[0]
    assert target.shape == (32, 32)
    assert float(target.sum()) == pytest.approx(1.0, abs=1e-5)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    assert float((target * xs).sum()) == pytest.approx(10.3, abs=1e-3)
    assert float((target * ys).sum()) == pytest.approx(20.7, abs=1e-3)
    config3 = RefinerConfig(dimension=3, num_landmarks=1, patch_size=16, spacing_mm=1.0, filters=(4, 8), target_sigma_mm=1.5)
    target3 = crop_target(torch.tensor([[3.0, 8.0, 12.0]]), config3)[0]
    assert target3.shape == (16, 16, 16)
    assert tuple(int(i) for i in np.unravel_index(int(target3.argmax()), target3.shape)) == (12, 8, 3)  # z, y, x


def test_distribution_width_is_the_rms_distance_from_the_maximum_in_mm():
    from SCNLandmarksLib.models.refinement import distribution_widths_mm

    # 2D, (K, y, x) arrays, maxima and spacing in x, y order, anisotropic pixels.
    flat = np.zeros((3, 9, 11))
    flat[0, 4, 5] = 1.0  # all mass at the maximum
    flat[1, 4, 5] = flat[1, 4, 9] = 0.5  # half of it 4 pixels along x (0.3 mm each)
    flat[2, 4, 5] = flat[2, 8, 5] = 0.5  # half of it 4 pixels along y (0.5 mm each)
    maxima = np.array([[5.0, 4.0]] * 3)
    np.testing.assert_allclose(distribution_widths_mm(flat, maxima, np.array([0.3, 0.5])),
                               [0.0, np.sqrt(0.5) * 1.2, np.sqrt(0.5) * 2.0])
    # 3D, (K, z, y, x) arrays: a mass 3 voxels away along x, the maximum in x, y, z order.
    volume = np.zeros((1, 5, 6, 7))
    volume[0, 2, 3, 6] = 1.0
    np.testing.assert_allclose(distribution_widths_mm(volume, np.array([[3.0, 3.0, 2.0]]), np.array([1.0, 2.0, 3.0])), [3.0])
    # Any 3D distribution, a sub-voxel maximum: the distance summed voxel by voxel.
    rng = np.random.default_rng(0)
    spread = rng.random((4, 6, 7, 8))
    spread /= spread.sum(axis=(1, 2, 3), keepdims=True)
    maxima, spacing = rng.uniform(0, 5, (4, 3)), np.array([0.3, 0.7, 1.1])
    z, y, x = np.indices(spread.shape[1:])
    by_voxel = [np.sqrt((spread[k] * sum(((c - maxima[k, a]) * spacing[a]) ** 2 for a, c in enumerate((x, y, z)))).sum())
                for k in range(4)]
    np.testing.assert_allclose(distribution_widths_mm(spread, maxima, spacing), by_voxel)


def test_refiner_settings_are_checked():
    with pytest.raises(ValueError, match="multiple of 4"):
        RefinerConfig(dimension=2, num_landmarks=3, patch_size=30, filters=(8, 16, 32))
    with pytest.raises(ValueError, match="does not fit"):
        attach_refiner(tiny_model(["a", "b"]), RefinerConfig(dimension=2, num_landmarks=3, patch_size=32, filters=(8, 16)))


@pytest.mark.slow
def test_local_stage_makes_held_out_points_more_accurate(two_stage):
    model = load_model(two_stage["result"].output)
    global_only = mean_error(Detector(model, device="cpu", refine=False), two_stage["test"])
    refined = mean_error(Detector(model, device="cpu"), two_stage["test"])
    history = two_stage["result"].history
    # The untrained local stage is trusted nowhere (no peak), so validation starts at the global stage's error.
    assert history[0]["iteration"] == 0 and history[0]["validation_mre_mm"] < 1.0
    assert refined < 0.75 * global_only, f"refined {refined:.3f} mm vs global only {global_only:.3f} mm"
    assert refined < 0.3


@pytest.mark.slow
def test_two_stage_file_round_trips_in_half_precision_and_old_files_still_load(two_stage, tmp_path):
    model = load_model(two_stage["result"].output)
    description = read_model_description(two_stage["result"].output)
    assert description["refiner"]["patch_size"] == 32 and description["refiner"]["filters"] == [8, 16, 32]
    assert "refiner_training" in description["info"]
    half = save_model(model, tmp_path / "half.scn.pt", half_precision=True)
    image = two_stage["test"][0].image
    # float32 detection, so that only the file's precision differs (bfloat16 rounds both anyway).
    full_points = Detector(model, device="cpu", bfloat16=False).detect(image).positions
    half_points = Detector(half, device="cpu", bfloat16=False).detect(image).positions
    np.testing.assert_allclose(half_points, full_points, atol=0.05)
    global_only = load_model(two_stage["folder"] / "global.scn.pt")
    assert global_only.refiner is None
    assert Detector(global_only, device="cpu").detect(image).positions.shape == (4, 2)


@pytest.mark.slow
def test_refinement_weights_without_their_description_are_refused(two_stage, tmp_path):
    payload = torch.load(two_stage["result"].output, weights_only=True)
    description = read_model_description(two_stage["result"].output).to_dict()  # the JSON, to tamper with
    description["refiner"] = None
    payload["description"] = __import__("json").dumps(description)
    # A consistent file (its description checksum recomputed) that still does not add up.
    payload["description_sha256"] = __import__("hashlib").sha256(payload["description"].encode()).hexdigest()
    torch.save(payload, tmp_path / "tampered.scn.pt")
    with pytest.raises(ModelFileError, match="refinement weights"):
        load_model(tmp_path / "tampered.scn.pt")


def mirrored(image: Image, landmarks: Landmarks) -> tuple[Image, Landmarks]:
    """The image flipped along its own x index axis (a left-facing radiograph), and its points."""
    geometry = image.geometry
    index = geometry.physical_to_index(landmarks.positions)
    index[:, 0] = geometry.size[0] - 1 - index[:, 0]
    flipped = Image(np.ascontiguousarray(image.array[:, ::-1]), geometry)
    return flipped, Landmarks(landmarks.names, geometry.index_to_physical(index))


@pytest.mark.slow
def test_a_mirrored_or_inverted_reading_maps_points_back_into_the_image_frame(two_stage):
    usual_detector = Detector(two_stage["result"].output, device="cpu", readings=AS_IS)
    for case in two_stage["test"]:
        usual_error = point_errors(usual_detector.detect(case.image), case.landmarks)
        image, truth = mirrored(case.image, case.landmarks)
        negative = Image(image.array.max() + image.array.min() - image.array, image.geometry)
        for variant, reading in ((image, ImageReading(mirrored=True)), (negative, ImageReading(True, True))):
            found = Detector(usual_detector.model, device="cpu", readings=[reading]).detect(variant)
            np.testing.assert_allclose(point_errors(found, truth), usual_error, atol=0.05)
    image, truth = mirrored(two_stage["test"][0].image, two_stage["test"][0].landmarks)
    assert np.nanmean(point_errors(usual_detector.detect(image), truth)) > 1.0


def test_the_bundled_model_finds_the_reading_of_a_left_facing_or_negative_radiograph():
    """The bundled sample cephalogram as it is, mirrored and inverted: the same points, in each image's frame."""
    sample = sorted((REPOSITORY / "SCNLandmarks" / "Resources" / "Sample").glob("*.jpg"))
    models = REPOSITORY / "SCNLandmarks" / "Resources" / "Models" / "cephalometric_isbi2015.scn.pt"
    if not sample or not models.exists():
        pytest.skip("no bundled sample image or model")
    image = read_image(sample[0], spacing=(0.1, 0.1))
    detector = Detector(models, device="cpu")
    usual = detector.detect(image)
    assert detector.last_reading == ImageReading()
    flipped, expected = mirrored(image, usual)
    negative = Image(flipped.array.max() + flipped.array.min() - flipped.array, flipped.geometry)
    for variant, reading in ((flipped, ImageReading(mirrored=True)), (negative, ImageReading(True, True))):
        found = detector.detect(variant)
        assert detector.last_reading == reading
        errors = point_errors(found, expected)
        # Resampling the mirrored image differs in the last bits; where one local member holds
        # two nearly equal peaks (porion on this image: 2.3 mm apart), that can tip it. A wrong
        # reading or frame would put points tens of millimetres off.
        assert float(np.median(errors)) < 0.1 and float(np.max(errors)) < 2.5


def test_cancelled_local_stage_training_writes_no_model_and_resumes(tmp_path):
    cases = synthetic_cases(5)
    model = attach_refiner(tiny_model(cases[0].landmarks.names), **REFINER)
    config = RefinerTrainingConfig(iterations=6, batch_size=4, device="cpu", validate_every=0)
    calls = iter(range(100))
    with pytest.raises(TrainingCancelled):
        train_refiner(cases, model, output=tmp_path / "m.scn.pt", config=config, checkpoint=tmp_path / "c.pt",
                      should_cancel=lambda: next(calls) >= 3)
    assert not (tmp_path / "m.scn.pt").exists() and (tmp_path / "c.pt").exists()
    result = train_refiner(cases, model, output=tmp_path / "m.scn.pt", config=config, checkpoint=tmp_path / "c.pt", resume=True)
    assert result.iterations == 6 and result.output.exists() and not (tmp_path / "c.pt").exists()
    other = attach_refiner(tiny_model(cases[0].landmarks.names), **{**REFINER, "patch_size": 64})
    with pytest.raises(TrainingCancelled):
        train_refiner(cases, other, output=tmp_path / "n.scn.pt", config=config, checkpoint=tmp_path / "d.pt",
                      should_cancel=lambda: True)
    with pytest.raises(ValueError, match="another training"):
        train_refiner(cases, model, output=tmp_path / "o.scn.pt", config=config, checkpoint=tmp_path / "d.pt", resume=True)


def test_a_local_stage_that_sees_nothing_it_knows_keeps_the_global_estimate():
    import dataclasses

    from SCNLandmarksLib.imaging.intensity import IntensityConfig
    from SCNLandmarksLib.models.refinement import RefinementNetwork, prepare_for_refiner, refine_positions

    case = synthetic_cases(1)[0]
    config = RefinerConfig(dimension=2, num_landmarks=4, **REFINER)
    network = RefinementNetwork(config).eval()
    torch.nn.init.zeros_(network.head.weight)  # a flat distribution: no peak anywhere
    torch.nn.init.zeros_(network.head.bias)
    prepared = prepare_for_refiner(case.image, config, IntensityConfig())
    estimates = case.landmarks.positions + 1.0
    kept, peaks, _, widths = refine_positions(network, prepared, estimates, device=torch.device("cpu"))
    np.testing.assert_array_equal(kept, estimates)
    assert np.allclose(peaks, 1.0 / config.patch_size**2)
    assert np.all(widths > 0.3 * config.patch_size * config.spacing_mm)  # spread over the whole crop
    network.config = dataclasses.replace(config, min_peak_fraction=0.0)
    moved = refine_positions(network, prepared, estimates, device=torch.device("cpu")).positions
    assert np.all(np.linalg.norm(moved - estimates, axis=1) > 1.0)  # trusted blindly, it jumps to a corner


def test_a_local_stage_never_trusted_leaves_the_global_points_and_still_reports_its_peaks(two_stage, tmp_path):
    import dataclasses
    import math

    from SCNLandmarksLib.models.model_file import save_model

    model = load_model(two_stage["result"].output)
    model.refiner.config = dataclasses.replace(model.refiner.config, min_peak_fraction=math.inf)
    reloaded = load_model(save_model(model, tmp_path / "global-points.scn.pt"))  # what a fine-tune may write
    assert reloaded.refiner.config.min_peak_fraction == math.inf
    image = two_stage["test"][0].image
    detector = Detector(reloaded, device="cpu")
    found = detector.detect(image).positions
    np.testing.assert_allclose(found, Detector(reloaded, device="cpu", refine=False).detect(image).positions, atol=1e-9)
    assert np.isfinite(detector.last_signals["local_peak"]).all()  # the expected error still has its signals
    assert (detector.last_signals["local_width_mm"] > 0).all()
    trusting = Detector(load_model(two_stage["result"].output), device="cpu").detect(image).positions
    assert np.abs(trusting - found).max() > 1e-3  # as trained, the local stage moves the points


def test_a_refined_point_moves_the_given_share_back_toward_the_global_point(two_stage):
    model = load_model(two_stage["result"].output)
    image = two_stage["test"][0].image
    unblended = Detector(model, device="cpu", global_weight=0.0, shape_choice=False)
    local = unblended.detect(image).positions
    coarse = unblended.last_global_positions
    np.testing.assert_allclose(coarse, Detector(model, device="cpu", refine=False).detect(image).positions, atol=1e-9)
    assert np.linalg.norm(local - coarse, axis=1).max() > 0.05  # the stages disagree, so the blend shows
    blended = Detector(model, device="cpu", global_weight=0.25, shape_choice=False).detect(image).positions
    np.testing.assert_allclose(blended, local + 0.25 * (coarse - local), atol=1e-6)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Detector(model, device="cpu", global_weight=1.5)


def test_blending_keeps_the_local_point_where_either_point_is_missing():
    from SCNLandmarksLib.inference.detection import toward_global

    local = np.array([[10.0, 20.0], [np.nan, np.nan], [5.0, 5.0]])
    coarse = np.array([[20.0, 0.0], [1.0, 1.0], [np.nan, np.nan]])
    np.testing.assert_allclose(toward_global(local, coarse, 0.1), [[11.0, 18.0], [np.nan, np.nan], [5.0, 5.0]])


def test_an_ensemble_places_each_point_at_the_mean_of_its_trusted_members(two_stage, tmp_path):
    import copy
    import dataclasses

    from SCNLandmarksLib.models.refinement import RefinementEnsemble, prepare_for_refiner, refine_positions

    model = load_model(two_stage["result"].output)
    first = model.refiner.eval()
    second = copy.deepcopy(first)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in second.parameters():  # another member: other weights, other points
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    ensemble = RefinementEnsemble(dataclasses.replace(first.config, members=2)).eval()
    ensemble.members[0].load_state_dict(first.state_dict())
    ensemble.members[1].load_state_dict(second.state_dict())
    case = two_stage["test"][0]
    prepared = prepare_for_refiner(case.image, first.config, model.intensity)
    estimates = case.landmarks.positions + np.array([1.5, -1.0])
    cpu = torch.device("cpu")
    alone = [refine_positions(member, prepared, estimates, device=cpu) for member in (first, second)]
    together, peaks, spread, widths = refine_positions(ensemble, prepared, estimates, device=cpu)
    assert np.abs(alone[0][0] - alone[1][0]).max() > 0.01  # the members disagree somewhere
    assert min(alone[0][1].min(), alone[1][1].min()) > first.config.min_peak_fraction * first.config.target_peak
    np.testing.assert_allclose(together, (alone[0][0] + alone[1][0]) / 2, atol=1e-6)
    np.testing.assert_allclose(peaks, (alone[0][1] + alone[1][1]) / 2, rtol=1e-5)
    np.testing.assert_allclose(spread, np.linalg.norm(alone[0][0] - alone[1][0], axis=1) / 2, atol=1e-6)
    assert np.all(alone[0].member_spread_mm == 0)
    np.testing.assert_allclose(widths, (alone[0].widths_mm + alone[1].widths_mm) / 2, rtol=1e-5)

    with torch.no_grad():  # where one member sees no peak, the global estimate is kept
        ensemble.members[1].head.weight.zero_()
        ensemble.members[1].head.bias.zero_()
    kept = refine_positions(ensemble, prepared, estimates, device=cpu)
    np.testing.assert_array_equal(kept.positions, estimates)
    assert np.isfinite(kept.member_spread_mm).all()  # the disagreement is known, though unused
    # A member that sees nothing spreads its distribution over the whole crop: the width says so.
    assert (kept.widths_mm > widths + 3.0).all()

    model.refiner = ensemble
    saved = load_model(save_model(model, tmp_path / "ensemble.scn.pt"))
    assert isinstance(saved.refiner, RefinementEnsemble) and read_model_description(tmp_path / "ensemble.scn.pt")["refiner"]["members"] == 2
    np.testing.assert_allclose(Detector(saved, device="cpu").detect(case.image).positions,
                               Detector(model, device="cpu").detect(case.image).positions, atol=1e-5)

    before = [member.head.weight.detach().clone() for member in ensemble.members]
    settings = RefinerTrainingConfig(iterations=2, batch_size=4, device="cpu", validate_every=0, learning_rate=1e-2)
    tuned = load_model(train_refiner(two_stage["train"][:2], saved, output=tmp_path / "tuned.scn.pt", config=settings).output)
    assert all(not torch.equal(b, m.head.weight) for b, m in zip(before, tuned.refiner.members))  # each member learns


@pytest.mark.parametrize("native", [True, False])
def test_local_stage_trains_in_bfloat16_only_where_the_hardware_computes_it(tmp_path, monkeypatch, native):
    import SCNLandmarksLib.learning.refinement_training as refinement_training

    monkeypatch.setattr(refinement_training, "bfloat16_is_native", lambda device: native)
    cases = synthetic_cases(2)
    model = attach_refiner(tiny_model(cases[0].landmarks.names), **REFINER)
    seen: set[torch.dtype] = set()
    first_convolution = next(m for m in model.refiner.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    first_convolution.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    config = RefinerTrainingConfig(iterations=2, batch_size=4, device="cpu", validate_every=0, validation_fraction=0.0)
    train_refiner(cases, model, output=tmp_path / "m.scn.pt", config=config)
    assert seen == ({torch.bfloat16} if native else {torch.float32})


def test_crops_go_through_the_local_stage_in_chunks_with_the_same_result(two_stage, monkeypatch):
    """A 3D stage with many landmarks must not hold every crop's logits at once; chunks change nothing."""
    import copy

    from SCNLandmarksLib.models import refinement
    from SCNLandmarksLib.models.refinement import RefinementEnsemble, prepare_for_refiner, refine_positions

    model = load_model(two_stage["result"].output)
    single = model.refiner.eval()
    ensemble = RefinementEnsemble(refinement.replace(single.config, members=2)).eval()
    for member in ensemble.members:
        member.load_state_dict(copy.deepcopy(single.state_dict()))
    case = two_stage["test"][0]
    prepared = prepare_for_refiner(case.image, single.config, model.intensity)
    estimates = case.landmarks.positions + np.array([1.0, -0.5])
    estimates[1] = np.nan  # a missing point stays missing and out of the chunks
    cpu = torch.device("cpu")
    whole = [refine_positions(network, prepared, estimates, device=cpu) for network in (single, ensemble)]
    assert single.config.crops_at_once >= len(estimates)  # 2D crops: all in one chunk, as before
    monkeypatch.setattr(refinement, "CROP_VOXELS_AT_ONCE", 2 * single.config.patch_size**2)
    assert single.config.crops_at_once == 2  # one crop at a time for the ensemble of two
    for network, reference in zip((single, ensemble), whole):
        chunked = refine_positions(network, prepared, estimates, device=cpu)
        for got, expected in zip(chunked, reference):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert np.isnan(chunked.positions[1]).all()


def test_3d_crops_default_to_a_size_and_a_batch_that_fit_in_memory(tmp_path):
    assert RefinerConfig(dimension=2, num_landmarks=3).patch_size == 128
    assert RefinerConfig(dimension=3, num_landmarks=3).patch_size == 64
    assert RefinerConfig(dimension=2, num_landmarks=3).crops_at_once == 128
    assert RefinerConfig(dimension=3, num_landmarks=3).crops_at_once == 8
    assert RefinerConfig(dimension=3, num_landmarks=3, patch_size=128).crops_at_once == 1
    assert RefinerConfig.from_dict(RefinerConfig(dimension=3, num_landmarks=3).to_dict()).patch_size == 64

    cases = synthetic_cases(3, dimension=3, size=(24, 20, 16), spacing=(2.0, 2.2, 2.5), origin=(-10.0, 4.0, 30.0),
                            direction=(0.1, -0.2, 0.3))
    model = attach_refiner(tiny_model(cases[0].landmarks.names, dimension=3, grid=GridSpec(size=(32, 32, 32))),
                           filters=(4, 8), spacing_mm=1.0, patch_size=128, target_sigma_mm=2.0)
    settings = RefinerTrainingConfig(iterations=1, device="cpu", validate_every=0, validation_fraction=0.0)
    result = train_refiner(cases, model, output=tmp_path / "m.scn.pt", config=settings)
    assert result.model.info["refiner_training"]["config"]["batch_size"] == 1  # one 128-voxel 3D crop per step
    assert settings.batch_size is None  # the caller's settings are left as they were
