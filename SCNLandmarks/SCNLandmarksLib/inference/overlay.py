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

__all__ = ["legend_lines", "render_overlay", "write_overlay_png"]

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

    The image gets a numbered cross per landmark; points to check (``landmarks.check``, or for
    landmarks without that decision a confidence below ``low_confidence_threshold``) get an
    orange ring. A legend panel on the right lists number, name and expected error, the points
    to check in orange; where it is taller than the image the picture grows below. Pixels are
    drawn square (an image with unequal pixel sizes is stretched to its true proportions).

    A 3D volume is shown by the slice (along its third index axis) nearest most landmarks; a
    point off that slice is drawn as a small square where it projects, and the legend gives
    the slice it lies on.
    """
    if image.dimension == 3 and landmarks.dimension == 2:
        image = image.as_dimension(2)  # a radiograph stored as a volume of one slice (.mha, .nrrd)
    index = image.geometry.physical_to_index(landmarks.positions)
    slices = None
    if image.dimension == 3:
        slices = np.round(index[:, 2])
        shown = _slice_of_most_points(slices, image.array.shape[0])
        plane, spacing = image.array[shown], image.geometry.spacing[:2]
        index = index[:, :2]
        off_slice = np.isfinite(slices) & (slices != shown)
    else:
        plane, spacing, shown = image.array, image.geometry.spacing, None
        off_slice = np.zeros(len(landmarks), dtype=bool)
    plane, index = _square_pixels(plane, index, spacing)
    picture = _grey_to_rgb(plane)
    rows, columns = picture.shape[:2]
    arm = max(3, int(min(rows, columns) / 100))
    scale = max(1, int(min(rows, columns) / 300))
    check = landmarks.to_check(low_confidence_threshold)
    for number, (x, y) in enumerate(index):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        colour = tuple(int(c) for c in _COLOURS[number % len(_COLOURS)])
        cx, cy = int(round(x)), int(round(y))
        if off_slice[number]:
            _draw_square(picture, cx, cy, max(2, arm // 2), colour)
        else:
            _draw_cross(picture, cx, cy, arm, colour)
        if check[number]:
            _draw_ring(picture, cx, cy, 2 * arm, max(2, arm // 2), CHECK_COLOUR)
        _draw_text(picture, str(number + 1), cx + arm + 2, cy - arm - 5 * scale, scale, colour)
    on_slices = None if slices is None else [None if not off_slice[n] else int(slices[n]) for n in range(len(landmarks))]
    panel = _legend(landmarks, check, rows, scale, shown_slice=shown, on_slices=on_slices)
    if panel.shape[0] > rows:  # the legend is taller: the picture grows below, dark
        picture = np.concatenate([picture, np.full((panel.shape[0] - rows, columns, 3), 32, np.uint8)])
    return np.concatenate([picture, panel], axis=1)


def _slice_of_most_points(slices: np.ndarray, count: int) -> int:
    """The slice (of ``count``) that most points lie on; of equals, the one nearest their median;
    the middle slice where no point is placed or none lies inside the volume."""
    inside = slices[np.isfinite(slices) & (slices >= 0) & (slices < count)].astype(int)
    if inside.size == 0:
        return count // 2
    values, counts = np.unique(inside, return_counts=True)
    tied = values[counts == counts.max()]
    return int(tied[np.argmin(np.abs(tied - np.median(inside)))])


def _square_pixels(plane: np.ndarray, index: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The plane resampled so that a pixel is as wide as it is high (the smaller pixel size), and
    the point indices (x, y) moved with it; unchanged where the sizes differ by less than 5 %."""
    along_x, along_y = float(spacing[0]), float(spacing[1])
    if abs(along_x / along_y - 1.0) < 0.05:
        return plane, index
    from scipy.ndimage import zoom

    step = min(along_x, along_y)
    factors = (along_y / step, along_x / step)  # array order: rows (y), columns (x)
    resized = zoom(plane, factors, order=1, grid_mode=True, mode="nearest")  # pixels as areas, as the points are
    # Pixel centres: index i of the old grid sits at (i + 0.5) * factor - 0.5 on the new one.
    moved = (index + 0.5) * np.array([factors[1], factors[0]]) - 0.5
    return resized, moved


def _draw_cross(picture: np.ndarray, cx: int, cy: int, arm: int, colour: tuple[int, ...]) -> None:
    rows, columns = picture.shape[:2]
    for offset in range(-arm, arm + 1):
        for dx, dy in ((offset, 0), (0, offset)):
            for thickness in (-1, 0, 1):
                px, py = cx + dx + (thickness if dy else 0), cy + dy + (thickness if dx else 0)
                if 0 <= px < columns and 0 <= py < rows:
                    picture[py, px] = colour


def _draw_square(picture: np.ndarray, cx: int, cy: int, half: int, colour: tuple[int, ...]) -> None:
    """An open square: a point that lies on another slice, drawn where it projects."""
    rows, columns = picture.shape[:2]
    for offset in range(-half, half + 1):
        for px, py in ((cx + offset, cy - half), (cx + offset, cy + half), (cx - half, cy + offset), (cx + half, cy + offset)):
            if 0 <= px < columns and 0 <= py < rows:
                picture[py, px] = colour


def legend_lines(landmarks: Landmarks, check: np.ndarray, *, shown_slice: int | None = None,
                 on_slices: list[int | None] | None = None) -> list[str]:
    """The legend's text: a title, then one line per landmark ("12 gonion 2.3 mm check!").

    For a 3D volume ``shown_slice`` is the slice drawn and ``on_slices`` the slice of each point
    not on it (None: on it, or missing).
    """
    title = "mm = expected error, check! = please check" if landmarks.expected_errors is not None else "check! = please check"
    if shown_slice is not None:
        title += f"; slice {shown_slice}, squares: on another slice"
    lines = [title]
    for number, name in enumerate(landmarks.names):
        expected = landmarks.expected_errors[number] if landmarks.expected_errors is not None else np.nan
        text = f"{number + 1} {name}"
        if landmarks.missing[number]:
            text += " (missing)"
        elif np.isfinite(expected):
            text += f" {expected:.1f} mm"
        if on_slices is not None and on_slices[number] is not None:
            text += f" (slice {on_slices[number]})"
        if check[number]:
            text += " check!"
        lines.append(text)
    return lines


def _legend(landmarks: Landmarks, check: np.ndarray, rows: int, scale: int, *, shown_slice: int | None = None,
            on_slices: list[int | None] | None = None) -> np.ndarray:
    """A dark panel with :func:`legend_lines`, the points to check in orange; at least ``rows`` high,
    taller where the lines need it."""
    title, *lines = legend_lines(landmarks, check, shown_slice=shown_slice, on_slices=on_slices)
    height = 7 * scale
    # Shrink the text to fit the image's height when there are many landmarks.
    while scale > 1 and (len(lines) + 2) * height > rows:
        scale -= 1
        height = 7 * scale
    width = max(len(text) for text in [title, *lines]) * 4 * scale + 8 * scale
    panel = np.full((max(rows, (len(lines) + 2) * height + 2 * scale), width, 3), 32, dtype=np.uint8)
    _draw_text(panel, title, 4 * scale, 2 * scale, scale, TEXT_COLOUR)
    for line, text in enumerate(lines, start=2):
        number = line - 2
        colour = CHECK_COLOUR if check[number] else tuple(int(c) for c in _COLOURS[number % len(_COLOURS)])
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
