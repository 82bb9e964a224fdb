"""Frames: index <-> LPS <-> RAS on oblique, anisotropic volumes with a non-zero origin."""

import numpy as np
import pytest
import SimpleITK as sitk

from SCNLandmarksLib.imaging.geometry import ImageGeometry, lps_to_ras, ras_to_lps


def oblique_geometry() -> ImageGeometry:
    rotation = sitk.VersorTransform((0.2, -0.5, 0.8), 0.4).GetMatrix()  # oblique about a tilted axis
    return ImageGeometry(size=(40, 30, 20), spacing=(0.5, 0.8, 1.7), origin=(10.0, -20.0, 30.0), direction=rotation)


def test_index_to_physical_matches_simpleitk_on_oblique_volume():
    geometry = oblique_geometry()
    image = sitk.Image(geometry.size, sitk.sitkFloat32)
    geometry.apply_to_sitk(image)
    index = np.array([[3.25, 7.5, 11.0], [0.0, 0.0, 0.0], [39.0, 29.0, 19.0]])
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in index])
    np.testing.assert_allclose(geometry.index_to_physical(index), expected, atol=1e-9)
    np.testing.assert_allclose(geometry.physical_to_index(expected), index, atol=1e-9)


def test_ijk_to_ras_is_lps_flipped_and_round_trips():
    geometry = oblique_geometry()
    index = np.array([5.0, 6.0, 7.0])
    ras = (geometry.ijk_to_ras_matrix @ np.append(index, 1.0))[:3]
    np.testing.assert_allclose(ras, lps_to_ras(geometry.index_to_physical(index)), atol=1e-9)
    rebuilt = ImageGeometry.from_ijk_to_ras(geometry.size, geometry.ijk_to_ras_matrix)
    np.testing.assert_allclose(rebuilt.spacing, geometry.spacing, atol=1e-9)
    np.testing.assert_allclose(rebuilt.origin, geometry.origin, atol=1e-9)
    np.testing.assert_allclose(rebuilt.direction, geometry.direction, atol=1e-9)


def test_ras_lps_flip_keeps_nan_and_is_involution():
    points = np.array([[1.0, -2.0, 3.0], [np.nan, np.nan, np.nan]])
    ras = lps_to_ras(points)
    np.testing.assert_array_equal(ras[0], [-1.0, 2.0, 3.0])
    assert np.isnan(ras[1]).all()
    np.testing.assert_array_equal(ras_to_lps(ras)[0], points[0])


def test_bad_geometry_and_points_are_rejected_with_reason():
    with pytest.raises(ValueError, match="spacing"):
        ImageGeometry(size=(4, 4), spacing=(0.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="orthonormal"):
        ImageGeometry(size=(4, 4), spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(2.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 coordinates"):
        oblique_geometry().index_to_physical([1.0, 2.0])
