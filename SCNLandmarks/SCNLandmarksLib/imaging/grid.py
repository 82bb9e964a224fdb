"""The network grid: a resampling of the physical image, and the one transform that maps
images and landmarks between it and physical LPS space.

Frames used here:

* **grid index**: continuous index on the network grid, x, y[, z] order (array order is reversed).
* **grid mm**: millimetres about the grid centre along the grid axes,
  ``y = (index - (size - 1) / 2) * spacing``.
* **LPS**: the image's physical frame (see :mod:`SCNLandmarksLib.imaging.geometry`).

The grid axes follow the image's own axes, permuted and flipped to be as close as possible
to LPS, so that a network sees anatomy the same way up whatever order the file stores
voxels in, while an oblique acquisition keeps its tilt.

Spatial augmentation lives in the grid-mm frame: ``y' = M (y + e(y)) + t`` where ``M`` is a
rotation times scale, ``e`` a smooth elastic displacement and ``t`` a translation; then
``LPS = centre + R y'``. Images are sampled through this map; landmarks go through its
inverse (exact for the affine part, fixed-point iteration for the elastic part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from .geometry import ImageGeometry

__all__ = ["ElasticField", "GridSpec", "SamplingTransform", "nearest_lps_axes", "resample"]


@dataclass(frozen=True)
class GridSpec:
    """Size and spacing of the network input grid.

    Attributes:
        size: voxels per grid axis, x, y[, z] order.
        spacing: mm per voxel, x, y[, z] order; ``None`` fits the whole image into ``size``
            keeping the aspect ratio (the largest extent decides).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.size) not in (2, 3) or any(int(n) != n or n < 1 for n in self.size):
            msg = f"A grid needs 2 or 3 whole, positive sizes (voxels per axis), got {self.size}"
            raise ValueError(msg)
        if self.spacing is not None and (len(self.spacing) != len(self.size)
                                         or any(not math.isfinite(s) or s <= 0 for s in self.spacing)):
            msg = f"A grid's spacing must be one positive, finite size in mm per axis, got {self.spacing} for size {self.size}"
            raise ValueError(msg)

    @property
    def dimension(self) -> int:
        return len(self.size)

    def spacing_for(self, geometry: ImageGeometry, axes: np.ndarray) -> np.ndarray:
        """Grid spacing in mm for this image: the fixed one, or the fit-to-size one."""
        if self.spacing is not None:
            return np.asarray(self.spacing, dtype=float)
        extent = geometry.physical_extent[np.abs(axes)]
        return np.full(self.dimension, float(np.max(extent / np.asarray(self.size, dtype=float))))


