"""Expected errors and points to check: the shape model, the error model and their use in detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SCNLandmarksLib.data.landmarks import Landmarks
from SCNLandmarksLib.models.quality import ErrorModel, review_order
from SCNLandmarksLib.models.shape_model import ShapeModel, similarity_transform

BASE_SHAPE = np.array([[0, 0], [40, 5], [70, 30], [60, 70], [20, 80], [-10, 50], [30, 40], [50, 15]], dtype=float)


def _shapes(count: int, *, seed: int = 0, noise_mm: float = 0.5, dimension: int = 2) -> np.ndarray:
    """The base shape under random similarity transforms (posed like patients) plus noise, mm."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(-20, 20, len(BASE_SHAPE))[[3, 0, 6, 1, 7, 2, 5, 4], None]
    base = BASE_SHAPE if dimension == 2 else np.concatenate([BASE_SHAPE, depth], 1)
    shapes = []
    for _ in range(count):
        angle = rng.uniform(-0.4, 0.4)
        rotation = np.eye(dimension)
        rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        scale = rng.uniform(0.85, 1.15)
        shift = rng.uniform(-50, 50, dimension)
        shapes.append(scale * (base + rng.normal(0, noise_mm, base.shape)) @ rotation.T + shift)
    return np.stack(shapes)


def test_similarity_transform_recovers_rotation_scale_and_shift() -> None:
    source = BASE_SHAPE
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    target = 1.7 * source @ rotation.T + [5.0, -3.0]
    scale, found, shift = similarity_transform(source, target)
    assert scale == pytest.approx(1.7)
    np.testing.assert_allclose(found, rotation, atol=1e-9)
    np.testing.assert_allclose(shift, [5.0, -3.0], atol=1e-9)


@pytest.mark.parametrize("dimension", [2, 3])
def test_shape_model_places_each_point_from_the_others_whatever_the_pose(dimension: int) -> None:
    model = ShapeModel.fit(_shapes(40, dimension=dimension))
    shape = _shapes(1, seed=99, dimension=dimension)[0]
    deviations = model.deviations(shape)
    assert deviations.shape == (len(BASE_SHAPE),)
    assert deviations.max() < 3.0  # noise 0.5 mm, scaled by up to 1.15
    assert model.spread_mm.max() < 3.0


def test_a_displaced_point_deviates_and_the_others_do_not_follow_it() -> None:
    model = ShapeModel.fit(_shapes(40))
    shape = _shapes(1, seed=7)[0]
    displaced = shape.copy()
    displaced[3] += [12.0, -9.0]  # a global miss of 15 mm
    deviations = model.deviations(displaced) / model.spread_mm
    assert int(np.argmax(deviations)) == 3
    assert deviations[3] > 3 * np.median(deviations)


def test_shape_model_skips_missing_points_and_round_trips() -> None:
    shapes = _shapes(30)
    shapes[0, 2] = np.nan  # a training case without that landmark
    model = ShapeModel.fit(shapes)
    shape = _shapes(1, seed=3)[0]
    shape[5] = np.nan
    deviations = model.deviations(shape)
    assert np.isnan(deviations[5]) and np.isfinite(np.delete(deviations, 5)).all()
    again = ShapeModel.from_dict(model.to_dict())
    np.testing.assert_allclose(again.deviations(shape), deviations)


@pytest.mark.parametrize("dimension", [2, 3])
def test_size_ratio_is_the_scale_of_a_shape_whatever_its_pose(dimension: int) -> None:
    model = ShapeModel.fit(_shapes(40, noise_mm=0.0, dimension=dimension))
    shape = model.mean.copy()
    rotation = np.eye(dimension)
    rotation[:2, :2] = [[np.cos(1.0), -np.sin(1.0)], [np.sin(1.0), np.cos(1.0)]]
    for factor in (0.1, 1.0, 9.5):
        assert model.size_ratio(factor * shape @ rotation.T + 30.0) == pytest.approx(factor)
    partial = 10.0 * shape
    partial[[0, 4]] = np.nan  # the points found are compared with the same points of the mean shape
    assert model.size_ratio(partial) == pytest.approx(10.0)
    partial[2:] = np.nan
    assert np.isnan(model.size_ratio(partial))
    missed = 3.0 * shape
    missed[3] += 100.0  # a miss far out does not make the shape look larger
    assert model.size_ratio(missed) == pytest.approx(3.0)


