"""The MRML adapter against the real Slicer MRML classes (slicer-core, no Qt, no slicer.app).

Expected positions are computed independently of the adapter: SimpleITK's
``TransformIndexToPhysicalPoint`` (LPS), the LPS->RAS flip and the parent transform matrix.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
vtk = pytest.importorskip("vtk")
sitk = pytest.importorskip("SimpleITK")

from SCNLandmarksLib.slicer_side import mrml_adapter as adapter  # noqa: E402
from SCNLandmarksLib.imaging.geometry import ImageGeometry, lps_to_ras, ras_to_lps  # noqa: E402
from SCNLandmarksLib.data.landmark_io import LOW_CONFIDENCE_NOTE, read_mrk_json  # noqa: E402
from SCNLandmarksLib.data.landmarks import Landmarks  # noqa: E402

SIZE = (12, 10, 8)  # i, j, k
SPACING = (0.5, 0.8, 1.2)
ORIGIN = (10.0, -20.0, 30.0)
BRIGHT = (5, 4, 3)  # i, j, k


def _direction(angle: float = 0.3) -> tuple[float, ...]:
    c, s = math.cos(angle), math.sin(angle)
    # Rotation about z, then a tilt about x, so that no axis is aligned with LPS.
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    t = 0.2
    rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    return tuple((rx @ rz).reshape(-1))


def _linear_transform_matrix() -> np.ndarray:
    angle = 0.4
    c, s = math.cos(angle), math.sin(angle)
    matrix = np.eye(4)
    matrix[:3, :3] = [[1, 0, 0], [0, c, -s], [0, s, c]]
    matrix[:3, 3] = [7.0, -3.0, 11.0]
    return matrix


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _add_transform(scene, array: np.ndarray):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetMatrixTransformToParent(_vtk_matrix(array))
    return node


@pytest.fixture
def sitk_volume(tmp_path):
    """An oblique, anisotropic, non-zero-origin int16 volume with one bright voxel, as NRRD."""
    array = np.zeros(SIZE[::-1], dtype=np.int16)
    array[BRIGHT[::-1]] = 1000
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(_direction())
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    return image, path


def _load_volume(scene, path):
    """Load with Slicer's own reader (vtkITK archetype storage node), not with our code."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def test_volume_under_linear_transform_maps_bright_voxel_to_world_ras(mrml_scene, sitk_volume):
    scene = mrml_scene["scene"]
    sitk_image, path = sitk_volume
    volume = _load_volume(scene, path)
    transform = _linear_transform_matrix()
    volume.SetAndObserveTransformNodeID(_add_transform(scene, transform).GetID())

    image = adapter.image_from_volume_node(volume)

    assert image.array.shape == SIZE[::-1]
    assert image.geometry.spacing == pytest.approx(SPACING)
    found = np.unravel_index(int(np.argmax(image.array)), image.array.shape)[::-1]
    assert tuple(int(v) for v in found) == BRIGHT
    expected_local_ras = lps_to_ras(np.array(sitk_image.TransformIndexToPhysicalPoint(BRIGHT)))
    expected_world_ras = (transform @ np.append(expected_local_ras, 1.0))[:3]
    engine_world_ras = lps_to_ras(image.geometry.index_to_physical(np.array(BRIGHT, float)))
    np.testing.assert_allclose(engine_world_ras, expected_world_ras, atol=1e-6)
    # Without the transform the same voxel must land at the plain IJKToRAS position.
    volume.SetAndObserveTransformNodeID(None)
    local = adapter.image_from_volume_node(volume)
    np.testing.assert_allclose(
        lps_to_ras(local.geometry.index_to_physical(np.array(BRIGHT, float))), expected_local_ras, atol=1e-6
    )


def test_non_linear_transform_is_refused_with_advice(mrml_scene, sitk_volume):
    scene = mrml_scene["scene"]
    volume = _load_volume(scene, sitk_volume[1])
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(ValueError, match="Harden"):
        adapter.image_from_volume_node(volume)


