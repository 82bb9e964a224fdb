"""Coordinate frames and the geometry of an image grid.

Every point in this package is in one of three named frames:

* **index** (IJK): continuous voxel index in ITK order ``(i, j[, k])`` = ``(x, y[, z])``;
  voxel centres sit at integer values. NumPy arrays of the image are indexed the
  other way round, ``array[k, j, i]``.
* **LPS**: physical millimetres as ITK and SimpleITK use them (x grows to the patient's
  Left, y to Posterior, z to Superior). This is the engine's working frame.
* **RAS**: physical millimetres as 3D Slicer uses them; ``RAS = diag(-1, -1, 1) @ LPS``.

Point arrays have shape ``(N, D)`` with ``D`` the image dimension (2 or 3) and the last
axis in x, y[, z] order. A missing landmark is a row of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "ImageGeometry",
    "lps_to_ras",
    "ras_to_lps",
]

# Largest departure of direction^T @ direction from the identity still read as rounding.
_ORTHONORMAL_TOLERANCE = 1e-3


def _flip_xy(points: npt.ArrayLike) -> np.ndarray:
    flipped = np.array(points, dtype=float, copy=True)
    if flipped.shape[-1] not in (2, 3):
        msg = f"Points must have 2 or 3 coordinates on their last axis, got shape {flipped.shape}"
        raise ValueError(msg)
    flipped[..., :2] *= -1.0
    return flipped


def lps_to_ras(points: npt.ArrayLike) -> np.ndarray:
    """Convert points from LPS to RAS millimetres (negates x and y).

    Args:
        points: array of shape ``(..., 2)`` or ``(..., 3)``, x, y[, z] order, in LPS mm.

    Returns:
        A new array of the same shape in RAS mm. NaN (missing) stays NaN.
    """
    return _flip_xy(points)


def ras_to_lps(points: npt.ArrayLike) -> np.ndarray:
    """Convert points from RAS to LPS millimetres (negates x and y); see :func:`lps_to_ras`."""
    return _flip_xy(points)


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image grid lies in physical (LPS) space, as ITK defines it.

    ``physical = origin + direction @ (spacing * index)``, all in x, y[, z] order.

    Attributes:
        size: number of voxels per axis, x, y[, z] order.
        spacing: voxel size in mm per axis, x, y[, z] order.
        origin: LPS position in mm of the centre of voxel index 0.
        direction: ``(D, D)`` matrix whose columns are the LPS directions of the index axes.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major D*D, as SimpleITK stores it

    def __post_init__(self) -> None:
        dim = len(self.size)
        if dim not in (2, 3):
            msg = f"Only 2D and 3D images are supported, got a {dim}D grid"
            raise ValueError(msg)
        if len(self.spacing) != dim or len(self.origin) != dim or len(self.direction) != dim * dim:
            msg = "size, spacing, origin and direction of an image geometry disagree in dimension"
            raise ValueError(msg)
        if any(s <= 0 or not np.isfinite(s) for s in self.spacing):
            msg = f"Voxel spacing must be positive and finite, got {self.spacing}"
            raise ValueError(msg)
        if any(n < 1 for n in self.size):
            msg = f"Image size must be at least 1 voxel per axis, got {self.size}"
            raise ValueError(msg)
        matrix = self.direction_matrix
        # Files store directions to a few decimals, so a tiny departure is their rounding; a
        # larger one is a shear or scale, which no rotation of a regular grid can represent.
        if np.abs(matrix.T @ matrix - np.eye(dim)).max() > _ORTHONORMAL_TOLERANCE:
            msg = (f"Image direction matrix is not orthonormal (its axes are not of unit length and at right angles: "
                   f"{np.round(matrix, 4).tolist()}); a sheared or scaled grid must be resampled onto a regular one first")
            raise ValueError(msg)

    @property
    def dimension(self) -> int:
        return len(self.size)

    @property
    def direction_matrix(self) -> np.ndarray:
        dim = len(self.size)
        return np.asarray(self.direction, dtype=float).reshape(dim, dim)

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """Homogeneous ``(D+1, D+1)`` matrix taking continuous index to LPS mm."""
        dim = self.dimension
        matrix = np.eye(dim + 1)
        matrix[:dim, :dim] = self.direction_matrix @ np.diag(self.spacing)
        matrix[:dim, dim] = self.origin
        return matrix

    @property
    def ijk_to_ras_matrix(self) -> np.ndarray:
        """Homogeneous 4x4 matrix taking (i, j, k) to RAS mm, as Slicer's ``IJKToRAS``.

        A 2D image is treated as a single slice at k = 0 with the z axis of LPS.
        """
        matrix3 = np.eye(4)
        matrix = self.index_to_physical_matrix
        dim = self.dimension
        matrix3[:dim, :dim] = matrix[:dim, :dim]
        matrix3[:dim, 3] = matrix[:dim, dim]
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix3

    @property
    def center(self) -> np.ndarray:
        """LPS position of the grid centre, ``index = (size - 1) / 2``."""
        return self.index_to_physical((np.asarray(self.size, dtype=float) - 1.0) / 2.0)

    @property
    def physical_extent(self) -> np.ndarray:
        """Length in mm covered by the voxels along each index axis (``size * spacing``)."""
        return np.asarray(self.size, dtype=float) * np.asarray(self.spacing, dtype=float)

    def index_to_physical(self, index: npt.ArrayLike) -> np.ndarray:
        """Continuous index (x, y[, z]) to LPS mm; shapes ``(D,)`` or ``(N, D)``."""
        index = np.asarray(index, dtype=float)
        self._check_points(index)
        matrix = self.direction_matrix @ np.diag(self.spacing)
        return index @ matrix.T + np.asarray(self.origin)

    def physical_to_index(self, points: npt.ArrayLike) -> np.ndarray:
        """LPS mm to continuous index (x, y[, z]); shapes ``(D,)`` or ``(N, D)``."""
        points = np.asarray(points, dtype=float)
        self._check_points(points)
        return (points - np.asarray(self.origin)) @ self.physical_to_index_matrix.T

    @property
    def physical_to_index_matrix(self) -> np.ndarray:
        """``(D, D)`` matrix taking an LPS offset from the origin (mm) to a continuous index offset.

        The exact inverse, not the transpose, so the last decimals of a stored direction do not
        move a point far from the origin.
        """
        return np.linalg.inv(self.direction_matrix @ np.diag(self.spacing))

    def slice_plane(self) -> ImageGeometry:
        """The 2D geometry of a volume of one slice, in that slice's plane.

        For an axial slice it is the in-plane part of this geometry, so 2D LPS positions are the
        3D ones without z. A slice tilted by up to about 2.5 degrees (as scanners and
        registrations leave them) gets the nearest orthonormal in-plane directions; its points
        go between the frames through the voxel index (:meth:`plane_to_volume`), never by
        dropping or adding z, so they stay on the slice.

        Raises:
            ValueError: not a volume of one slice, or a slice not near the axial plane.
        """
        if self.dimension != 3 or self.size[2] != 1:
            msg = f"Only a 3D volume of one slice has a slice plane; this grid is {self.size} (x, y, z)"
            raise ValueError(msg)
        in_plane = self.direction_matrix[:2, :2]
        if abs(abs(np.linalg.det(in_plane)) - 1.0) > _ORTHONORMAL_TOLERANCE:
            msg = "This single-slice volume is not in an axial plane; it cannot be used as a 2D image"
            raise ValueError(msg)
        left, _, right = np.linalg.svd(in_plane)
        nearest = left @ right  # the orthonormal matrix closest to the in-plane block
        direction = in_plane if np.allclose(in_plane, nearest, atol=1e-12) else nearest
        return ImageGeometry(size=self.size[:2], spacing=self.spacing[:2], origin=self.origin[:2],
                             direction=tuple(float(v) for v in direction.reshape(-1)))

    def plane_to_volume(self, points: npt.ArrayLike) -> np.ndarray:
        """2D positions in :meth:`slice_plane` to LPS mm on this one-slice volume; ``(N, 2)`` -> ``(N, 3)``."""
        index = self.slice_plane().physical_to_index(points)
        return self.index_to_physical(np.concatenate([index, np.zeros((*index.shape[:-1], 1))], axis=-1))

    def volume_to_plane(self, points: npt.ArrayLike) -> np.ndarray:
        """LPS mm near this one-slice volume to 2D positions in :meth:`slice_plane` (projected onto the slice)."""
        index = self.physical_to_index(points)
        return self.slice_plane().index_to_physical(index[..., :2])

    def _check_points(self, points: np.ndarray) -> None:
        if points.shape[-1] != self.dimension:
            msg = (
                f"Expected points with {self.dimension} coordinates (x, y{', z' if self.dimension == 3 else ''}) "
                f"for a {self.dimension}D image, got shape {points.shape}"
            )
            raise ValueError(msg)

    @classmethod
    def from_sitk(cls, image) -> ImageGeometry:  # noqa: ANN001 - SimpleITK is imported lazily
        """Read the geometry of a ``SimpleITK.Image``."""
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def apply_to_sitk(self, image) -> None:  # noqa: ANN001
        """Write spacing, origin and direction onto a ``SimpleITK.Image`` of the same size."""
        if tuple(image.GetSize()) != self.size:
            msg = f"Image size {image.GetSize()} does not match the geometry size {self.size}"
            raise ValueError(msg)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    @classmethod
    def from_ijk_to_ras(cls, size: tuple[int, ...], ijk_to_ras: npt.ArrayLike) -> ImageGeometry:
        """Build a 3D geometry from a Slicer ``IJKToRAS`` 4x4 matrix and the (i, j, k) size."""
        matrix = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_ras, dtype=float)
        linear = matrix[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        direction = linear / spacing
        return cls(
            size=tuple(int(s) for s in size),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in matrix[:3, 3]),
            direction=tuple(float(d) for d in direction.reshape(-1)),
        )