def test_a_size_far_from_the_training_shapes_names_the_pixel_size() -> None:
    from SCNLandmarksLib.inference.detection import PLAUSIBLE_SIZE_FACTOR, pixel_size_warning

    for plausible in (1.0, 0.8, 1.15, PLAUSIBLE_SIZE_FACTOR, 1 / PLAUSIBLE_SIZE_FACTOR, float("nan")):
        assert pixel_size_warning(plausible, (0.1, 0.1)) is None
    for ratio, words in ((9.9, "9.9 times"), (0.1, "0.1 times")):
        warning = pixel_size_warning(ratio, (1.0, 1.0))
        assert warning is not None and words in warning and "(1 x 1 mm)" in warning and "--spacing" in warning


def test_shape_model_refuses_too_few_shapes() -> None:
    with pytest.raises(ValueError, match="at least 5 shapes"):
        ShapeModel.fit(_shapes(3))


def _validation_signals(images: int = 60, landmarks: int = 8, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Signals and errors where a low local peak and a large shape deviation mean a large error."""
    rng = np.random.default_rng(seed)
    peak = rng.uniform(0.05, 1.0, (images, landmarks))
    deviation = rng.uniform(0.2, 3.0, (images, landmarks))
    confidence = rng.uniform(0.3, 1.0, (images, landmarks))
    log_error = -0.8 * np.log(peak) + 0.6 * np.log(deviation) + np.linspace(-0.5, 0.5, landmarks) + rng.normal(0, 0.3, peak.shape)
    signals = {"local_peak": peak, "shape_deviation": deviation, "global_confidence": confidence}
    return signals, np.exp(log_error) - 0.1 + 0.2


def test_error_model_learns_which_signals_predict_the_error_and_is_calibrated() -> None:
    signals, errors = _validation_signals()
    model = ErrorModel.fit(signals, errors, use=["local_peak", "global_confidence", "shape_deviation"], flag_fraction=0.15)
    assert model.weights[0] < -0.5 and model.weights[2] > 0.3  # peak: lower is worse; deviation: higher is worse
    assert abs(model.weights[1]) < 0.2  # the confidence carries nothing here
    test_signals, test_errors = _validation_signals(seed=1)
    expected = model.expected_errors(test_signals)
    assert expected.mean() == pytest.approx(test_errors.mean(), rel=0.15)
    flagged = expected > model.check_above_mm
    assert 0.08 < flagged.mean() < 0.22
    worst = test_errors > np.quantile(test_errors, 0.9)
    assert flagged[worst].mean() > 0.5  # most of the worst tenth is flagged


def test_a_stronger_models_own_points_set_the_threshold_and_reference() -> None:
    use = ["local_peak", "global_confidence", "shape_deviation"]
    weak, weak_errors = _validation_signals(seed=2)
    model = ErrorModel.fit(weak, weak_errors, use=use, flag_fraction=0.15)
    strong, strong_errors = _validation_signals(images=20, seed=3)
    strong["local_peak"] = np.clip(strong["local_peak"] * 2.0, 0.0, 1.0)  # a stronger model: higher peaks
    strong_errors[0, :3] = np.nan  # points without a reference are left out
    before = model.expected_errors(strong)
    assert (before > model.check_above_mm).mean() < 0.12  # the weak points' threshold flags too few of these
    model.set_reference(strong, strong_errors, flag_fraction=0.2)
    np.testing.assert_allclose(model.expected_errors(strong), before)  # the ranking model is untouched
    scored = np.isfinite(strong_errors)
    assert (before[scored] > model.check_above_mm).mean() == pytest.approx(0.2, abs=0.01)
    assert model.validation_mean_mm == pytest.approx(before[scored].mean())
    with pytest.raises(ValueError, match="No validation point"):
        model.set_reference(strong, np.full_like(strong_errors, np.nan), flag_fraction=0.2)


def test_error_model_round_trips_and_refuses_unknown_signals() -> None:
    signals, errors = _validation_signals()
    model = ErrorModel.fit(signals, errors, use=["local_peak"])
    again = ErrorModel.from_dict(model.to_dict())
    np.testing.assert_allclose(again.expected_errors(signals), model.expected_errors(signals))
    with pytest.raises(ValueError, match="Unknown quality signals"):
        ErrorModel.fit(signals, errors, use=["heart_rate"])
    with pytest.raises(ValueError, match="needs the signals"):
        model.expected_errors({"global_confidence": signals["global_confidence"]})


def _bent_signals(images: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A width that matters only once it is wide: log-error flat below 1 mm, then growing."""
    rng = np.random.default_rng(seed)
    width = np.exp(rng.uniform(np.log(0.2), np.log(5.0), (images, 6)))
    log_width = np.log(width + 0.05)
    log_error = -0.5 + 0.8 * np.maximum(log_width, 0.0) ** 2 + rng.normal(0, 0.2, width.shape)
    return {"local_width_mm": width}, np.exp(log_error) - 0.1


def test_squared_terms_follow_a_bent_effect_and_survive_the_model_file(tmp_path) -> None:
    from engine_fixtures import tiny_model
    from SCNLandmarksLib.models.model_file import load_model, save_model
    from SCNLandmarksLib.common.errors import ModelFileError
    from SCNLandmarksLib.models.model_header import FORMAT_VERSION, check_format

    def format_of(path) -> int:
        return int(torch.load(path, weights_only=True)["format_version"])

    signals, errors = _bent_signals(80, seed=0)
    linear = ErrorModel.fit(signals, errors, use=["local_width_mm"])
    bent = ErrorModel.fit(signals, errors, use=["local_width_mm"], squared=True)
    assert linear.squared_weights is None and bent.squared_weights[0] > 0.4
    test_signals, test_errors = _bent_signals(80, seed=1)

    def log_gap(model: ErrorModel) -> float:
        expected = model.expected_errors(test_signals)
        return float(np.sqrt(np.mean((np.log(expected + 0.1) - np.log(test_errors + 0.1)) ** 2)))

    assert log_gap(bent) < 0.8 * log_gap(linear)
    again = ErrorModel.from_dict(bent.to_dict())
    np.testing.assert_allclose(again.expected_errors(test_signals), bent.expected_errors(test_signals))
    broken = {**bent.to_dict(), "squared_weights": [1.0, 2.0]}
    with pytest.raises(ValueError, match="squared weights"):
        ErrorModel.from_dict(broken)

    model = tiny_model([f"L{i + 1}" for i in range(6)])
    model.error_model = linear
    assert format_of(save_model(model, tmp_path / "linear.scn.pt")) == 2  # older readers still read it
    model.error_model = bent
    path = save_model(model, tmp_path / "bent.scn.pt")
    assert format_of(path) == 3 == FORMAT_VERSION  # a reader of format 2 refuses it instead of ignoring the squares
    loaded = load_model(path).error_model
    np.testing.assert_allclose(loaded.squared_weights, bent.squared_weights)
    with pytest.raises(ModelFileError, match="newer SCNLandmarks"):
        check_format(path, {"format": "scn-landmarks-model", "format_version": FORMAT_VERSION + 1})


def test_review_order_puts_the_image_expected_furthest_off_first() -> None:
    def found(expected: list[float] | None, check: list[bool]) -> Landmarks:
        errors = None if expected is None else np.array(expected)
        return Landmarks(["A", "B"], np.zeros((2, 2)), expected_errors=errors, check=np.array(check))

    order = review_order([("a", found([1.0, 1.0], [False, False])), ("b", found([3.0, np.nan], [True, False])),
                          ("old", found(None, [True, True])), ("c", found([np.nan, np.nan], [False, False]))])
    assert [row[0] for row in order] == ["b", "a", "old", "c"]
    assert order[0][1:] == (pytest.approx(3.0), 1)


def test_detector_gives_each_point_an_expected_error_and_flags_the_doubtful_ones(tmp_path) -> None:
    """Through a real detection: an error model on the global confidence and the shape deviation."""
    from engine_fixtures import synthetic_cases, tiny_model
    from SCNLandmarksLib.inference.detection import Detector
    from SCNLandmarksLib.models.model_file import load_model, save_model

    cases = synthetic_cases(8, num_landmarks=4)
    model = tiny_model([f"L{i + 1}" for i in range(4)])
    model.shape_model = ShapeModel.fit(np.stack([case.landmarks.positions for case in cases]))
    rng = np.random.default_rng(0)
    signals = {"global_confidence": rng.uniform(0.01, 1, (30, 4)), "shape_deviation": rng.uniform(0.1, 5, (30, 4))}
    errors = np.exp(0.8 * np.log(signals["shape_deviation"]) + rng.normal(0, 0.2, (30, 4)))
    model.error_model = ErrorModel.fit(signals, errors, use=["global_confidence", "shape_deviation"])
    model = load_model(save_model(model, tmp_path / "m.scn.pt"))  # both parts survive the model file

    detector = Detector(model, device="cpu")
    found = detector.detect(cases[0].image)
    expected = model.error_model.expected_errors(detector.last_signals)
    np.testing.assert_allclose(found.expected_errors, expected)
    np.testing.assert_array_equal(found.check, expected > model.error_model.check_above_mm)
    strict = Detector(model, device="cpu", check_above_mm=float(expected.min()) - 1e-6).detect(cases[0].image)
    assert strict.check.all()  # a lower threshold flags more: here every point
    model.error_model = None
    legacy = Detector(model, device="cpu", low_confidence=2.0).detect(cases[0].image)
    assert legacy.expected_errors is None and legacy.check.all()  # no error model: low confidence decides
    with pytest.raises(ValueError, match="positive distance"):
        Detector(model, device="cpu", check_above_mm=0.0)


def test_detector_warns_when_the_shape_found_has_an_implausible_size(monkeypatch) -> None:
    """A model whose shapes are 20 times as large as anything the image can hold: the pixel size is
    named; the same detection against shapes like its own points gives no warning; points the
    global stage is unsure of (an image unlike the training ones) give no opinion."""
    from engine_fixtures import synthetic_cases, tiny_model
    from SCNLandmarksLib.inference import detection

    case = synthetic_cases(1, num_landmarks=4)[0]
    model = tiny_model([f"L{i + 1}" for i in range(4)])
    detector = detection.Detector(model, device="cpu")
    found = detector.detect(case.image)
    assert detector.last_warning is None and np.isnan(detector.last_size_ratio)  # no shape model: no opinion
    rng = np.random.default_rng(0)
    like_found = np.stack([found.positions + rng.normal(0, 0.5, found.positions.shape) for _ in range(10)])
    model.shape_model = ShapeModel.fit(20.0 * like_found)
    assert (found.confidences < detection.SIZE_CONFIDENCE).all()  # an untrained network is unsure everywhere
    detector.detect(case.image)
    assert np.isnan(detector.last_size_ratio) and detector.last_warning is None
    # As if it were sure of every point (a trained one is, on its kind of image):
    monkeypatch.setattr(detection, "SIZE_CONFIDENCE", 0.0)
    model.shape_model = ShapeModel.fit(like_found)
    detector.detect(case.image)
    assert detector.last_size_ratio == pytest.approx(1.0, abs=0.05) and detector.last_warning is None
    model.shape_model = ShapeModel.fit(20.0 * like_found)
    detector.detect(case.image)
    assert detector.last_size_ratio == pytest.approx(0.05, rel=0.05)
    assert "pixel size (0.9 x 1.2 mm) is probably wrong" in detector.last_warning


def test_an_error_model_from_very_few_validation_cases_says_so_and_names_them() -> None:
    from engine_fixtures import synthetic_cases, tiny_model
    from SCNLandmarksLib.learning.quality_fitting import fit_point_quality

    cases = synthetic_cases(8, num_landmarks=12)
    model = tiny_model([f"L{i + 1}" for i in range(12)])
    line = fit_point_quality(model, cases[:6], cases[6:], device="cpu")
    assert model.error_model is not None  # 24 points: enough to fit, too few to trust
    assert "learned on 2 validation cases (case06, case07)" in line and "rough" in line and "--validation-ids" in line