def test_a_transform_with_shear_is_refused_with_advice(mrml_scene, sitk_volume):
    """A small shear (1 %, as an affine registration leaves) keeps the determinant near 1: still refused."""
    scene = mrml_scene["scene"]
    volume = _load_volume(scene, sitk_volume[1])
    sheared = np.eye(4)
    sheared[0, 1] = 0.01
    volume.SetAndObserveTransformNodeID(_add_transform(scene, sheared).GetID())
    with pytest.raises(ValueError, match="shearing.*harden and resample"):
        adapter.image_from_volume_node(volume)


@pytest.mark.parametrize("components", [3, 6])
def test_vector_pixels_become_grey_as_in_files_and_more_than_four_values_are_refused(mrml_scene, components):
    from vtk.util import numpy_support

    scene = mrml_scene["scene"]
    values = np.arange(4 * 5 * 2 * components, dtype=np.float32).reshape(2, 5, 4, components)  # (k, j, i, c)
    data = vtk.vtkImageData()
    data.SetDimensions(4, 5, 2)
    scalars = numpy_support.numpy_to_vtk(values.reshape(-1, components), deep=True, array_type=vtk.VTK_FLOAT)
    data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "dwi" if components == 6 else "colour")
    node.SetAndObserveImageData(data)
    if components == 3:
        np.testing.assert_allclose(adapter.image_from_volume_node(node).array, values.mean(axis=-1))
    else:
        with pytest.raises(ValueError, match='"dwi" has 6 values per pixel; only grey, RGB and RGBA'):
            adapter.image_from_volume_node(node)


def test_volume_without_image_data_is_explained(mrml_scene):
    empty = mrml_scene["scene"].AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no image data"):
        adapter.image_from_volume_node(empty)


def _predictions() -> Landmarks:
    return Landmarks(
        names=["Sella", "Nasion", "Menton"],
        positions=np.array([[10.0, -20.0, 35.0], [14.5, -18.0, 31.0], [np.nan, np.nan, np.nan]]),
        descriptions=["centre of sella turcica", "most anterior point of the frontonasal suture", "lowest point"],
        confidences=np.array([0.93, 0.12, 0.05]),
    )


def _world(node, index: int) -> np.ndarray:
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return np.array(position)


def test_predictions_become_flagged_fixed_point_list_in_world_ras(mrml_scene):
    scene = mrml_scene["scene"]
    predictions = _predictions()
    transform = _linear_transform_matrix()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "preds")
    node.SetAndObserveTransformNodeID(_add_transform(scene, transform).GetID())

    result = adapter.markups_from_landmarks(
        predictions, scene=scene, name="ignored", low_confidence_threshold=0.3, existing_node=node, model_name="m1"
    )

    assert result is node
    assert node.GetNumberOfControlPoints() == 3
    assert [node.GetNthControlPointLabel(i) for i in range(3)] == predictions.names
    assert node.GetFixedNumberOfControlPoints()
    # World positions are the predictions in RAS even though the list is under a transform.
    for i in range(2):
        np.testing.assert_allclose(_world(node, i), lps_to_ras(predictions.positions[i]), atol=1e-9)
    local = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, local)
    assert not np.allclose(local, lps_to_ras(predictions.positions[0]))
    assert node.GetNthControlPointPositionStatus(2) == slicer.vtkMRMLMarkupsNode.PositionMissing
    # Descriptions carry definition and confidence; low confidence is flagged by colour + text.
    assert node.GetNthControlPointDescription(0) == "centre of sella turcica; confidence=0.930"
    assert "confidence=0.120" in node.GetNthControlPointDescription(1)
    assert LOW_CONFIDENCE_NOTE in node.GetNthControlPointDescription(1)
    assert LOW_CONFIDENCE_NOTE not in node.GetNthControlPointDescription(0)
    assert [bool(node.GetNthControlPointSelected(i)) for i in range(3)] == [True, False, False]
    display = node.GetDisplayNode()
    assert display.GetColor() == pytest.approx(adapter.WARNING_COLOR)
    assert display.GetSelectedColor() == pytest.approx(adapter.NORMAL_COLOR)
    assert json.loads(node.GetAttribute(adapter.ATTRIBUTE_CONFIDENCES)) == pytest.approx(
        {"Sella": 0.93, "Nasion": 0.12, "Menton": 0.05}
    )
    assert node.GetAttribute(adapter.ATTRIBUTE_MODEL) == "m1"
    assert not adapter.markups_edited(node)

    # Read back unchanged: same LPS positions, nothing corrected, descriptions clean.
    back = adapter.landmarks_from_markups(node)
    np.testing.assert_allclose(back.positions[:2], predictions.positions[:2], atol=1e-9)
    assert back.missing.tolist() == [False, False, True]
    assert back.corrected.tolist() == [False, False, False]
    assert back.descriptions == predictions.descriptions
    np.testing.assert_allclose(back.confidences, predictions.confidences)