def nearest_lps_axes(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed permutation of the image axes that is closest to the LPS axes.

    Returns:
        ``(axes, rotation)``: ``axes[a]`` is the image index axis used for grid axis ``a``;
        ``rotation`` is the ``(D, D)`` matrix whose columns are the LPS directions of the grid axes.
    """
    dim = direction.shape[0]
    remaining = list(range(dim))
    axes = np.zeros(dim, dtype=int)
    rotation = np.zeros((dim, dim))
    # Greedy on the largest cosines: exact for any non-degenerate orientation.
    order = np.argsort(-np.abs(direction), axis=None)
    taken_rows: set[int] = set()
    for flat in order:
        row, col = divmod(int(flat), dim)
        if row in taken_rows or col not in remaining:
            continue
        taken_rows.add(row)
        remaining.remove(col)
        sign = 1.0 if direction[row, col] >= 0 else -1.0
        axes[row] = col
        rotation[:, row] = sign * direction[:, col]
    return axes, rotation


@dataclass
class ElasticField:
    """Smooth displacement in grid mm, defined by values on a coarse control grid.

    Attributes:
        displacements: ``(D, n, n[, n])`` mm, component first then control nodes in array order.
        extent: grid-mm half-extent covered by the control grid, x, y[, z] order.
    """

    displacements: np.ndarray
    extent: np.ndarray

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """Displacement ``(N, D)`` mm at grid-mm points ``(N, D)``."""
        nodes = np.asarray(self.displacements.shape[1:], dtype=float)[::-1]  # x, y[, z]
        # Grid mm -> control-node index, nodes spread from -extent to +extent.
        node_index = (points_mm / self.extent + 1.0) * 0.5 * (nodes - 1.0)
        coords = node_index[:, ::-1].T
        return np.stack(
            [ndimage.map_coordinates(c, coords, order=3, mode="nearest") for c in self.displacements], axis=1
        )


@dataclass
class SamplingTransform:
    """Map between network-grid index and image LPS mm (see the module docstring)."""

    size: tuple[int, ...]
    spacing: np.ndarray
    centre: np.ndarray
    rotation: np.ndarray
    linear: np.ndarray = field(default=None)  # type: ignore[assignment]
    translation: np.ndarray = field(default=None)  # type: ignore[assignment]
    elastic: ElasticField | None = None

    def __post_init__(self) -> None:
        dim = len(self.size)
        self.spacing = np.asarray(self.spacing, dtype=float)
        self.centre = np.asarray(self.centre, dtype=float)
        self.linear = np.eye(dim) if self.linear is None else np.asarray(self.linear, dtype=float)
        self.translation = np.zeros(dim) if self.translation is None else np.asarray(self.translation, float)

    @classmethod
    def for_image(
        cls,
        geometry: ImageGeometry,
        grid: GridSpec,
        *,
        centre: npt.ArrayLike | None = None,
    ) -> SamplingTransform:
        """The un-augmented grid over ``geometry``, centred on the image centre (or ``centre``, LPS mm)."""
        if grid.dimension != geometry.dimension:
            msg = f"A {grid.dimension}D network grid cannot sample a {geometry.dimension}D image"
            raise ValueError(msg)
        axes, rotation = nearest_lps_axes(geometry.direction_matrix)
        spacing = grid.spacing_for(geometry, axes)
        return cls(
            size=tuple(int(s) for s in grid.size),
            spacing=spacing,
            centre=geometry.center if centre is None else np.asarray(centre, dtype=float),
            rotation=rotation,
        )

    @property
    def _half(self) -> np.ndarray:
        return (np.asarray(self.size, dtype=float) - 1.0) / 2.0

    def grid_to_physical(self, index: npt.ArrayLike) -> np.ndarray:
        """Grid index ``(N, D)`` (x, y[, z]) to LPS mm ``(N, D)``."""
        index = np.atleast_2d(np.asarray(index, dtype=float))
        mm = (index - self._half) * self.spacing
        if self.elastic is not None:
            mm = mm + self.elastic(mm)
        mm = mm @ self.linear.T + self.translation
        return mm @ self.rotation.T + self.centre

    def physical_to_grid(self, points: npt.ArrayLike, *, iterations: int = 30) -> np.ndarray:
        """LPS mm ``(N, D)`` to grid index ``(N, D)``; NaN rows stay NaN.

        The elastic part is inverted by fixed-point iteration, which converges for the
        smooth, moderate displacements used in augmentation.
        """
        points = np.atleast_2d(np.asarray(points, dtype=float))
        valid = np.isfinite(points).all(axis=1)
        out = np.full(points.shape, np.nan)
        if not valid.any():
            return out
        mm = (points[valid] - self.centre) @ self.rotation
        mm = np.linalg.solve(self.linear, (mm - self.translation).T).T
        if self.elastic is not None:
            target = mm
            estimate = target.copy()
            for _ in range(iterations):
                estimate = target - self.elastic(estimate)
            mm = estimate
        out[valid] = mm / self.spacing + self._half
        return out

    def source_index_arrays(self, geometry: ImageGeometry) -> list[np.ndarray]:
        """Continuous index in ``geometry`` of every grid voxel centre.

        Returns:
            ``D`` arrays of shape ``size[::-1]`` (array order), holding the source index
            along x, y[, z]. The affine part of the map is composed into one ``D x D``
            matrix and applied by broadcasting, which is several times faster than
            transforming an ``(N, D)`` point list.
        """
        dim = len(self.size)
        shape = tuple(self.size)[::-1]
        to_index = geometry.physical_to_index_matrix
        matrix = to_index @ self.rotation @ self.linear
        offset = to_index @ (self.rotation @ self.translation + self.centre - np.asarray(geometry.origin))

        def along(axis: int, values: np.ndarray) -> np.ndarray:
            view = [1] * dim
            view[dim - 1 - axis] = values.size
            return values.reshape(view)

        grid_mm = [along(a, (np.arange(n) - (n - 1) / 2.0) * self.spacing[a]) for a, n in enumerate(self.size)]
        if self.elastic is not None:
            full = [np.broadcast_to(g, shape) for g in grid_mm]
            points = np.stack([f.reshape(-1) for f in full], axis=1)
            displacement = self.elastic(points)
            grid_mm = [full[a] + displacement[:, a].reshape(shape) for a in range(dim)]
        result = []
        for k in range(dim):
            value = np.full(shape, offset[k])
            for j in range(dim):
                value = value + matrix[k, j] * grid_mm[j]
            result.append(value)
        return result

    def with_size(self, size: tuple[int, ...]) -> SamplingTransform:
        return SamplingTransform(size, self.spacing, self.centre, self.rotation, self.linear, self.translation, self.elastic)


def resample(
    array: np.ndarray,
    geometry: ImageGeometry,
    transform: SamplingTransform,
    *,
    fill: float,
    order: int = 1,
) -> np.ndarray:
    """Sample an image onto the network grid.

    Args:
        array: pixels in NumPy order ``([z,] y, x)``.
        geometry: where ``array`` lies in LPS space.
        transform: the grid to sample on.
        fill: value for grid points outside the image.
        order: spline order (1 = linear).

    Returns:
        float32 array of shape ``transform.size[::-1]``.
    """
    index = transform.source_index_arrays(geometry)
    coords = np.stack(index[::-1])  # array order z, y, x
    values = ndimage.map_coordinates(array, coords, order=order, mode="constant", cval=fill, prefilter=order > 1)
    return values.astype(np.float32)


def downsample_for_grid(array: np.ndarray, geometry: ImageGeometry, target_spacing: float) -> tuple[np.ndarray, ImageGeometry]:
    """Low-pass and subsample an image whose pixels are much finer than ``target_spacing`` mm.

    Linear sampling of a 0.1 mm radiograph onto a 0.5 mm grid would alias; this keeps a
    working copy at about half the grid spacing, smoothed first, with the same origin and
    direction. Images that are already coarse enough are returned unchanged.
    """
    spacing = np.asarray(geometry.spacing, dtype=float)
    step = np.floor(0.5 * target_spacing / spacing).astype(int)
    if (step <= 1).all():
        return array, geometry
    step = np.maximum(step, 1)
    sigma = np.where(step > 1, 0.5 * step, 0.0)[::-1]
    smoothed = ndimage.gaussian_filter(array.astype(np.float32), sigma=sigma, mode="nearest")
    slices = tuple(slice(0, None, int(s)) for s in step[::-1])
    reduced = smoothed[slices]
    new_geometry = ImageGeometry(
        size=tuple(int(n) for n in reduced.shape[::-1]),
        spacing=tuple(float(s) for s in spacing * step),
        origin=geometry.origin,
        direction=geometry.direction,
    )
    return np.ascontiguousarray(reduced), new_geometry


def padded_size(extent_voxels: npt.ArrayLike, divisor: int) -> tuple[int, ...]:
    """Smallest sizes >= ``extent_voxels`` that are multiples of ``divisor``."""
    return tuple(int(math.ceil(max(float(e), 1.0) / divisor) * divisor) for e in np.asarray(extent_voxels))
