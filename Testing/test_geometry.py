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
    # A 1 % shear keeps the determinant at 1 but is no rotation: refused, not mapped 7 voxels off.
    with pytest.raises(ValueError, match="right angles.*resampled"):
        ImageGeometry(size=(512, 512, 300), spacing=(0.7, 0.7, 1.0), origin=(0.0, 0.0, 0.0),
                      direction=(1.0, 0.01, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 coordinates"):
        oblique_geometry().index_to_physical([1.0, 2.0])


def test_a_direction_stored_to_a_few_decimals_is_accepted_and_inverted_exactly():
    angle = np.deg2rad(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    stored = np.round(rotation, 4)  # as a DICOM header with 4 decimals gives it: not exactly orthonormal
    geometry = ImageGeometry(size=(512, 512, 300), spacing=(0.45, 0.6, 2.5), origin=(-120.0, 80.5, -33.0),
                             direction=tuple(stored.reshape(-1)))
    far_corner = np.array([511.0, 511.0, 299.0])
    np.testing.assert_allclose(geometry.physical_to_index(geometry.index_to_physical(far_corner)), far_corner, atol=1e-9)


def test_a_single_slice_has_a_plane_axial_exactly_as_before_and_tilted_on_the_slice():
    from SCNLandmarksLib.data.synthetic import rotation_matrix

    axial = ImageGeometry(size=(20, 16, 1), spacing=(0.3, 0.4, 2.0), origin=(5.0, 6.0, -42.0),
                          direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    plane = axial.slice_plane()
    assert plane == ImageGeometry(size=(20, 16), spacing=(0.3, 0.4), origin=(5.0, 6.0), direction=(0.0, -1.0, 1.0, 0.0))
    np.testing.assert_allclose(axial.plane_to_volume([[4.0, 7.0]]), [[4.0, 7.0, -42.0]], atol=1e-12)

    tilted = ImageGeometry(size=(300, 240, 1), spacing=(0.5, 0.5, 1.0), origin=(-60.0, 40.0, 12.0),
                           direction=tuple(rotation_matrix((np.deg2rad(2.0), 0.0, 0.3), 3).reshape(-1)))
    points = tilted.slice_plane().index_to_physical(np.array([[0.0, 0.0], [299.0, 239.0], [150.0, 17.5]]))
    on_slice = tilted.plane_to_volume(points)
    np.testing.assert_allclose(tilted.physical_to_index(on_slice)[:, 2], 0.0, atol=1e-9)
    np.testing.assert_allclose(tilted.volume_to_plane(on_slice), points, atol=1e-9)
    normal = tilted.direction_matrix[:, 2]
    np.testing.assert_allclose(tilted.volume_to_plane(on_slice + 3.0 * normal), points, atol=1e-9)  # projected

    steep = ImageGeometry(size=(30, 24, 1), spacing=(0.5, 0.5, 1.0), origin=(0.0, 0.0, 0.0),
                          direction=tuple(rotation_matrix((np.deg2rad(5.0), 0.0, 0.0), 3).reshape(-1)))
    with pytest.raises(ValueError, match="not in an axial plane"):
        steep.slice_plane()
    with pytest.raises(ValueError, match="one slice"):
        ImageGeometry(size=(30, 24, 2), spacing=(0.5, 0.5, 1.0), origin=(0.0, 0.0, 0.0),
                      direction=steep.direction).slice_plane()