def test_new_list_gets_unique_name_and_display(mrml_scene):
    scene = mrml_scene["scene"]
    first = adapter.markups_from_landmarks(_predictions(), scene=scene, name="ct - model")
    second = adapter.markups_from_landmarks(_predictions(), scene=scene, name="ct - model")
    assert first.GetID() != second.GetID()
    assert first.GetName() == "ct - model" and second.GetName() != first.GetName()
    assert second.GetDisplayNode() is not None


def test_moving_a_point_in_world_coordinates_is_a_correction(mrml_scene):
    scene = mrml_scene["scene"]
    node = adapter.markups_from_landmarks(_predictions(), scene=scene, name="preds")
    node.SetAndObserveTransformNodeID(_add_transform(scene, _linear_transform_matrix()).GetID())
    # The list was placed before the transform was added: the world positions moved with it,
    # which the user did not do; what counts is a later move by the user.
    node = adapter.markups_from_landmarks(_predictions(), scene=scene, existing_node=node)
    assert not adapter.markups_edited(node)

    new_world_ras = np.array([-15.0, 19.0, 32.5])
    node.SetNthControlPointPositionWorld(1, *new_world_ras)
    node.SetNthControlPointPositionMissing(0)

    landmarks = adapter.landmarks_from_markups(node)
    np.testing.assert_allclose(landmarks.positions[1], ras_to_lps(new_world_ras), atol=1e-9)
    assert landmarks.corrected.tolist() == [True, True, False]
    assert landmarks.missing.tolist() == [True, False, True]
    assert adapter.markups_edited(node)
    # A move smaller than the tolerance is not a correction.
    tiny = adapter.markups_from_landmarks(_predictions(), scene=scene, name="tiny")
    tiny.SetNthControlPointPositionWorld(0, *(lps_to_ras(_predictions().positions[0]) + [0.001, 0, 0]))
    assert adapter.landmarks_from_markups(tiny).corrected.tolist() == [False, False, False]


def test_a_dragged_point_is_shown_as_corrected_and_no_longer_to_check(mrml_scene):
    scene = mrml_scene["scene"]
    node = adapter.markups_from_landmarks(_predictions(), scene=scene, name="preds", low_confidence_threshold=0.3)
    assert not node.GetNthControlPointSelected(1) and LOW_CONFIDENCE_NOTE in node.GetNthControlPointDescription(1)
    assert adapter.mark_corrected_points(node) == []  # nothing moved yet
    node.SetNthControlPointPositionWorld(1, -15.0, 19.0, 32.5)
    assert adapter.mark_corrected_points(node) == ["Nasion"]
    text = node.GetNthControlPointDescription(1)
    assert text.endswith("corrected=yes") and LOW_CONFIDENCE_NOTE not in text and "confidence=0.120" in text
    assert node.GetNthControlPointSelected(1)  # drawn in the normal colour
    assert not node.GetNthControlPointSelected(2)  # the point not touched keeps its flag
    back = adapter.landmarks_from_markups(node)
    assert back.descriptions == _predictions().descriptions and back.corrected.tolist() == [False, True, False]
    assert adapter.mark_corrected_points(node) == []  # once only


