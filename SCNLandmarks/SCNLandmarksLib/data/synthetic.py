"""Synthetic images with exactly known landmarks, for fast tests and smoke training.

Each case shows one object: a fixed configuration of ``num_landmarks`` points (the same for
every case with the same count, like an anatomy), placed with a random similarity
transform plus a small per-landmark jitter. Every landmark is drawn as a Gaussian blob with
its own radius and brightness, on a smooth soft-edged "body" with a gentle intensity ramp
and mild noise. The pattern is evaluated at each voxel's LPS position, so oblique,
anisotropic and offset grids place the object correctly in physical space and the stated
landmark positions are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..imaging.geometry import ImageGeometry
from ..imaging.image import Image
from .landmarks import Landmarks, default_names

__all__ = [
    "make_bright_point_image",
    "make_geometry",
    "make_synthetic_case",
    "make_synthetic_dataset",
    "rotation_matrix",
    "template_configuration",
]

_GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


def rotation_matrix(angles: float | Sequence[float], dimension: int) -> np.ndarray:
    """Rotation matrix from angles in radians.

    2D: one angle, counter-clockwise from x towards y. 3D: one angle (about z) or three
    angles ``(ax, ay, az)`` applied about x, then y, then z (``R = Rz @ Ry @ Rx``).
    """
    values = np.atleast_1d(np.asarray(angles, dtype=float))
    if dimension == 2:
        if values.shape[0] != 1:
            msg = f"A 2D rotation takes one angle, got {values.tolist()}"
            raise ValueError(msg)
        c, s = math.cos(values[0]), math.sin(values[0])
        return np.array([[c, -s], [s, c]])
    if dimension != 3:
        msg = f"dimension must be 2 or 3, got {dimension}"
        raise ValueError(msg)
    if values.shape[0] == 1:
        values = np.array([0.0, 0.0, values[0]])
    if values.shape[0] != 3:
        msg = f"A 3D rotation takes one angle (about z) or three (about x, y, z), got {values.tolist()}"
        raise ValueError(msg)
    ax, ay, az = values
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_geometry(
    *,
    dimension: int = 3,
    size: int | Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: float | Sequence[float] | None = None,
) -> ImageGeometry:
    """An image geometry from convenient arguments.

    Args:
        dimension: 2 or 3.
        size: voxels per axis (x, y[, z]); one number for all axes. Default 64 (2D) or 48 (3D).
        spacing: mm per voxel (x, y[, z]); one number for all axes. Default 1.0.
        origin: LPS mm of voxel 0. Default 0.
        direction: rotation angle(s) in radians (see :func:`rotation_matrix`) for an oblique
            grid, or a full row-major ``D*D`` direction matrix. Default identity.
    """
    if dimension not in (2, 3):
        msg = f"dimension must be 2 or 3, got {dimension}"
        raise ValueError(msg)
    size = (64 if dimension == 2 else 48) if size is None else size
    sizes = (int(size),) * dimension if np.isscalar(size) else tuple(int(s) for s in size)
    spacing = 1.0 if spacing is None else spacing
    spacings = (float(spacing),) * dimension if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    origins = (0.0,) * dimension if origin is None else tuple(float(o) for o in origin)
    if direction is None:
        matrix = np.eye(dimension)
    else:
        values = np.atleast_1d(np.asarray(direction, dtype=float))
        if values.shape[0] == dimension * dimension:
            matrix = values.reshape(dimension, dimension)
        else:
            matrix = rotation_matrix(values, dimension)
    return ImageGeometry(
        size=sizes, spacing=spacings, origin=origins, direction=tuple(float(v) for v in matrix.reshape(-1))
    )


def template_configuration(num_landmarks: int, dimension: int) -> np.ndarray:
    """The fixed landmark configuration for ``num_landmarks`` points, ``(N, D)`` in [-1, 1].

    Points turn by the golden angle from one to the next: a sunflower spiral filling the
    disc from radius 0.3 to 1 in 2D, a Fibonacci sphere with radii from 0.4 to 1 in 3D.
    They are well spread, distinct and identical for every call.
    """
    if num_landmarks < 1:
        msg = f"num_landmarks must be at least 1, got {num_landmarks}"
        raise ValueError(msg)
    index = np.arange(num_landmarks, dtype=float)
    azimuth = 2.0 * math.pi * _GOLDEN_FRACTION * index
    if dimension == 2:
        # Radius grows as the square root of the index so the points cover the disc evenly.
        radius = np.sqrt(0.1 + 0.9 * (index + 0.5) / num_landmarks)
        return np.stack([radius * np.cos(azimuth), radius * np.sin(azimuth)], axis=1)
    radius = 0.4 + 0.6 * ((index * _GOLDEN_FRACTION + 0.5) % 1.0)
    height = 1.0 - 2.0 * (index + 0.5) / num_landmarks
    ring = np.sqrt(1.0 - height**2)
    return radius[:, None] * np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), height], axis=1)


def _physical_grid(geometry: ImageGeometry) -> list[np.ndarray]:
    """LPS coordinate arrays (one per axis), broadcastable to the NumPy ``(z, y, x)`` shape."""
    dimension = geometry.dimension
    matrix = geometry.direction_matrix @ np.diag(geometry.spacing)
    # Index axis a (x=0, y=1, z=2) runs along NumPy axis dimension-1-a.
    axes = []
    for axis in range(dimension):
        shape = [1] * dimension
        shape[dimension - 1 - axis] = geometry.size[axis]
        axes.append(np.arange(geometry.size[axis], dtype=np.float64).reshape(shape))
    coordinates = []
    for row in range(dimension):
        value = np.float64(geometry.origin[row])
        for axis in range(dimension):
            value = value + matrix[row, axis] * axes[axis]
        coordinates.append(value)
    return coordinates


def _smallest_distance(points: np.ndarray) -> float:
    if points.shape[0] < 2:
        return 1.0
    differences = points[:, None, :] - points[None, :, :]
    distances = np.sqrt((differences**2).sum(axis=-1))
    return float(distances[np.triu_indices(points.shape[0], k=1)].min())


def _blob_style(num_landmarks: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative radius (0.7..1.3) and brightness (0.5..1.0) per landmark, fixed per index."""
    index = np.arange(num_landmarks, dtype=float)
    radius = 0.7 + 0.6 * ((index * 0.3819660113 + 0.25) % 1.0)
    brightness = 0.5 + 0.5 * ((index * _GOLDEN_FRACTION + 0.1) % 1.0)
    return radius, brightness


