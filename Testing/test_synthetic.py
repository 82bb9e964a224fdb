"""Synthetic cases: the landmarks are exactly where the image pattern says, in physical space."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from SCNLandmarksLib.data.synthetic import (
    make_bright_point_image,
    make_geometry,
    make_synthetic_case,
    make_synthetic_dataset,
    rotation_matrix,
    template_configuration,
)

OBLIQUE_3D = {
    "dimension": 3,
    "size": (48, 40, 36),
    "spacing": (1.0, 1.3, 0.8),
    "origin": (12.0, -40.0, 75.0),
    "direction": (0.3, -0.2, 0.6),
}


def _refined_peak(image, point: np.ndarray, radius_mm: float = 3.0) -> np.ndarray:  # noqa: ANN001
    """LPS position of the brightest voxel within ``radius_mm`` of ``point``."""
    geometry = image.geometry
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij"), axis=-1)
    physical = geometry.index_to_physical(grid.reshape(-1, geometry.dimension))
    near = np.linalg.norm(physical - point, axis=1) <= radius_mm
    values = image.array.transpose().reshape(-1)  # x-fastest to match the index grid
    best = np.flatnonzero(near)[np.argmax(values[near])]
    return physical[best]


@pytest.mark.parametrize(
    "options",
    [
        OBLIQUE_3D,
        {"dimension": 2, "size": (80, 64), "spacing": (0.4, 0.6), "origin": (-10.0, 5.0), "direction": 0.4},
    ],
)
def test_each_landmark_sits_on_a_local_intensity_maximum(options: dict) -> None:
    image, landmarks = make_synthetic_case(**options, num_landmarks=6, seed=7, noise=0.0)
    spacing = np.asarray(image.geometry.spacing)
    for position in landmarks.positions:
        peak = _refined_peak(image, position)
        # The brightest voxel is the voxel closest to the blob centre: within half a voxel
        # diagonal (plus a little for the smooth background's slope).
        assert np.linalg.norm(peak - position) <= 0.5 * np.linalg.norm(spacing) + 0.1


def test_landmarks_are_inside_the_grid_and_distinct() -> None:
    image, landmarks = make_synthetic_case(**OBLIQUE_3D, num_landmarks=10, seed=1, jitter_mm=2.0)
    index = image.geometry.physical_to_index(landmarks.positions)
    assert np.all(index >= 0) and np.all(index <= np.asarray(image.geometry.size) - 1)
    distances = np.linalg.norm(landmarks.positions[:, None] - landmarks.positions[None], axis=-1)
    assert distances[np.triu_indices(10, 1)].min() > 3.0


def test_the_blob_is_missing_where_the_geometry_is_ignored() -> None:
    """Reading the pattern in the wrong frame (identity direction) finds no blob there."""
    image, landmarks = make_synthetic_case(**OBLIQUE_3D, num_landmarks=4, seed=3, noise=0.0)
    geometry = image.geometry
    naive = (landmarks.positions - np.asarray(geometry.origin)) / np.asarray(geometry.spacing)
    correct = geometry.physical_to_index(landmarks.positions)
    for wrong, right in zip(naive, correct):
        right_value = ndimage.map_coordinates(image.array, right[::-1, None], order=1)[0]
        wrong_value = ndimage.map_coordinates(image.array, wrong[::-1, None], order=1, cval=0.0)[0]
        assert right_value > wrong_value + 0.3


def test_same_seed_same_case_and_template_is_fixed() -> None:
    a_image, a_landmarks = make_synthetic_case(dimension=2, seed=5)
    b_image, b_landmarks = make_synthetic_case(dimension=2, seed=5)
    c_image, c_landmarks = make_synthetic_case(dimension=2, seed=6)
    np.testing.assert_array_equal(a_image.array, b_image.array)
    np.testing.assert_array_equal(a_landmarks.positions, b_landmarks.positions)
    assert not np.allclose(a_landmarks.positions, c_landmarks.positions)
    np.testing.assert_array_equal(template_configuration(7, 3), template_configuration(7, 3))
    assert a_landmarks.names == ["L1", "L2", "L3", "L4", "L5"]


def test_cases_differ_by_a_similarity_transform_plus_small_jitter() -> None:
    """Without jitter, two cases' configurations are related by rotation, scale and shift."""
    _, a = make_synthetic_case(dimension=2, size=100, num_landmarks=8, seed=1, jitter_mm=0.0)
    _, b = make_synthetic_case(dimension=2, size=100, num_landmarks=8, seed=2, jitter_mm=0.0)
    pa, pb = a.positions - a.positions.mean(0), b.positions - b.positions.mean(0)
    u, s, vt = np.linalg.svd(pb.T @ pa)
    rotation = u @ vt
    scale = s.sum() / (pa**2).sum()
    residual = np.linalg.norm(pb - scale * pa @ rotation.T, axis=1).max()
    assert residual < 1e-6
    assert not np.allclose(pa, pb)


def test_missing_annotations_and_dataset() -> None:
    _, landmarks = make_synthetic_case(dimension=2, num_landmarks=6, num_missing=2, seed=0)
    assert landmarks.missing.sum() == 2
    dataset = make_synthetic_dataset(3, dimension=2, size=32, seed=10)
    assert len(dataset) == 3
    _, expected = make_synthetic_case(dimension=2, size=32, seed=11)
    np.testing.assert_array_equal(dataset[1][1].positions, expected.positions)


def test_3d_case_is_fast() -> None:
    start = time.perf_counter()
    image, _ = make_synthetic_case(dimension=3, size=48, num_landmarks=10, direction=(0.1, 0.2, 0.3))
    assert time.perf_counter() - start < 0.5
    assert image.array.shape == (48, 48, 48) and image.array.dtype == np.float32


def test_bright_point_image_and_geometry_helpers() -> None:
    image = make_bright_point_image((3, 1, 2), size=(5, 4, 3), spacing=2.0, origin=(1.0, 2.0, 3.0))
    assert image.array.shape == (3, 4, 5) and image.array[2, 1, 3] == 1000.0 and image.array.sum() == 1000.0
    with pytest.raises(ValueError, match="outside"):
        make_bright_point_image((5, 0, 0), size=(5, 4, 3))
    geometry = make_geometry(dimension=2, size=10, direction=np.pi / 2)
    np.testing.assert_allclose(geometry.index_to_physical([1.0, 0.0]), [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(rotation_matrix(0.3, 3), rotation_matrix((0.0, 0.0, 0.3), 3))
    matrix = make_geometry(direction=tuple(rotation_matrix((0.1, 0.2, 0.3), 3).reshape(-1))).direction_matrix
    np.testing.assert_allclose(matrix, rotation_matrix((0.1, 0.2, 0.3), 3))
