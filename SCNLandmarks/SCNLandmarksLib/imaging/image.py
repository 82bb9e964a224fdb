"""An image as the engine sees it: a float32 array plus its physical geometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import ImageGeometry

__all__ = ["Image", "validate_image"]


@dataclass
class Image:
    """Pixel data and geometry of one 2D or 3D grey image.

    Attributes:
        array: float32 pixels in NumPy order, ``(y, x)`` for 2D and ``(z, y, x)`` for 3D.
        geometry: grid geometry; ``geometry.size`` is in x, y[, z] order, so
            ``array.shape == geometry.size[::-1]``.
    """

    array: np.ndarray
    geometry: ImageGeometry

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        if tuple(self.array.shape[::-1]) != tuple(self.geometry.size):
            msg = (
                f"Pixel array of shape {self.array.shape} (z, y, x order) does not match the "
                f"geometry size {self.geometry.size} (x, y, z order)"
            )
            raise ValueError(msg)

    @property
    def dimension(self) -> int:
        return self.geometry.dimension

    def as_dimension(self, dimension: int) -> Image:
        """This image as a ``dimension``-D image.

        A 3D volume with a single slice (how Slicer holds a radiograph) becomes 2D in the
        slice's plane (:meth:`ImageGeometry.slice_plane`). Any other change of dimension is an error, and so is a
        3D volume of a single slice asked for as 3D (a radiograph given to a model of volumes).
        """
        if dimension == 3 and self.dimension == 3 and 1 in self.geometry.size:
            msg = (f"The model expects a 3D volume but this image is a single slice, size {self.geometry.size} "
                   "(x, y, z): a 2D image; choose a model for 2D images")
            raise ValueError(msg)
        if dimension == self.dimension:
            return self
        geometry = self.geometry
        if dimension == 2 and self.dimension == 3 and geometry.size[2] == 1:
            return Image(self.array[0], geometry.slice_plane())
        msg = (
            f"The model expects a {dimension}D image but this image is {self.dimension}D "
            f"with size {geometry.size} (x, y, z)"
        )
        raise ValueError(msg)


def validate_image(image: Image, *, name: str = "image") -> None:
    """Reject images that no model can work on, with a message that names the problem.

    Raises:
        ValueError: empty image, NaN or infinite pixels, or constant intensity.
    """
    if image.array.size == 0:
        msg = f"The {name} is empty (size {image.geometry.size})"
        raise ValueError(msg)
    if not np.isfinite(image.array).all():
        bad = int((~np.isfinite(image.array)).sum())
        msg = f"The {name} has {bad} pixels that are NaN or infinite; fix or mask them before detection"
        raise ValueError(msg)
    if float(image.array.max()) == float(image.array.min()):
        msg = f"The {name} has the same intensity ({float(image.array.min())}) everywhere: nothing to detect"
        raise ValueError(msg)