def make_synthetic_case(
    *,
    dimension: int = 3,
    size: int | Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: float | Sequence[float] | None = None,
    num_landmarks: int = 5,
    seed: int | None = 0,
    jitter_mm: float = 1.0,
    max_rotation: float = 0.25,
    scale_range: tuple[float, float] = (0.85, 1.1),
    blob_sigma_mm: float | None = None,
    noise: float = 0.02,
    num_missing: int = 0,
) -> tuple[Image, Landmarks]:
    """One synthetic image and its exact landmarks.

    Args:
        dimension, size, spacing, origin, direction: the image grid; see :func:`make_geometry`.
        num_landmarks: number of landmarks, named ``L1..LN``.
        seed: random seed of this case (placement, jitter, noise).
        jitter_mm: standard deviation in mm of the random shift of each landmark away from
            the transformed template (shape variation between "patients").
        max_rotation: largest random rotation of the object in radians (about each axis in 3D).
        scale_range: range of the random object scale.
        blob_sigma_mm: base Gaussian radius of the landmark blobs in mm; by default 4 % of
            the smallest field-of-view extent, less where landmarks are crowded, and at least
            1.2 voxels.
        noise: standard deviation of the additive Gaussian noise (blob brightness is 0.5..1).
        num_missing: number of landmarks whose annotation is missing (NaN); their blob is
            still drawn, as an unannotated structure in a real image would be.

    Returns:
        ``(image, landmarks)``; landmark positions in LPS mm, within the field of view.
    """
    geometry = make_geometry(
        dimension=dimension, size=size, spacing=spacing, origin=origin, direction=direction
    )
    if not 0 <= num_missing <= num_landmarks:
        msg = f"num_missing must be between 0 and num_landmarks ({num_landmarks}), got {num_missing}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    extent = geometry.physical_extent
    smallest = float(extent.min())

    # The object lives in the grid's own axes (through the direction matrix) so it always
    # fits the field of view, whatever the obliquity.
    half_size = 0.33 * smallest * rng.uniform(*scale_range)
    if dimension == 2:
        rotation = rotation_matrix(rng.uniform(-max_rotation, max_rotation), 2)
    else:
        rotation = rotation_matrix(rng.uniform(-max_rotation, max_rotation, size=3), 3)
    shift = rng.uniform(-0.04, 0.04, size=dimension) * extent
    template = template_configuration(num_landmarks, dimension)
    in_grid_axes = half_size * template @ rotation.T + shift
    in_grid_axes = in_grid_axes + rng.normal(0.0, jitter_mm, size=in_grid_axes.shape)
    # Keep every landmark and most of its blob inside the grid, even with large jitter.
    limit = np.maximum(extent / 2.0 - 0.08 * smallest, 0.0)
    in_grid_axes = np.clip(in_grid_axes, -limit, limit)
    positions = geometry.center + in_grid_axes @ geometry.direction_matrix.T

    coordinates = _physical_grid(geometry)
    centre = geometry.center
    # Smooth background: a soft-edged body around the object plus a gentle linear ramp.
    body_radius = 0.45 * smallest
    distance_sq = sum((c - centre[i]) ** 2 for i, c in enumerate(coordinates))
    body = 0.25 / (1.0 + np.exp((np.sqrt(distance_sq) - body_radius) / (0.03 * smallest)))
    ramp_direction = rng.normal(size=dimension)
    ramp_direction /= np.linalg.norm(ramp_direction)
    ramp = sum(0.05 * ramp_direction[i] * (c - centre[i]) / smallest for i, c in enumerate(coordinates))
    array = 0.1 + body + ramp

    if blob_sigma_mm is None:
        # Small enough that neighbouring blobs stay apart, large enough to span a few voxels.
        spread = _smallest_distance(template) * 0.33 * smallest
        base_sigma = max(min(0.04 * smallest, 0.2 * spread), 1.2 * max(geometry.spacing))
    else:
        base_sigma = float(blob_sigma_mm)
    radius, brightness = _blob_style(num_landmarks)
    for point, relative_radius, amplitude in zip(positions, radius, brightness):
        sigma = base_sigma * relative_radius
        squared = sum((c - point[i]) ** 2 for i, c in enumerate(coordinates))
        array = array + amplitude * np.exp(-squared / (2.0 * sigma**2))
    if noise > 0:
        array = array + rng.normal(0.0, noise, size=array.shape)
    array = np.broadcast_to(array, geometry.size[::-1]).astype(np.float32)

    annotated = positions.copy()
    if num_missing:
        annotated[rng.choice(num_landmarks, size=num_missing, replace=False)] = np.nan
    names = default_names(num_landmarks)
    descriptions = [
        f"synthetic blob, sigma {base_sigma * r:.1f} mm, brightness {b:.2f}"
        for r, b in zip(radius, brightness)
    ]
    return Image(array, geometry), Landmarks(names=names, positions=annotated, descriptions=descriptions)


