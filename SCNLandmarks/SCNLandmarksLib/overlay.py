"""A picture of detected landmarks on their image, for a quick visual check."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .image import Image
from .landmarks import Landmarks

__all__ = ["render_overlay", "write_overlay_png"]

_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]], dtype=np.uint8)


def _grey_to_rgb(array: np.ndarray) -> np.ndarray:
    low, high = np.percentile(array, [0.5, 99.5])
    scaled = np.clip((array - low) / max(high - low, 1e-6), 0, 1) * 255
    return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)


def render_overlay(image: Image, landmarks: Landmarks, *, low_confidence_threshold: float = 0.3) -> np.ndarray:
    """RGB ``(rows, columns, 3)`` uint8 picture: the image (the slice through the landmarks'
    mean for 3D) with a cross per landmark; low-confidence landmarks get a hollow square.
    """
    if image.dimension == 3:
        index = image.geometry.physical_to_index(landmarks.positions)
        valid = np.isfinite(index).all(axis=1)
        slice_k = int(np.clip(np.round(np.nanmean(index[valid, 2])) if valid.any() else image.array.shape[0] // 2,
                              0, image.array.shape[0] - 1))
        picture = _grey_to_rgb(image.array[slice_k])
        index = index[:, :2]
    else:
        picture = _grey_to_rgb(image.array)
        index = image.geometry.physical_to_index(landmarks.positions)
    rows, columns = picture.shape[:2]
    arm = max(3, int(min(rows, columns) / 100))
    for number, (x, y) in enumerate(index):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        colour = _COLOURS[number % len(_COLOURS)]
        cx, cy = int(round(x)), int(round(y))
        for offset in range(-arm, arm + 1):
            for dx, dy in ((offset, 0), (0, offset)):
                for thickness in (-1, 0, 1):
                    px, py = cx + dx + (thickness if dy else 0), cy + dy + (thickness if dx else 0)
                    if 0 <= px < columns and 0 <= py < rows:
                        picture[py, px] = colour
        confidence = landmarks.confidences[number] if landmarks.confidences is not None else np.nan
        if np.isfinite(confidence) and confidence < low_confidence_threshold:
            box = 2 * arm
            for offset in range(-box, box + 1):
                for px, py in ((cx + offset, cy - box), (cx + offset, cy + box), (cx - box, cy + offset), (cx + box, cy + offset)):
                    if 0 <= px < columns and 0 <= py < rows:
                        picture[py, px] = (255, 0, 0)
    return picture


def write_overlay_png(image: Image, landmarks: Landmarks, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write :func:`render_overlay` as a PNG file (atomically)."""
    import SimpleITK as sitk

    picture = sitk.GetImageFromArray(render_overlay(image, landmarks), isVector=True)
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as temporary:
        sitk.WriteImage(picture, str(temporary), imageIO="PNGImageIO")
    return path