def test_hand_placed_list_counts_as_user_annotation(mrml_scene):
    scene = mrml_scene["scene"]
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "manual")
    node.AddControlPoint(vtk.vtkVector3d(1.0, 2.0, 3.0), "A")
    node.AddControlPoint(vtk.vtkVector3d(4.0, 5.0, 6.0), "B")
    landmarks = adapter.landmarks_from_markups(node, names=["B", "A", "C"])
    assert landmarks.names == ["B", "A", "C"]
    np.testing.assert_allclose(landmarks.positions[0], [-4.0, -5.0, 6.0])
    assert landmarks.corrected.tolist() == [True, True, False]
    assert adapter.markups_edited(node)


def test_2d_landmarks_lie_in_the_plane_of_a_single_slice_volume(mrml_scene):
    scene = mrml_scene["scene"]
    geometry = ImageGeometry(size=(20, 16, 1), spacing=(0.3, 0.4, 2.0), origin=(5.0, 6.0, -42.0),
                             direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    landmarks_2d = Landmarks(names=["P", "Q"], positions=np.array([[4.0, 7.0], [5.5, 8.2]]), confidences=[0.9, 0.8])
    node = adapter.markups_from_landmarks(landmarks_2d, scene=scene, reference_geometry=geometry)
    np.testing.assert_allclose(_world(node, 0), [-4.0, -7.0, -42.0])
    back = adapter.landmarks_from_markups(node, dimension=2)
    np.testing.assert_allclose(back.positions, landmarks_2d.positions, atol=1e-9)


def test_a_case_takes_the_dimension_its_points_were_made_for(mrml_scene):
    from SCNLandmarksLib.imaging.image import Image

    scene = mrml_scene["scene"]
    geometry = ImageGeometry(size=(20, 16, 1), spacing=(0.3, 0.4, 2.0), origin=(5.0, 6.0, -42.0),
                             direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    slice_node = adapter.volume_node_from_image(Image(np.zeros((1, 16, 20), np.float32), geometry), scene=scene,
                                                name="radiograph")
    found = Landmarks(names=["P", "Q"], positions=np.array([[4.0, 7.0], [5.5, 8.2]]))
    detected = adapter.markups_from_landmarks(found, scene=scene, reference_geometry=geometry)
    image, landmarks = adapter.case_from_nodes(slice_node, detected)
    assert image.dimension == 2 and landmarks.dimension == 2
    np.testing.assert_allclose(landmarks.positions, found.positions, atol=1e-9)
    by_hand = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "manual")  # no record: the volume decides
    by_hand.AddControlPoint(vtk.vtkVector3d(-4.0, -7.0, -42.0), "P")
    assert adapter.case_from_nodes(slice_node, by_hand)[1].dimension == 2
    thick = ImageGeometry(size=(20, 16, 3), spacing=(0.3, 0.4, 2.0), origin=(5.0, 6.0, -42.0),
                          direction=geometry.direction)
    volume_node = adapter.volume_node_from_image(Image(np.zeros((3, 16, 20), np.float32), thick), scene=scene,
                                                 name="volume")
    image, landmarks = adapter.case_from_nodes(volume_node, by_hand)
    assert image.dimension == 3 and landmarks.dimension == 3


def test_points_of_a_slightly_tilted_slice_lie_on_it_and_come_back_where_they_were(mrml_scene):
    """A radiograph slice tilted by 2 degrees about x: points are not put at the origin's z, 10 mm off."""
    from SCNLandmarksLib.data.synthetic import rotation_matrix
    from SCNLandmarksLib.imaging.image import Image

    scene = mrml_scene["scene"]
    tilt = rotation_matrix((np.deg2rad(2.0), 0.0, np.deg2rad(10.0)), 3)
    geometry = ImageGeometry(size=(300, 240, 1), spacing=(0.5, 0.5, 1.0), origin=(-60.0, 40.0, 12.0),
                             direction=tuple(tilt.reshape(-1)))
    slice_node = adapter.volume_node_from_image(Image(np.zeros((1, 240, 300), np.float32), geometry), scene=scene,
                                                name="tilted")
    plane = geometry.slice_plane()
    found = Landmarks(names=["P", "Q"], positions=plane.index_to_physical(np.array([[10.0, 20.0], [290.0, 230.0]])))
    detected = adapter.markups_from_landmarks(found, scene=scene, reference_geometry=geometry)
    for row, index in enumerate([[10.0, 20.0], [290.0, 230.0]]):
        world_lps = ras_to_lps(_world(detected, row))
        np.testing.assert_allclose(geometry.physical_to_index(world_lps), [*index, 0.0], atol=1e-6)
    image, landmarks = adapter.case_from_nodes(slice_node, detected)
    for part in ("size", "spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(image.geometry, part), getattr(plane, part), atol=1e-9)
    np.testing.assert_allclose(landmarks.positions, found.positions, atol=1e-6)


def test_volume_node_from_image_round_trip(mrml_scene):
    from SCNLandmarksLib.data.synthetic import make_bright_point_image

    image = make_bright_point_image((3, 4, 2), size=(9, 7, 5), spacing=(0.7, 1.1, 2.0), origin=(1.0, 2.0, 3.0),
                                    direction=(0.1, 0.2, 0.3))
    node = adapter.volume_node_from_image(image, scene=mrml_scene["scene"], name="synthetic")
    back = adapter.image_from_volume_node(node)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.geometry.index_to_physical_matrix, image.geometry.index_to_physical_matrix, atol=1e-9)


def test_mrk_json_round_trip_through_slicer_storage_node(mrml_scene, tmp_path):
    scene = mrml_scene["scene"]
    predictions = _predictions()
    node = adapter.markups_from_landmarks(predictions, scene=scene, name="preds", low_confidence_threshold=0.3)
    path = adapter.save_markups_json(node, tmp_path / "preds.mrk.json")
    with pytest.raises(FileExistsError):
        adapter.save_markups_json(node, path)
    assert not list(tmp_path.glob(".tmp-*"))
    assert json.loads(path.read_text())["markups"][0]["coordinateSystem"] == "LPS"
    # The node's own storage settings are untouched by the export.
    assert node.GetStorageNode() is None

    # The engine's reader sees the same landmarks, confidences and missing point.
    engine = read_mrk_json(path)
    np.testing.assert_allclose(engine.positions[:2], predictions.positions[:2], atol=1e-6)
    assert engine.missing.tolist() == [False, False, True]
    np.testing.assert_allclose(engine.confidences, [0.93, 0.12, 0.05])

    # Slicer's reader, in a second scene, restores labels, statuses, flags and positions.
    other = slicer.vtkMRMLScene()
    for logic_class in (slicer.vtkSlicerMarkupsLogic,):
        logic = logic_class()
        logic.SetMRMLScene(other)
    loaded = adapter.load_markups_json(path, scene=other)
    assert loaded.GetNumberOfControlPoints() == 3
    assert [loaded.GetNthControlPointLabel(i) for i in range(3)] == predictions.names
    assert loaded.GetNthControlPointPositionStatus(2) == slicer.vtkMRMLMarkupsNode.PositionMissing
    assert loaded.GetFixedNumberOfControlPoints()
    assert [bool(loaded.GetNthControlPointSelected(i)) for i in range(3)] == [True, False, False]
    read_back = adapter.landmarks_from_markups(loaded)
    np.testing.assert_allclose(read_back.positions[:2], predictions.positions[:2], atol=1e-6)
    np.testing.assert_allclose(read_back.confidences, [0.93, 0.12, 0.05])
    assert read_back.descriptions == predictions.descriptions
    # The detection record does not travel in .mrk.json; points carrying a detection
    # confidence are then not counted as corrections.
    assert read_back.corrected.tolist() == [False, False, False]
    with pytest.raises(FileNotFoundError):
        adapter.load_markups_json(tmp_path / "absent.mrk.json", scene=other)
    other.Clear(1)