def make_synthetic_dataset(count: int, *, seed: int = 0, **options: object) -> list[tuple[Image, Landmarks]]:
    """``count`` cases of :func:`make_synthetic_case` with seeds ``seed, seed + 1, ...``.

    All other keyword options are passed on unchanged, so the cases share their grid and
    landmark configuration and differ in placement, jitter and noise.
    """
    if count < 0:
        msg = f"count must not be negative, got {count}"
        raise ValueError(msg)
    return [make_synthetic_case(seed=seed + i, **options) for i in range(count)]  # type: ignore[arg-type]


def make_bright_point_image(
    index: npt.ArrayLike,
    *,
    size: int | Sequence[int],
    spacing: float | Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: float | Sequence[float] | None = None,
    value: float = 1000.0,
    background: float = 0.0,
) -> Image:
    """An image that is ``background`` everywhere except one voxel of ``value``.

    Args:
        index: integer voxel index of the bright voxel, x, y[, z] order.
        size: voxels per axis, x, y[, z] order; its length sets the dimension (a single
            number means 3D).
        spacing, origin, direction: see :func:`make_geometry`.
    """
    point = np.asarray(index)
    dimension = 3 if np.isscalar(size) else len(size)  # type: ignore[arg-type]
    geometry = make_geometry(
        dimension=dimension, size=size, spacing=spacing, origin=origin, direction=direction
    )
    if point.shape != (dimension,) or not np.all(np.equal(np.mod(point, 1), 0)):
        axes = "x, y, z" if dimension == 3 else "x, y"
        msg = f"index must be {dimension} whole numbers ({axes}), got {point.tolist()}"
        raise ValueError(msg)
    point = point.astype(int)
    if np.any(point < 0) or np.any(point >= np.asarray(geometry.size)):
        msg = f"index {point.tolist()} lies outside the image of size {geometry.size}"
        raise ValueError(msg)
    array = np.full(geometry.size[::-1], background, dtype=np.float32)
    array[tuple(point[::-1])] = value
    return Image(array, geometry)
