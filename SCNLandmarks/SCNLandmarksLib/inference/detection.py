"""Detecting landmarks on an image: grid sampling, network, maxima, back to physical LPS.

Radiographs come facing either way and with either polarity (DICOM ``MONOCHROME1`` and many
exports are negatives). For 2D models the global stage therefore reads the image as it is,
mirrored left-right, inverted, and both, and keeps the reading whose landmarks it is most
confident of; the spatial-configuration part makes a wrong reading score clearly lower
(bundled model on ISBI test1: mean confidence 0.72-0.80 read as is, 0.10-0.16 mirrored or
inverted). A confident reading (``CONFIDENT_READING``) ends the search, so usual images cost
one global pass; another reading replaces the usual one only when it is clearly more confident
(``OTHER_READING_MARGIN`` times), so that a weak model does not swap a usual image for a slightly
more confident misreading. The mirror is a flip of the sampling grid's x axis, so points map
back into the image's own physical frame with no extra step.

Where the model has a shape model and a local stage, a point far from where the other points
place it may be replaced by another peak of its global heatmap that fits them better (see
:mod:`SCNLandmarksLib.inference.shape_choice`).

Every point gets an expected error in mm when the model has an error model (see
:mod:`SCNLandmarksLib.models.quality`), from the signals the detection produces anyway; points above the threshold
are to be checked. Models without one flag the points of low confidence instead.

Where the model has a shape model, the detector also compares the size of the detected shape
with the training shapes': an image whose pixel size is wrong (a JPEG or PNG, which carry none,
read at 1 mm per pixel) gives a shape many times too large or too small, every distance in mm is
wrong by that factor, and ``Detector.last_warning`` says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..common.device import bfloat16_is_native, describe_device, resolve_device
from ..imaging.grid import SamplingTransform, padded_size
from ..common.system_memory import memory_available_bytes
from ..imaging.image import Image
from ..data.landmarks import Landmarks
from ..models.model import LandmarkModel
from ..models.model_file import load_model
from ..imaging.preprocess import PreparedImage, prepare_image
from ..models.decode import heatmap_maxima
from ..models.quality import LOW_CONFIDENCE
from ..models.refinement import Refinement, prepare_for_refiner, refine_positions
from .shape_choice import heatmap_candidates, replace_implausible_points

__all__ = ["AS_IS", "GLOBAL_WEIGHT", "Detector", "ImageReading", "detect", "detection_grid", "image_readings",
           "pixel_size_warning", "toward_global"]

log = logging.getLogger(__name__)

# Mean confidence above which the image as it is needs no other reading.
CONFIDENT_READING = 0.5
# How many times more confident another reading must be to replace the image as it is.
OTHER_READING_MARGIN = 2.0
# Share of the way from the local stage's point back toward the global stage's: the two are
# partly independent estimates, and a little of the global one helps. Chosen out of fold on the
# 135 training images (scripts/experiments/stage_blend.py: 0.1 lowered their points > 4 mm off
# from 91 to 88 and their MRE from 1.120 to 1.115 mm; 0.2 and 0.3 did less).
GLOBAL_WEIGHT = 0.1
# A detected shape this many times larger (or smaller) than the training shapes' mean puts the
# image's pixel size in doubt. The ISBI 2015 cephalograms' annotated shapes (both doctors, 300 images) span 0.79-1.18 times
# their mean; a JPEG read at 1 mm instead of 0.1 mm per pixel gives 9-11 times.
PLAUSIBLE_SIZE_FACTOR = 1.6
# The size is judged on the points the global stage found with at least this confidence, and only
# where at least half of them are: on an image unlike the training ones (another anatomy) the points
# are guesses, and their spread says nothing about the pixel size. A wrong pixel size leaves the
# global stage's confidence as it is (its grid spans the image whatever the pixel size).
SIZE_CONFIDENCE = 0.3


@dataclasses.dataclass(frozen=True)
class ImageReading:
    """One way of reading an image: mirrored left-right (grid x axis flipped) and/or intensity-inverted."""

    mirrored: bool = False
    inverted: bool = False

    @property
    def label(self) -> str:
        parts = [p for p, on in (("mirrored", self.mirrored), ("inverted", self.inverted)) if on]
        return " and ".join(parts) or "as is"

    def apply(self, prepared: PreparedImage) -> PreparedImage:
        """``prepared`` read this way (the pixels are shared when nothing changes)."""
        if not (self.mirrored or self.inverted):
            return prepared
        base = prepared.base
        if self.mirrored:
            rotation = base.rotation.copy()
            rotation[:, 0] = -rotation[:, 0]
            base = dataclasses.replace(base, rotation=rotation)
        # Normalised pixels map the window to [-1, 1], so negating them is the negative image.
        array = -prepared.array if self.inverted else prepared.array
        return dataclasses.replace(prepared, array=array, base=base)


AS_IS = (ImageReading(),)


def image_readings(dimension: int) -> list[ImageReading]:
    """The readings tried on a ``dimension``-D image, the usual one first (only 2D images vary)."""
    if dimension != 2:
        return [ImageReading()]
    return [ImageReading(m, i) for i in (False, True) for m in (False, True)]


def detection_grid(prepared: PreparedImage, model: LandmarkModel) -> SamplingTransform:
    """The grid to run the network on for this image.

    A fit-to-size model sees the whole image in one grid of its training size. A model with
    a fixed spacing gets a grid that covers the whole image at that spacing, and at least its
    training field of view along every axis (a thin slab is padded with the fill value, as
    training crops are); when that grid is larger than the training field of view it is
    processed in overlapping tiles.
    """
    base = prepared.base
    if model.grid.spacing is None:
        return base
    extent_voxels = prepared.extent_along_grid_mm / base.spacing
    size = padded_size(extent_voxels, model.config.size_divisor)
    return base.with_size(tuple(max(n, trained) for n, trained in zip(size, model.grid.size)))


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
        refine: use the model's local refinement stage when it has one (``False``: the global
            SCN's estimates only, for comparison).
        readings: the ways to read each image, the usual one first (default: for 2D images
            as it is, mirrored, inverted and both, see :func:`image_readings`; ``AS_IS`` reads
            the image only as it is).
        check_above_mm: points whose expected error exceeds this (mm) are to be checked
            (default: the threshold the model's error model was validated with).
        low_confidence: for models without an error model, points below this confidence are
            to be checked instead.
        bfloat16: run the networks under bfloat16 autocast (default: where the device computes
            bfloat16 in hardware; see ``scripts/experiments/detection_precision.py`` for what it
            changes in time and accuracy).
        shape_choice: let the shape model replace an implausible point by another peak of its
            global heatmap (needs a shape model and the local stage; ``False``: the heatmap
            maxima only, for comparison).
        global_weight: each refined point moves this share of the way back toward the global
            stage's point (0: the local stage's point as it is; see :data:`GLOBAL_WEIGHT`).

    Example:
        >>> detector = Detector("cephalometric.scn.pt", device="auto")  # doctest: +SKIP
        >>> landmarks = detector.detect(read_image("ceph.png", spacing=(0.1, 0.1)))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: LandmarkModel | str | Path,
        *,
        device: str | torch.device = "auto",
        refine: bool = True,
        readings: Sequence[ImageReading] | None = None,
        check_above_mm: float | None = None,
        low_confidence: float = LOW_CONFIDENCE,
        bfloat16: bool | None = None,
        shape_choice: bool = True,
        global_weight: float = GLOBAL_WEIGHT,
    ) -> None:
        self.device = resolve_device(device)
        self.bfloat16 = bfloat16_is_native(self.device) if bfloat16 is None else bool(bfloat16)
        self.model = load_model(model, device=self.device) if isinstance(model, (str, Path)) else model.to(self.device)
        self.model.network.eval()
        self.refine = refine and self.model.refiner is not None
        self.shape_choice = shape_choice and self.refine and self.model.shape_model is not None
        self.readings = list(readings) if readings is not None else image_readings(self.model.dimension)
        if not self.readings:
            msg = "Give at least one way to read the images"
            raise ValueError(msg)
        if check_above_mm is not None and not check_above_mm > 0:
            msg = f"The check threshold must be a positive distance in mm, got {check_above_mm}"
            raise ValueError(msg)
        self.check_above_mm = check_above_mm
        if not 0.0 <= global_weight <= 1.0:
            msg = f"The global stage's weight must lie between 0 and 1, got {global_weight}"
            raise ValueError(msg)
        self.global_weight = float(global_weight)
        self.low_confidence = low_confidence
        self.last_reading = ImageReading()
        self.last_signals: dict[str, np.ndarray] = {}
        self.last_global_positions: np.ndarray | None = None
        self.last_size_ratio = math.nan
        self.last_warning: str | None = None
        if self.model.refiner is not None:
            self.model.refiner.eval()

    def _precision(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16)

    @property
    def device_description(self) -> str:
        return describe_device(self.device)

    def heatmaps(self, image: Image) -> tuple[np.ndarray, SamplingTransform]:
        """Network heatmaps over the whole detection grid, ``(N, [z,] y, x)``, and that grid."""
        model = self.model
        prepared = prepare_image(image, grid=model.grid, intensity=model.intensity, dimension=model.dimension)
        return self._heatmaps(prepared)

    def _heatmaps(self, prepared: PreparedImage) -> tuple[np.ndarray, SamplingTransform]:
        model = self.model
        grid = detection_grid(prepared, model)
        array = prepared.sample(grid)
        tile = tuple(min(t, f) for t, f in zip(model.grid.size[::-1], array.shape))
        # One float32 heatmap per landmark over the whole grid: for a 3D model with a fixed voxel
        # size on a large volume this, not the image, is what does not fit.
        # Detection keeps the best reading's heatmaps while it tries the next one.
        copies = 2 if len(self.readings) > 1 else 1
        needed = copies * 4 * model.config.num_landmarks * int(np.prod(array.shape))
        available = memory_available_bytes()
        if available is not None and needed > available:
            grid_size = " x ".join(str(n) for n in array.shape[::-1])
            msg = (f"This image is too large for the memory available: {model.config.num_landmarks} heatmaps of "
                   f"{grid_size} voxels need about {needed / 2**30:.1f} GB, {available / 2**30:.1f} GB are free")
            raise MemoryError(msg)
        merged = np.full((model.config.num_landmarks, *array.shape), -np.inf, dtype=np.float32)
        starts = [_tile_starts(f, t) for f, t in zip(array.shape, tile)]
        with torch.inference_mode(), self._precision():
            for corner in itertools.product(*starts):
                window = tuple(slice(c, c + t) for c, t in zip(corner, tile))
                batch = torch.from_numpy(np.ascontiguousarray(array[window]))[None, None].to(self.device)
                output = model.network(batch)[0].float().cpu().numpy()
                # Overlapping tiles: a landmark near a tile edge is seen better by its neighbour.
                target = (slice(None), *window)
                merged[target] = np.maximum(merged[target], output)
        return merged, grid

    @property
    def check_threshold_mm(self) -> float | None:
        """The expected error above which a point is to be checked (None: no error model)."""
        if self.model.error_model is None:
            return None
        return self.check_above_mm if self.check_above_mm is not None else self.model.error_model.check_above_mm

    def detect(self, image: Image) -> Landmarks:
        """Landmarks in LPS mm with a confidence in [0, 1], an expected error and a check flag per point.

        The confidence is the heatmap maximum (for a point the shape model moved to another
        candidate, that candidate's value) divided by the peak of the model's target Gaussian
        for that landmark: about 1 where the network is as sure as on its training
        targets, near 0 where it sees nothing. The signals behind the expected error are kept
        in ``last_signals`` (name -> ``(N,)``), the global stage's points (LPS mm, after the shape
        model's choice) in ``last_global_positions``; the detected shape's size over the training
        shapes' in ``last_size_ratio`` (NaN without a shape model) and, where that puts the pixel
        size in doubt, a sentence for the user in ``last_warning`` (else None).
        """
        model = self.model
        prepared = prepare_image(image, grid=model.grid, intensity=model.intensity, dimension=model.dimension)
        peaks = model.targets.peak_values().detach().cpu().numpy()
        best: tuple[float, ImageReading, np.ndarray, np.ndarray, np.ndarray, SamplingTransform] | None = None
        for reading in self.readings:
            heatmaps, grid = self._heatmaps(reading.apply(prepared))
            positions, values = heatmap_maxima(heatmaps)
            confidences = np.clip(values / peaks, 0.0, 1.0)
            score = float(np.mean(confidences))
            if best is None:
                as_is_score = score  # the first reading is the usual one
            elif score <= best[0] or score <= OTHER_READING_MARGIN * as_is_score:
                continue
            best = (score, reading, grid.grid_to_physical(positions), confidences, heatmaps, grid)
            if score >= CONFIDENT_READING:
                break
        _, reading, physical, confidences, heatmaps, grid = best  # type: ignore[misc]
        self.last_reading = reading
        if reading != ImageReading():
            log.info("Read the image %s (the most confident reading)", reading.label)
        signals = {"global_confidence": confidences}
        self.last_global_positions = physical
        if self.refine:
            refiner = model.refiner
            fine = reading.apply(prepare_for_refiner(image, refiner.config, model.intensity))
            with self._precision():
                refined = refine_positions(refiner, fine, physical, device=self.device)
            if self.shape_choice:
                refined, confidences, physical = self._plausible_points(refined, confidences, heatmaps, grid, fine, peaks,
                                                                        physical)
            self.last_global_positions = physical
            physical = toward_global(refined.positions, physical, self.global_weight)
            signals["global_confidence"] = confidences
            signals["local_peak"] = refined.peaks / refiner.config.target_peak
            signals["local_width_mm"] = refined.widths_mm
            if refiner.config.members > 1:
                signals["member_spread_mm"] = refined.member_spread_mm
        if model.shape_model is not None:
            signals["shape_deviation"] = model.shape_model.deviations(physical) / model.shape_model.spread_mm
        self.last_signals = signals
        self.last_size_ratio = self._size_ratio(physical, signals["global_confidence"])
        self.last_warning = pixel_size_warning(self.last_size_ratio, image.geometry.spacing)
        if self.last_warning is not None:  # the callers show it with the image's name
            log.info(self.last_warning)
        expected, check = self._point_quality(signals, physical)
        return Landmarks(
            names=list(self.model.landmark_names),
            positions=physical,
            descriptions=list(self.model.landmark_descriptions),
            confidences=confidences,
            expected_errors=expected,
            check=check,
        )

    def _size_ratio(self, positions: np.ndarray, confidences: np.ndarray) -> float:
        """The detected shape's size over the training shapes' (see ``SIZE_CONFIDENCE``); NaN: no opinion."""
        shape_model = self.model.shape_model
        confident = np.isfinite(positions).all(axis=1) & (confidences >= SIZE_CONFIDENCE)
        if shape_model is None or confident.sum() < max(3, len(confident) / 2):
            return math.nan
        return shape_model.size_ratio(np.where(confident[:, None], positions, np.nan))

    def _plausible_points(self, refined: Refinement, confidences: np.ndarray, heatmaps: np.ndarray,
                          grid: SamplingTransform, fine: PreparedImage, peaks: np.ndarray,
                          coarse: np.ndarray) -> tuple[Refinement, np.ndarray, np.ndarray]:
        """``refined``, the global confidences and the global points (``coarse``, LPS mm) after the
        shape model replaced implausible points by other candidates."""
        refiner = self.model.refiner
        proposals: dict[int, tuple[list[Refinement], np.ndarray, np.ndarray]] = {}

        def propose(channel: int) -> np.ndarray:
            if channel not in proposals:  # the same landmark may come up again: refine its candidates once
                index, values = heatmap_candidates(heatmaps[channel])
                estimates = grid.grid_to_physical(index) if len(index) else np.zeros((0, coarse.shape[1]))
                found = []
                for estimate in estimates:
                    alone = np.full_like(refined.positions, np.nan)
                    alone[channel] = estimate
                    with self._precision():
                        found.append(refine_positions(refiner, fine, alone, device=self.device))
                proposals[channel] = (found, values, estimates)
            found = proposals[channel][0]
            return np.array([f.positions[channel] for f in found]).reshape(-1, refined.positions.shape[1])

        _, chosen = replace_implausible_points(refined.positions, self.model.shape_model, propose)
        if not chosen:
            return refined, confidences, coarse
        parts = [np.array(part, dtype=float, copy=True) for part in refined]
        confidences, coarse = confidences.copy(), np.array(coarse, dtype=float, copy=True)
        for channel, k in chosen.items():
            found, values, estimates = proposals[channel]
            for part, new in zip(parts, found[k]):
                part[channel] = new[channel]
            confidences[channel] = np.clip(values[k] / peaks[channel], 0.0, 1.0)
            coarse[channel] = estimates[k]
        log.info("The shape model chose another candidate for %s",
                 ", ".join(self.model.landmark_names[c] for c in chosen))
        return Refinement(*parts), confidences, coarse

    def _point_quality(self, signals: dict[str, np.ndarray], positions: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        found = np.isfinite(positions).all(axis=1)
        errors = self.model.error_model
        if errors is None or not all(name in signals for name in errors.signals):
            return None, found & (signals["global_confidence"] < self.low_confidence)
        expected = np.where(found, errors.expected_errors(signals), np.nan)
        return expected, found & (expected > self.check_threshold_mm)


def pixel_size_warning(size_ratio: float, spacing_mm: Sequence[float]) -> str | None:
    """A sentence for the user when a detected shape ``size_ratio`` times the training shapes' size
    (see :meth:`~SCNLandmarksLib.models.shape_model.ShapeModel.size_ratio`) suggests that the
    image's pixel size ``spacing_mm`` (x, y[, z]) is wrong; None when it is plausible or unknown."""
    if not math.isfinite(size_ratio) or 1.0 / PLAUSIBLE_SIZE_FACTOR <= size_ratio <= PLAUSIBLE_SIZE_FACTOR:
        return None
    pixels = " x ".join(f"{value:g}" for value in spacing_mm)
    return (f"The landmarks found span {size_ratio:.2g} times the size of the model's training shapes: the "
            f"image's pixel size ({pixels} mm) is probably wrong, and with it every distance and expected "
            "error in mm. JPEG, PNG, BMP and TIFF files carry none and are read at 1 mm unless it is given "
            "(--spacing on the command line, spacing= in Python; in Slicer, Image Spacing in the Volumes "
            "module, or the batch panel's Pixel size).")


def toward_global(local: np.ndarray, coarse: np.ndarray, weight: float) -> np.ndarray:
    """``(N, D)`` points ``weight`` of the way from the local stage's ``local`` to the global ``coarse`` (LPS mm).

    Where either point is missing (NaN) the local one is kept.
    """
    local, coarse = np.asarray(local, dtype=float), np.asarray(coarse, dtype=float)
    both = np.isfinite(local).all(axis=1) & np.isfinite(coarse).all(axis=1)
    return np.where(both[:, None], local + weight * (coarse - local), local)


def detect(image: Image, model: LandmarkModel | str | Path, *, device: str | torch.device = "auto") -> Landmarks:
    """Detect the model's landmarks on one image; see :class:`Detector` for many images."""
    return Detector(model, device=device).detect(image)
