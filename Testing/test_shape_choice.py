"""The shape model replaces an implausible point by another peak of its global heatmap that fits the others."""

import numpy as np
import pytest

from engine_fixtures import synthetic_cases, tiny_model
from SCNLandmarksLib.inference import detection
from SCNLandmarksLib.inference.shape_choice import heatmap_candidates, replace_implausible_points
from SCNLandmarksLib.models.shape_model import ShapeModel

ANGLES = np.linspace(0.0, 2.0 * np.pi, 12, endpoint=False)
OUTLINE = np.stack([60.0 * np.cos(ANGLES), 40.0 * np.sin(ANGLES)], axis=1)  # 12 points on an ellipse, LPS mm


def outline_shapes(count: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([OUTLINE + rng.normal(0.0, 1.0, OUTLINE.shape) + rng.normal(0.0, 10.0, 2) for _ in range(count)])


def test_candidates_are_the_other_maxima_highest_first_in_x_y_z_order() -> None:
    heatmap = np.zeros((30, 40))  # y, x
    for (x, y), value in (((5, 6), 1.0), ((30, 20), 0.5), ((12, 25), 0.3), ((35, 3), 0.1)):
        heatmap[y, x] = value
    index, values = heatmap_candidates(heatmap, ratio=0.2)
    np.testing.assert_array_equal(index, [[30, 20], [12, 25]])  # not the highest, not below a fifth of it
    np.testing.assert_allclose(values, [0.5, 0.3])
    assert len(heatmap_candidates(heatmap, ratio=0.05, count=1)[0]) == 1
    volume = np.zeros((10, 12, 14))  # z, y, x
    volume[2, 3, 4], volume[7, 8, 9] = 1.0, 0.6
    np.testing.assert_array_equal(heatmap_candidates(volume)[0], [[9, 8, 7]])
    assert heatmap_candidates(np.zeros((8, 8)))[0].shape == (0, 2)


def test_an_implausible_point_takes_the_candidate_the_shape_model_prefers() -> None:
    shape = ShapeModel.fit(outline_shapes())
    truth = OUTLINE + 5.0
    detected = truth.copy()
    detected[2] = (90.0, 5.0)  # landmark 3 on a look-alike 40 mm from where the others place it
    asked: list[int] = []

    def propose(channel: int) -> np.ndarray:
        asked.append(channel)
        # Better than the point: 20 mm off, and 0.5 mm off (the best); worse: far off; unknown: NaN.
        return np.array([truth[channel] + 20.0, [-50.0, 60.0], [np.nan, np.nan], truth[channel] + 0.5])

    positions, chosen = replace_implausible_points(detected, shape, propose)
    assert chosen == {2: 3} and asked == [2]
    np.testing.assert_allclose(positions[2], truth[2] + 0.5)
    np.testing.assert_array_equal(np.delete(positions, 2, axis=0), np.delete(detected, 2, axis=0))

    # No better candidate: the point stays and the search stops.
    kept, none = replace_implausible_points(detected, shape, lambda channel: np.array([[200.0, 200.0]]))
    assert none == {} and np.array_equal(kept, detected)
    # Plausible points are never questioned.
    untouched, nothing = replace_implausible_points(truth, shape, lambda channel: pytest.fail("asked for candidates"))
    assert nothing == {} and np.array_equal(untouched, truth)


def test_the_detector_takes_the_chosen_candidates_point_signals_and_confidence(monkeypatch) -> None:
    from SCNLandmarksLib.learning.refinement_training import attach_refiner

    cases = synthetic_cases(8, num_landmarks=4)
    model = attach_refiner(tiny_model([f"L{i + 1}" for i in range(4)]), patch_size=16, spacing_mm=1.0, filters=(4, 8),
                           target_sigma_mm=1.0)
    model.shape_model = ShapeModel.fit(np.stack([case.landmarks.positions for case in cases]))
    image = cases[0].image
    plain = detection.Detector(model, device="cpu", readings=detection.AS_IS, shape_choice=False)
    before = plain.detect(image)
    heatmaps, grid = plain.heatmaps(image)
    corner = np.array([[3.0, 4.0]])  # a grid index far from every landmark
    peak = float(model.targets.peak_values().detach()[1])
    monkeypatch.setattr(detection, "heatmap_candidates", lambda heatmap: (corner, np.array([0.4 * peak])))

    def choose_for_landmark_2(positions, shape_model, propose):  # the shape model's verdict, fixed
        moved = positions.copy()
        moved[1] = propose(1)[0]
        return moved, {1: 0}

    monkeypatch.setattr(detection, "replace_implausible_points", choose_for_landmark_2)
    chooser = detection.Detector(model, device="cpu", readings=detection.AS_IS)
    after = chooser.detect(image)
    alone = np.full((4, 2), np.nan)
    alone[1] = grid.grid_to_physical(corner)[0]
    with chooser._precision():
        own = detection.refine_positions(model.refiner, detection.prepare_for_refiner(image, model.refiner.config, model.intensity),
                                         alone, device=chooser.device)
    np.testing.assert_allclose(after.positions[1], own.positions[1])
    assert after.confidences[1] == pytest.approx(0.4)
    assert chooser.last_signals["local_width_mm"][1] == pytest.approx(own.widths_mm[1])
    assert chooser.last_signals["local_peak"][1] == pytest.approx(own.peaks[1] / model.refiner.config.target_peak)
    assert chooser.last_signals["global_confidence"][1] == pytest.approx(0.4)
    keep = [0, 2, 3]
    np.testing.assert_allclose(after.positions[keep], before.positions[keep])
    np.testing.assert_allclose(after.confidences[keep], before.confidences[keep])
    assert not detection.Detector(model, device="cpu", refine=False).shape_choice  # needs the local stage
