"""Turning an image into what the network grid samples from, the same way in training and detection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import ImageGeometry
from .grid import GridSpec, SamplingTransform, downsample_for_grid, nearest_lps_axes, resample
from .image import Image, validate_image
from .intensity import IntensityConfig, finish, intensity_window, normalise

__all__ = ["PreparedImage", "prepare_image"]

# Outside the image the network sees the bottom of the intensity window.
OUTSIDE_VALUE = -1.0


@dataclass
class PreparedImage:
    """A normalised working copy of an image.

    Attributes:
        array: normalised pixels (window mapped to [-1, 1], not yet clipped), NumPy order.
        geometry: where ``array`` lies in LPS space (the original image's frame).
        base: the un-augmented network grid over the image.
    """

    array: np.ndarray
    geometry: ImageGeometry
    base: SamplingTransform

    @property
    def extent_along_grid_mm(self) -> np.ndarray:
        axes, _ = nearest_lps_axes(self.geometry.direction_matrix)
        return self.geometry.physical_extent[axes]

    def sample(self, transform: SamplingTransform, *, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
        """What a network sees on ``transform``'s grid: pixels ``([z,] y, x)`` clipped to [-1, 1].

        The one sampling step of training and detection, for both stages. Outside the image
        the grid reads the bottom of the intensity window; ``shift`` and ``scale`` augment
        the intensities (none at detection).
        """
        array = resample(self.array, self.geometry, transform, fill=OUTSIDE_VALUE)
        return finish(array, shift=shift, scale=scale)


def prepare_image(image: Image, *, grid: GridSpec, intensity: IntensityConfig, dimension: int) -> PreparedImage:
    """Check, convert to ``dimension``-D, normalise and (for fine images) low-pass an image.

    Raises:
        ValueError: the image cannot be used (wrong dimension, empty, constant, NaN pixels).
    """
    image = image.as_dimension(dimension)
    validate_image(image)
    array = normalise(image.array, intensity_window(image.array, intensity))
    base = SamplingTransform.for_image(image.geometry, grid)
    array, geometry = downsample_for_grid(array, image.geometry, float(np.min(base.spacing)))
    return PreparedImage(array=array, geometry=geometry, base=base)
