"""The only bridge between Slicer's MRML scene and the engine (the one module importing slicer/vtk).

Frames: Slicer nodes hold RAS millimetres, the engine works in LPS millimetres
(``RAS = diag(-1, -1, 1) @ LPS``, see :mod:`SCNLandmarksLib.imaging.geometry`). Everything crossing
this bridge is in **world** coordinates:

* a volume under a linear parent transform is handed to the engine with that transform
  folded into its geometry (the engine sees the image where the user sees it);
* predicted points are placed at their world position, whatever transform the point list
  is under, and corrections are read back as world positions.

A non-linear (warping) parent transform cannot be folded into a grid geometry; the user
is asked to harden it first.

Works with the real MRML classes of Slicer and of ``slicer-core`` (no ``slicer.app`` needed).
Kept out of ``SCNLandmarksLib.__init__`` so that the engine imports without Slicer.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..imaging.geometry import ImageGeometry, lps_to_ras, ras_to_lps
from ..imaging.image import Image
from ..imaging.image_io import grey_pixels
from ..data.landmark_io import compose_point_description, parse_point_description
from ..models.quality import LOW_CONFIDENCE
from ..data.landmarks import Landmarks

__all__ = [
    "ATTRIBUTE_CONFIDENCES",
    "ATTRIBUTE_DETECTED",
    "ATTRIBUTE_MODEL",
    "case_from_nodes",
    "NORMAL_COLOR",
    "WARNING_COLOR",
    "ijk_to_world_ras_matrix",
    "image_from_volume_node",
    "is_detection_result",
    "landmarks_from_markups",
    "load_markups_json",
    "mark_corrected_points",
    "markups_edited",
    "markups_from_landmarks",
    "save_markups_json",
    "volume_node_from_image",
]

# Node attributes written by detection. They travel with the scene (.mrml/.mrb) but not with
# a saved .mrk.json; the confidence is therefore also kept in each point's description.
ATTRIBUTE_PREFIX = "SCNLandmarks."
ATTRIBUTE_CONFIDENCES = ATTRIBUTE_PREFIX + "confidences"  # JSON {name: confidence or null}
ATTRIBUTE_DETECTED = ATTRIBUTE_PREFIX + "detectedPositionsWorldRAS"  # JSON {name: [r, a, s] or null}
ATTRIBUTE_MODEL = ATTRIBUTE_PREFIX + "model"
ATTRIBUTE_THRESHOLD = ATTRIBUTE_PREFIX + "lowConfidenceThreshold"
ATTRIBUTE_DIMENSION = ATTRIBUTE_PREFIX + "dimension"

# Points that need checking are drawn in WARNING_COLOR: they are left unselected, and Slicer
# draws unselected control points in the display node's Color, selected ones in SelectedColor.
NORMAL_COLOR = (0.30, 0.85, 0.35)
WARNING_COLOR = (1.00, 0.45, 0.00)

# A point that moved less than this (mm) was not corrected (float round-off, a click without drag).
CORRECTION_TOLERANCE_MM = 0.01



# --------------------------------------------------------------------------- matrices


def _array_from_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _parent_to_world(node) -> np.ndarray:  # noqa: ANN001 - any transformable MRML node
    """4x4 matrix from the node's local frame to world RAS (identity without a parent transform).

    Raises:
        ValueError: the parent transform is not linear.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        msg = (
            f'"{node.GetName()}" is under a non-linear (warping) transform "{parent.GetName()}". '
            "Harden the transform on it first (Data module: right-click, Harden transform)."
        )
        raise ValueError(msg)
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return _array_from_matrix(matrix)


