"""Detecting landmarks on an image: grid sampling, network, maxima, back to physical LPS."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch

from .device import describe_device, resolve_device
from .grid import SamplingTransform, padded_size, resample
from .image import Image
from .intensity import finish
from .landmarks import Landmarks
from .model import LandmarkModel
from .model_file import load_model
from .preprocess import OUTSIDE_VALUE, PreparedImage, prepare_image
from .decode import heatmap_maxima

__all__ = ["Detector", "detect", "detection_grid"]


def detection_grid(prepared: PreparedImage, model: LandmarkModel) -> SamplingTransform:
    """The grid to run the network on for this image.

    A fit-to-size model sees the whole image in one grid of its training size. A model with
    a fixed spacing gets a grid that covers the whole image at that spacing; when that grid
    is larger than the training field of view it is processed in overlapping tiles.
    """
    base = prepared.base
    if model.grid.spacing is None:
        return base
    extent_voxels = prepared.extent_along_grid_mm / base.spacing
    size = padded_size(extent_voxels, model.config.size_divisor)
    return base.with_size(size)


def _tile_starts(full: int, tile: int) -> list[int]:
    if full <= tile:
        return [0]
    count = math.ceil((full - tile) / (tile / 2)) + 1  # at least half a tile of overlap
    return sorted({int(round(s)) for s in np.linspace(0, full - tile, count)})


class Detector:
    """A model held on a device, ready to detect landmarks on many images.

    Args:
        model: a loaded model, or the path of a model file.
        device: ``"auto"`` (GPU when present), ``"cpu"`` or ``"cuda"``.

    Example:
        >>> detector = Detector("cephalometric.scn.pt", device="auto")  # doctest: +SKIP
        >>> landmarks = detector.detect(read_image("ceph.png", spacing=(0.1, 0.1)))  # doctest: +SKIP
    """

    def __init__(self, model: LandmarkModel | str | Path, *, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device)
        self.model = load_model(model, device=self.device) if isinstance(model, (str, Path)) else model.to(self.device)
        self.model.network.eval()

    @property
    def device_description(self) -> str:
        return describe_device(self.device)

    def heatmaps(self, image: Image) -> tuple[np.ndarray, SamplingTransform]:
        """Network heatmaps over the whole detection grid, ``(N, [z,] y, x)``, and that grid."""
        model = self.model
        prepared = prepare_image(image, grid=model.grid, intensity=model.intensity, dimension=model.dimension)
        grid = detection_grid(prepared, model)
        array = finish(resample(prepared.array, prepared.geometry, grid, fill=OUTSIDE_VALUE))
        tile = tuple(min(t, f) for t, f in zip(model.grid.size[::-1], array.shape))
        merged = np.full((model.config.num_landmarks, *array.shape), -np.inf, dtype=np.float32)
        starts = [_tile_starts(f, t) for f, t in zip(array.shape, tile)]
        with torch.inference_mode():
            for corner in itertools.product(*starts):
                window = tuple(slice(c, c + t) for c, t in zip(corner, tile))
                batch = torch.from_numpy(np.ascontiguousarray(array[window]))[None, None].to(self.device)
                output = model.network(batch)[0].float().cpu().numpy()
                # Overlapping tiles: a landmark near a tile edge is seen better by its neighbour.
                target = (slice(None), *window)
                merged[target] = np.maximum(merged[target], output)
        return merged, grid

    def detect(self, image: Image) -> Landmarks:
        """Landmarks in LPS mm with a confidence in [0, 1] per point.

        The confidence is the heatmap maximum divided by the peak of the model's target
        Gaussian for that landmark: about 1 where the network is as sure as on its training
        targets, near 0 where it sees nothing.
        """
        heatmaps, grid = self.heatmaps(image)
        positions, values = heatmap_maxima(heatmaps)
        physical = grid.grid_to_physical(positions)
        peaks = self.model.targets.peak_values().detach().cpu().numpy()
        confidences = np.clip(values / peaks, 0.0, 1.0)
        return Landmarks(
            names=list(self.model.landmark_names),
            positions=physical,
            descriptions=list(self.model.landmark_descriptions),
            confidences=confidences,
        )


def detect(image: Image, model: LandmarkModel | str | Path, *, device: str | torch.device = "auto") -> Landmarks:
    """Detect the model's landmarks on one image; see :class:`Detector` for many images."""
    return Detector(model, device=device).detect(image)
