"""A picture of detected landmarks on their image, for a quick visual check.

Every point is a cross in its own colour with its number beside it; points to check (see
:mod:`SCNLandmarksLib.models.quality`) are ringed in orange. A legend on the right names each number, gives its
expected error and marks the points to check. Text is drawn with a small built-in pixel font,
so the picture needs nothing beyond numpy and SimpleITK.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common.atomic import atomic_path
from ..imaging.image import Image
from ..data.landmarks import Landmarks
from ..models.quality import LOW_CONFIDENCE

__all__ = ["render_overlay", "write_overlay_png"]

_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]], dtype=np.uint8)
CHECK_COLOUR = (255, 140, 0)
TEXT_COLOUR = (255, 255, 255)

# 3x5 pixel glyphs, one string of 5 rows per character ("#" = ink).
_GLYPHS = {
    "0": "###|#.#|#.#|#.#|###", "1": ".#.|##.|.#.|.#.|###", "2": "##.|..#|.#.|#..|###", "3": "##.|..#|.#.|..#|##.",
    "4": "#.#|#.#|###|..#|..#", "5": "###|#..|##.|..#|##.", "6": ".##|#..|###|#.#|###", "7": "###|..#|.#.|.#.|.#.",
    "8": "###|#.#|###|#.#|###", "9": "###|#.#|###|..#|##.", "a": ".#.|#.#|###|#.#|#.#", "b": "##.|#.#|##.|#.#|##.",
    "c": ".##|#..|#..|#..|.##", "d": "##.|#.#|#.#|#.#|##.", "e": "###|#..|##.|#..|###", "f": "###|#..|##.|#..|#..",
    "g": ".##|#..|#.#|#.#|.##", "h": "#.#|#.#|###|#.#|#.#", "i": "###|.#.|.#.|.#.|###", "j": "..#|..#|..#|#.#|.#.",
    "k": "#.#|#.#|##.|#.#|#.#", "l": "#..|#..|#..|#..|###", "m": "#.#|###|###|#.#|#.#", "n": "##.|#.#|#.#|#.#|#.#",
    "o": ".#.|#.#|#.#|#.#|.#.", "p": "##.|#.#|##.|#..|#..", "q": ".#.|#.#|#.#|##.|.##", "r": "##.|#.#|##.|#.#|#.#",
    "s": ".##|#..|.#.|..#|##.", "t": "###|.#.|.#.|.#.|.#.", "u": "#.#|#.#|#.#|#.#|###", "v": "#.#|#.#|#.#|#.#|.#.",
    "w": "#.#|#.#|###|###|#.#", "x": "#.#|#.#|.#.|#.#|#.#", "y": "#.#|#.#|.#.|.#.|.#.", "z": "###|..#|.#.|#..|###",
    "_": "...|...|...|...|###", "-": "...|...|###|...|...", ".": "...|...|...|...|.#.", ":": "...|.#.|...|.#.|...",
    "!": ".#.|.#.|.#.|...|.#.", "(": ".#.|#..|#..|#..|.#.", ",": "...|...|...|.#.|#..", "=": "...|###|...|###|...", ")": ".#.|..#|..#|..#|.#.", " ": "...|...|...|...|...",
}


def _grey_to_rgb(array: np.ndarray) -> np.ndarray:
    low, high = np.percentile(array, [0.5, 99.5])
    scaled = np.clip((array - low) / max(high - low, 1e-6), 0, 1) * 255
    return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)


def _draw_text(picture: np.ndarray, text: str, column: int, row: int, scale: int, colour: tuple[int, ...]) -> None:
    """Write ``text`` with its top-left corner at (column, row); unknown characters become "-"."""
    rows, columns = picture.shape[:2]
    for number, character in enumerate(text.lower()):
        glyph = _GLYPHS.get(character, _GLYPHS["-"]).split("|")
        left = column + number * 4 * scale
        for y, line in enumerate(glyph):
            for x, ink in enumerate(line):
                if ink != "#":
                    continue
                top, start = row + y * scale, left + x * scale
                if 0 <= top and top + scale <= rows and 0 <= start and start + scale <= columns:
                    picture[top : top + scale, start : start + scale] = colour


def _draw_ring(picture: np.ndarray, cx: int, cy: int, radius: int, width: int, colour: tuple[int, ...]) -> None:
    rows, columns = picture.shape[:2]
    top, bottom = max(cy - radius - width, 0), min(cy + radius + width + 1, rows)
    left, right = max(cx - radius - width, 0), min(cx + radius + width + 1, columns)
    if top >= bottom or left >= right:
        return
    yy, xx = np.mgrid[top:bottom, left:right]
    ring = np.abs(np.hypot(xx - cx, yy - cy) - radius) <= width / 2
    picture[top:bottom, left:right][ring] = colour


def render_overlay(image: Image, landmarks: Landmarks, *, low_confidence_threshold: float = LOW_CONFIDENCE) -> np.ndarray:
    """RGB ``(rows, columns + legend, 3)`` uint8 picture of the image with its landmarks.

    The image (the slice through the landmarks' mean for 3D) gets a numbered cross per
    landmark; points to check (``landmarks.check``, or for landmarks without that decision a
    confidence below ``low_confidence_threshold``) get an orange ring. A legend panel on the
    right lists number, name and expected error, the points to check in orange.
    """
    if image.dimension == 3 and landmarks.dimension == 2:
        image = image.as_dimension(2)  # a radiograph stored as a volume of one slice (.mha, .nrrd)
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
    scale = max(1, int(min(rows, columns) / 300))
    check = landmarks.to_check(low_confidence_threshold)
    for number, (x, y) in enumerate(index):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        colour = tuple(int(c) for c in _COLOURS[number % len(_COLOURS)])
        cx, cy = int(round(x)), int(round(y))
        for offset in range(-arm, arm + 1):
            for dx, dy in ((offset, 0), (0, offset)):
                for thickness in (-1, 0, 1):
                    px, py = cx + dx + (thickness if dy else 0), cy + dy + (thickness if dx else 0)
                    if 0 <= px < columns and 0 <= py < rows:
                        picture[py, px] = colour
        if check[number]:
            _draw_ring(picture, cx, cy, 2 * arm, max(2, arm // 2), CHECK_COLOUR)
        _draw_text(picture, str(number + 1), cx + arm + 2, cy - arm - 5 * scale, scale, colour)
    return np.concatenate([picture, _legend(landmarks, check, rows, scale)], axis=1)


def _legend(landmarks: Landmarks, check: np.ndarray, rows: int, scale: int) -> np.ndarray:
    """A dark panel: one line per landmark, "12 gonion 2.3 mm check" (missing points say so)."""
    lines = []
    for number, name in enumerate(landmarks.names):
        expected = landmarks.expected_errors[number] if landmarks.expected_errors is not None else np.nan
        text = f"{number + 1} {name}"
        if landmarks.missing[number]:
            text += " (missing)"
        elif np.isfinite(expected):
            text += f" {expected:.1f} mm"
        if check[number]:
            text += " check!"
        lines.append((text, check[number], number))
    title = "mm = expected error, check! = please check" if landmarks.expected_errors is not None else "check! = please check"
    height = 7 * scale
    # Shrink the text to fit the image's height when there are many landmarks.
    while scale > 1 and (len(lines) + 2) * height > rows:
        scale -= 1
        height = 7 * scale
    width = max(len(t) for t, _, _ in [(title, False, 0), *lines]) * 4 * scale + 8 * scale
    panel = np.full((rows, width, 3), 32, dtype=np.uint8)
    _draw_text(panel, title, 4 * scale, 2 * scale, scale, TEXT_COLOUR)
    for line, (text, flagged, number) in enumerate(lines, start=2):
        colour = CHECK_COLOUR if flagged else tuple(int(c) for c in _COLOURS[number % len(_COLOURS)])
        _draw_text(panel, text, 4 * scale, line * height, scale, colour)
    return panel


def write_overlay_png(image: Image, landmarks: Landmarks, path: str | Path, *, overwrite: bool = False,
                      low_confidence_threshold: float = LOW_CONFIDENCE) -> Path:
    """Write :func:`render_overlay` as a PNG file (atomically)."""
    import SimpleITK as sitk

    picture = sitk.GetImageFromArray(render_overlay(image, landmarks, low_confidence_threshold=low_confidence_threshold),
                                     isVector=True)
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as temporary:
        sitk.WriteImage(picture, str(temporary), imageIO="PNGImageIO")
    return path
