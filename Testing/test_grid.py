"""Network grid <-> physical space, with and without augmentation."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SCNLandmarksLib.imaging.augmentation import AugmentationConfig, random_transform
from SCNLandmarksLib.models.decode import heatmap_maxima
from SCNLandmarksLib.imaging.geometry import ImageGeometry, lps_to_ras
from SCNLandmarksLib.imaging.grid import GridSpec, SamplingTransform, nearest_lps_axes, resample
from SCNLandmarksLib.models.heatmaps import HeatmapTargets


def oblique_geometry(size=(60, 50, 40)) -> ImageGeometry:
    rotation = sitk.VersorTransform((0.3, 0.2, 0.9), 0.35).GetMatrix()
    return ImageGeometry(size=size, spacing=(0.9, 1.3, 2.1), origin=(-35.0, 12.0, 80.0), direction=rotation)


def gaussian_blob(geometry: ImageGeometry, centre_lps: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Image whose intensity is a Gaussian of physical distance to ``centre_lps``."""
    axes = [np.arange(n, dtype=float) for n in geometry.size]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, geometry.dimension)
    distance2 = ((geometry.index_to_physical(index) - centre_lps) ** 2).sum(axis=1)
    values = np.exp(-distance2 / (2 * sigma_mm**2)).reshape(geometry.size)
    return values.transpose(*reversed(range(geometry.dimension)))  # to z, y, x


def test_grid_axes_follow_the_image_closest_to_lps():
    flipped = np.diag([-1.0, -1.0, 1.0])[:, [1, 0, 2]]  # y stored first, both in-plane axes flipped
    axes, rotation = nearest_lps_axes(flipped)
    np.testing.assert_array_equal(axes, [1, 0, 2])
    np.testing.assert_allclose(rotation, np.eye(3))


def test_resampled_blob_peak_maps_back_to_its_physical_position():
    geometry = oblique_geometry()
    centre = geometry.index_to_physical([31.3, 22.6, 17.2])
    array = gaussian_blob(geometry, centre, sigma_mm=4.0)
    transform = SamplingTransform.for_image(geometry, GridSpec(size=(48, 48, 48), spacing=(1.5, 1.5, 1.5)))
    sampled = resample(array, geometry, transform, fill=0.0)
    position, _ = heatmap_maxima(sampled[None])
    found = transform.grid_to_physical(position)[0]
    # Within 0.1 grid voxel of the truth (1.5 mm voxels), in LPS and, through Slicer's IJK-to-RAS, in RAS.
    assert np.linalg.norm(found - centre) < 0.15
    ras_truth = (geometry.ijk_to_ras_matrix @ np.array([31.3, 22.6, 17.2, 1.0]))[:3]
    assert np.linalg.norm(lps_to_ras(found) - ras_truth) < 0.15


def test_augmented_transform_inverts_landmarks_within_a_hundredth_of_a_voxel():
    geometry = oblique_geometry()
    base = SamplingTransform.for_image(geometry, GridSpec(size=(32, 32, 32)))
    rng = np.random.default_rng(3)
    for _ in range(5):
        transform = random_transform(base, AugmentationConfig(), rng)
        grid_points = rng.uniform(0, 31, size=(20, 3))
        physical = transform.grid_to_physical(grid_points)
        np.testing.assert_allclose(transform.physical_to_grid(physical), grid_points, atol=0.01)
    assert np.isnan(base.physical_to_grid([[np.nan] * 3])).all()


def test_augmentation_moves_image_and_landmark_together():
    geometry = ImageGeometry(size=(80, 70), spacing=(0.7, 1.1), origin=(5.0, -9.0), direction=(0.96, -0.28, 0.28, 0.96))
    centre = geometry.index_to_physical([47.0, 30.5])
    array = gaussian_blob(geometry, centre, sigma_mm=3.0)
    base = SamplingTransform.for_image(geometry, GridSpec(size=(64, 64)))
    rng = np.random.default_rng(11)
    for _ in range(5):
        transform = random_transform(base, AugmentationConfig(), rng)
        sampled = resample(array, geometry, transform, fill=0.0)
        peak, _ = heatmap_maxima(sampled[None])
        expected = transform.physical_to_grid(centre[None])[0]
        assert np.linalg.norm(peak[0] - expected) < 0.35


def test_fit_to_size_keeps_aspect_ratio_and_covers_the_image():
    geometry = ImageGeometry(size=(1935, 2400), spacing=(0.1, 0.1), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    transform = SamplingTransform.for_image(geometry, GridSpec(size=(512, 512)))
    np.testing.assert_allclose(transform.spacing, [240.0 / 512] * 2)
    corners = transform.physical_to_grid(geometry.index_to_physical([[0, 0], [1934, 2399]]))
    assert (corners >= -0.5).all() and (corners <= 511.5).all()


def test_targets_peak_at_landmark_with_normalised_height_and_sigma_gets_gradient():
    targets = HeatmapTargets(2, 2, initial_sigma=2.5, gamma=100.0)
    positions = torch.tensor([[[10.3, 20.0], [float("nan"), float("nan")]]])
    maps = targets(positions, (32, 40))
    assert maps.shape == (1, 2, 32, 40)
    found, values = heatmap_maxima(maps[0, :1])
    np.testing.assert_allclose(found[0], [10.3, 20.0], atol=0.05)
    assert values[0] == pytest.approx(100.0 / (np.sqrt(2 * np.pi) * 2.5) ** 2, rel=0.02)
    assert float(maps[0, 1].abs().max()) == 0.0
    maps.sum().backward()
    assert targets.sigmas.grad is not None and targets.sigmas.grad[0] != 0
