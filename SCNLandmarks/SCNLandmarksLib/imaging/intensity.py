"""Intensity normalisation, identical in training and detection."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["IntensityConfig", "intensity_window"]


@dataclass(frozen=True)
class IntensityConfig:
    """How pixel values become network inputs in [-1, 1].

    ``robust`` maps the ``low_percentile`` and ``high_percentile`` of each image to -1 and 1,
    so radiographs, CT and MR of any scanner scaling look alike to the network. ``fixed``
    maps ``low`` and ``high`` (in the image's own units, for example Hounsfield) instead.
    Values beyond the window are clipped after augmentation.
    """

    mode: str = "robust"
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    low: float = 0.0
    high: float = 255.0

    def __post_init__(self) -> None:
        if self.mode not in ("robust", "fixed"):
            msg = f"Unknown intensity mode {self.mode!r}; use 'robust' or 'fixed'"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def intensity_window(array: np.ndarray, config: IntensityConfig) -> tuple[float, float]:
    """The (low, high) pixel values that map to -1 and 1 for this image."""
    if config.mode == "fixed":
        low, high = config.low, config.high
    else:
        # Percentiles of a subsample are as good and much faster on large volumes.
        flat = array.reshape(-1)
        if flat.size > 2_000_000:
            flat = flat[:: flat.size // 1_000_000]
        low, high = np.percentile(flat, [config.low_percentile, config.high_percentile])
        if high <= low:
            low, high = float(flat.min()), float(flat.max())
    if high <= low:
        msg = "The image has no intensity contrast to normalise (its intensity window is empty)"
        raise ValueError(msg)
    return float(low), float(high)


def normalise(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``window`` to [-1, 1] linearly (no clipping here; see :func:`finish`)."""
    low, high = window
    return ((array - low) * (2.0 / (high - low)) - 1.0).astype(np.float32)


def finish(array: np.ndarray, *, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Apply an intensity augmentation (shift then scale) and clip to [-1, 1]."""
    return np.clip((array + shift) * scale, -1.0, 1.0).astype(np.float32)