def ijk_to_world_ras_matrix(volume_node) -> np.ndarray:  # noqa: ANN001
    """4x4 matrix taking a voxel index (i, j, k) of the volume to world RAS mm.

    The volume's IJKToRAS matrix followed by its parent transform, when that is linear.
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return _parent_to_world(volume_node) @ _array_from_matrix(ijk_to_ras)


# --------------------------------------------------------------------------- volumes


def image_from_volume_node(volume_node) -> Image:  # noqa: ANN001
    """The volume as an engine :class:`Image` in world LPS coordinates.

    The pixel array is the node's image data in NumPy ``(k, j, i)`` order (the engine's
    ``(z, y, x)``), copied as float32; vector pixels become grey as in files
    (:func:`~SCNLandmarksLib.imaging.image_io.grey_pixels`: RGB the mean, more than 4 values refused).
    The geometry comes from IJKToRAS and the linear parent transform.
    A single-slice volume stays 3D here (``Image.as_dimension(2)`` turns it into 2D).

    Raises:
        ValueError: no image data, more than 4 values per pixel, a non-linear parent transform,
            or a transform with shear (the grid would no longer be orthogonal).
    """
    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        name = volume_node.GetName() if volume_node is not None else "The volume"
        msg = f'"{name}" has no image data; load or select another volume'
        raise ValueError(msg)
    scalars = image_data.GetPointData().GetScalars()
    size_ijk = tuple(int(d) for d in image_data.GetDimensions())
    components = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars).reshape(size_ijk[::-1] + ((components,) if components > 1 else ()))
    array = grey_pixels(array, components, f'"{volume_node.GetName()}"')
    matrix = ijk_to_world_ras_matrix(volume_node)
    try:
        geometry = ImageGeometry.from_ijk_to_ras(size_ijk, matrix)
    except ValueError as error:
        msg = (
            f'The position of "{volume_node.GetName()}" includes shearing (from its transform), '
            "so its voxels are no longer a regular grid; harden and resample the volume first"
        )
        raise ValueError(msg) from error
    return Image(np.array(array, dtype=np.float32, copy=True), geometry)


def volume_node_from_image(image: Image, *, scene, name: str = "Volume"):  # noqa: ANN001, ANN201
    """A new ``vtkMRMLScalarVolumeNode`` in ``scene`` showing ``image`` (2D becomes one slice).

    The node's IJKToRAS is the image geometry in RAS; pixels are float32.
    """
    array = image.array if image.dimension == 3 else image.array[None]
    array = np.ascontiguousarray(array, dtype=np.float32)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.reshape(-1), deep=True, array_type=vtk.VTK_FLOAT)
    scalars.SetNumberOfComponents(1)
    image_data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(image.geometry.ijk_to_ras_matrix[row, column]))
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(image_data)
    node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------- descriptions


def _json_attribute(node, name: str) -> dict | None:  # noqa: ANN001
    text = node.GetAttribute(name)
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- markups


def _world_lps_positions(landmarks: Landmarks, reference_geometry: ImageGeometry | None) -> np.ndarray:
    """``(N, 3)`` world LPS positions; 2D landmarks lie in the plane of the single-slice volume."""
    positions = np.full((len(landmarks), 3), np.nan)
    if landmarks.dimension == 3:
        positions[:] = landmarks.positions
    elif reference_geometry is not None and reference_geometry.dimension == 3:
        # Through the voxel index, so a slightly tilted slice's points lie on the slice.
        positions[:] = reference_geometry.plane_to_volume(landmarks.positions)
    else:
        positions[:, :2] = landmarks.positions
        positions[:, 2] = 0.0
    positions[landmarks.missing] = np.nan
    return positions


def markups_from_landmarks(
    landmarks: Landmarks,
    *,
    scene,  # noqa: ANN001
    name: str = "Landmarks",
    low_confidence_threshold: float | None = LOW_CONFIDENCE,
    existing_node=None,  # noqa: ANN001
    reference_geometry: ImageGeometry | None = None,
    model_name: str = "",
):  # noqa: ANN201
    """Put landmarks into a point list: one control point per landmark, at its world position.

    Args:
        landmarks: positions in LPS mm (world); NaN rows are missing landmarks.
        scene: the MRML scene.
        name: name of a new point list (made unique in the scene).
        low_confidence_threshold: for landmarks without the detector's check decision
            (``landmarks.check``), points with a confidence below it are flagged. Flagged points
            are drawn in :data:`WARNING_COLOR` (left unselected) and described "please check"
            with their expected error. None flags nothing of that kind.
        existing_node: fill this point list instead of creating one (its points are replaced).
        reference_geometry: world LPS geometry of the image; needed to put 2D landmarks in
            the plane of a single-slice volume (z of the slice).
        model_name: recorded on the node (attribute ``SCNLandmarks.model``).

    Each point: label = landmark name; description = landmark description,
    ``confidence=0.930``, ``expected_error_mm=1.2`` and the check note; missing landmarks are missing points
    (``positionStatus`` missing). The list gets a fixed number of points, so the landmark
    set stays complete while the user moves points or marks them missing. The detected
    world positions and confidences are stored as node attributes so that
    :func:`landmarks_from_markups` can tell which points the user corrected.

    Returns:
        The ``vtkMRMLMarkupsFiducialNode``.
    """
    if existing_node is not None:
        node = existing_node
        node.SetFixedNumberOfControlPoints(False)
        node.RemoveAllControlPoints()
    else:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*NORMAL_COLOR)
        display.SetColor(*WARNING_COLOR)

    world_lps = _world_lps_positions(landmarks, reference_geometry)
    world_ras = lps_to_ras(world_lps)
    confidences = (
        landmarks.confidences if landmarks.confidences is not None else np.full(len(landmarks), np.nan)
    )
    record_confidence: dict[str, float | None] = {}
    record_position: dict[str, list[float] | None] = {}
    was_modifying = node.StartModify()
    try:
        to_check = landmarks.to_check(low_confidence_threshold)
        for row, label in enumerate(landmarks.names):
            confidence = float(confidences[row])
            known = math.isfinite(confidence)
            low = bool(to_check[row])
            expected = None if landmarks.expected_errors is None else float(landmarks.expected_errors[row])
            index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), label)
            node.SetNthControlPointDescription(index, compose_point_description(
                landmarks.descriptions[row], confidence if known else None, low=low, corrected=False,
                expected_error=expected))
            node.SetNthControlPointSelected(index, not low)
            if landmarks.missing[row]:
                node.SetNthControlPointPositionMissing(index)
                record_position[label] = None
            else:
                # World setter: correct whatever transform the point list is under.
                node.SetNthControlPointPositionWorld(index, *(float(v) for v in world_ras[row]))
                record_position[label] = [float(v) for v in world_ras[row]]
            record_confidence[label] = confidence if known else None
        node.SetFixedNumberOfControlPoints(True)
        node.SetAttribute(ATTRIBUTE_CONFIDENCES, json.dumps(record_confidence))
        node.SetAttribute(ATTRIBUTE_DETECTED, json.dumps(record_position))
        node.SetAttribute(ATTRIBUTE_MODEL, str(model_name))
        node.SetAttribute(ATTRIBUTE_DIMENSION, str(landmarks.dimension))
        node.SetAttribute(
            ATTRIBUTE_THRESHOLD, "" if low_confidence_threshold is None else f"{low_confidence_threshold:g}"
        )
    finally:
        node.EndModify(was_modifying)
    return node


def _point_world_ras(node, index: int) -> np.ndarray | None:  # noqa: ANN001
    if node.GetNthControlPointPositionStatus(index) != slicer.vtkMRMLMarkupsNode.PositionDefined:
        return None
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return np.array(position, dtype=float)


def is_detection_result(node) -> bool:  # noqa: ANN001
    """True when the point list was made by :func:`markups_from_landmarks` (has its record)."""
    return node is not None and _json_attribute(node, ATTRIBUTE_DETECTED) is not None


def case_from_nodes(volume_node, markups_node):  # noqa: ANN001, ANN201 - (Image, Landmarks)
    """A volume and its point list as an engine image and landmarks, in the dimension the points
    were made for: the one detection recorded on the list, else 2D for a single-slice volume (how
    Slicer holds a radiograph), else 3D.

    Raises:
        ValueError: as :func:`image_from_volume_node` and :func:`landmarks_from_markups`.
    """
    image = image_from_volume_node(volume_node)
    recorded = markups_node.GetAttribute(ATTRIBUTE_DIMENSION)
    dimension = int(recorded) if recorded in ("2", "3") else (2 if image.geometry.size[2] == 1 else 3)
    flat = image.as_dimension(dimension)
    landmarks = landmarks_from_markups(markups_node, dimension=3)
    if dimension == 2:  # into the slice's plane through the voxel index, as detection put them out
        landmarks = dataclasses.replace(landmarks, positions=image.geometry.volume_to_plane(landmarks.positions))
    return flat, landmarks


def landmarks_from_markups(
    node,  # noqa: ANN001
    *,
    dimension: int = 3,
    names: Sequence[str] | None = None,
) -> Landmarks:
    """Read a point list back as engine landmarks in world LPS mm.

    Args:
        node: a ``vtkMRMLMarkupsFiducialNode`` (or any markups node with control points).
        dimension: 2 to keep LPS x and y only (landmarks of a single-slice image), else 3.
        names: reorder to these landmark names (absent ones become missing).

    Returns:
        Landmarks with labels as names; points that are missing, not yet placed or being
        placed are NaN. ``confidences`` come from the detection record (or the
        ``confidence=`` token of the description). ``corrected`` is True for a point that is
        more than 0.01 mm away from where detection put it, and for a point whose missing
        status the user changed. Without a detection record (a list the user placed by
        hand) every placed point counts as placed by a person, except points whose
        description carries a detection confidence.

    Raises:
        ValueError: duplicate or empty labels, a non-linear transform, or no points.
    """
    if dimension not in (2, 3):
        msg = f"dimension must be 2 or 3, got {dimension}"
        raise ValueError(msg)
    _parent_to_world(node)  # fails clearly for a warping transform
    count = node.GetNumberOfControlPoints()
    if count == 0:
        msg = f'The point list "{node.GetName()}" has no points'
        raise ValueError(msg)
    detected = _json_attribute(node, ATTRIBUTE_DETECTED)
    recorded_confidences = _json_attribute(node, ATTRIBUTE_CONFIDENCES) or {}
    labels, descriptions = [], []
    positions = np.full((count, 3), np.nan)
    confidences = np.full(count, np.nan)
    corrected = np.zeros(count, dtype=bool)
    for index in range(count):
        label = node.GetNthControlPointLabel(index).strip()
        if not label:
            msg = f'Point {index + 1} of "{node.GetName()}" has no name (label); every landmark needs one'
            raise ValueError(msg)
        labels.append(label)
        description, token_confidence, token_corrected = parse_point_description(
            node.GetNthControlPointDescription(index) or ""
        )
        descriptions.append(description)
        recorded = recorded_confidences.get(label)
        confidences[index] = float(recorded) if recorded is not None else token_confidence
        world = _point_world_ras(node, index)
        if world is not None:
            positions[index] = ras_to_lps(world)
        if detected is not None:
            original = detected.get(label)
            if original is None or world is None:
                corrected[index] = (original is None) != (world is None)
            else:
                corrected[index] = float(np.linalg.norm(world - np.asarray(original, float))) > CORRECTION_TOLERANCE_MM
        else:
            corrected[index] = token_corrected or (world is not None and math.isnan(token_confidence))
    if dimension == 2:
        positions = positions[:, :2]
    landmarks = Landmarks(
        names=labels,
        positions=positions,
        descriptions=descriptions,
        confidences=confidences if np.isfinite(confidences).any() else None,
        corrected=corrected,
    )
    return landmarks.reordered(list(names)) if names is not None else landmarks


def markups_edited(node) -> bool:  # noqa: ANN001
    """True when the user changed a detection result (moved, marked missing, added or renamed points).

    A point list without a detection record was made by the user and counts as edited.
    """
    detected = _json_attribute(node, ATTRIBUTE_DETECTED)
    if detected is None:
        return True
    labels = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
    if sorted(labels) != sorted(detected):
        return True
    try:
        landmarks = landmarks_from_markups(node)
    except ValueError:
        return True
    return bool(landmarks.corrected is not None and landmarks.corrected.any())


def mark_corrected_points(node) -> list[str]:  # noqa: ANN001
    """Show the points the user moved as corrected: no longer "please check" nor in the warning
    colour, described ``corrected=yes`` (which a saved ``.mrk.json`` keeps). Returns their labels.

    Points moved back to where they were detected, or not moved, keep their flag. Nothing
    happens to a point list without a detection record.
    """
    if _json_attribute(node, ATTRIBUTE_DETECTED) is None:
        return []
    try:
        landmarks = landmarks_from_markups(node)
    except ValueError:
        return []
    updated = []
    was_modifying = node.StartModify()
    try:
        for index, moved in enumerate(landmarks.corrected if landmarks.corrected is not None else []):
            text = node.GetNthControlPointDescription(index)
            description, confidence, already = parse_point_description(text)
            if not moved or already:
                continue
            node.SetNthControlPointDescription(index, compose_point_description(
                description, None if math.isnan(confidence) else confidence, low=False, corrected=True))
            node.SetNthControlPointSelected(index, True)
            updated.append(node.GetNthControlPointLabel(index))
    finally:
        node.EndModify(was_modifying)
    return updated


# --------------------------------------------------------------------------- files


def _json_storage_node(scene):  # noqa: ANN001, ANN202
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    return storage


def save_markups_json(
    node,  # noqa: ANN001
    path: str | os.PathLike[str],
    *,
    coordinate_system: str = "LPS",
    overwrite: bool = False,
) -> Path:
    """Write a point list to a ``.mrk.json`` file with Slicer's own writer, atomically.

    The file holds the points' own (local) coordinates, as Slicer writes them, in
    ``coordinate_system`` ("LPS", Slicer's default, or "RAS"). The node's storage node is not
    changed, so the user's "Save" settings stay as they were.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is False.
        OSError: Slicer's writer failed.
    """
    from ..common.atomic import atomic_path

    path = Path(path).expanduser()
    scene = node.GetScene()
    storage = _json_storage_node(scene)
    try:
        if coordinate_system.upper() == "RAS":
            storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemRAS)
        elif coordinate_system.upper() == "LPS":
            storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemLPS)
        else:
            msg = f'coordinate_system must be "LPS" or "RAS", got {coordinate_system!r}'
            raise ValueError(msg)
        with atomic_path(path, overwrite=overwrite) as temporary:
            storage.SetFileName(str(temporary))
            if not storage.WriteData(node):
                msg = f"Slicer could not write {path}"
                raise OSError(msg)
    finally:
        scene.RemoveNode(storage)
    return path


def load_markups_json(path: str | os.PathLike[str], *, scene, name: str | None = None):  # noqa: ANN001, ANN201
    """Read a ``.mrk.json`` point list into a new ``vtkMRMLMarkupsFiducialNode`` with Slicer's reader.

    Raises:
        FileNotFoundError: no such file.
        ValueError: Slicer could not read it as a point list.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Landmark file not found: {path}"
        raise FileNotFoundError(msg)
    node_name = name or path.name.removesuffix(".json").removesuffix(".mrk")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(node_name))
    storage = _json_storage_node(scene)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        msg = f"{path} could not be read as a Slicer point list"
        raise ValueError(msg)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node

