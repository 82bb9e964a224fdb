"""Loading annotated images from disk as training or evaluation cases."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ..imaging.image import Image
from ..imaging.image_io import find_images, output_stem, read_image
from .landmark_io import landmark_csv_header, read_landmark_csv, read_landmarks
from .landmarks import Landmarks
from .training_case import TrainingCase

__all__ = ["load_cases", "read_id_list", "read_landmark_names"]


def read_id_list(path: str | Path) -> list[str]:
    """Image ids, one per line (blank lines and ``#`` comments ignored; a byte-order mark, as
    Windows editors write one, is not part of the first id).

    Raises:
        ValueError: the file is not UTF-8 text.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        msg = f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        raise ValueError(msg) from error
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_landmark_names(path: str | Path) -> tuple[list[str], list[str]]:
    """Landmark names and descriptions, one per line as ``name`` or ``name: description``."""
    names, descriptions = [], []
    for line in read_id_list(path):
        name, _, description = line.partition(":")
        names.append(name.strip())
        descriptions.append(description.strip())
    return names, descriptions


def load_cases(
    images: str | Path,
    *,
    dimension: int,
    landmarks: str | Path | Sequence[str | Path] | None = None,
    units: Literal["mm", "pixel"] = "mm",
    ids: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    descriptions: Sequence[str] | None = None,
) -> list[TrainingCase]:
    """Annotated cases from an image folder.

    Args:
        images: folder of images (any format :func:`~SCNLandmarksLib.imaging.image_io.read_image` reads).
        dimension: 2 or 3.
        landmarks: a challenge-style CSV (one row per image id = image file name without
            extension), several (several raters: each point is the mean of the annotations that
            have it, as the ISBI 2015 figures use both doctors'), or ``None`` to read
            ``<image name>.mrk.json`` / ``.fcsv`` next to each image.
        units: CSV coordinates in physical ``"mm"`` (LPS) or ``"pixel"`` indices (mapped
            through each image's own geometry).
        ids: only these image ids, in this order (a split file).
        spacing: pixel size for formats without one (PNG, JPEG).
        names, descriptions: landmark names for CSV columns (default ``L1..LN``).
    """
    files: dict[str, Path] = {}
    for path in find_images(images):
        if output_stem(path) in files:
            msg = (f"{files[output_stem(path)].name} and {path.name} in {images} are the same case "
                   f"({output_stem(path)!r}); keep one of them")
            raise ValueError(msg)
        files[output_stem(path)] = path
    if not files:
        msg = f"No images found in {images}"
        raise ValueError(msg)
    wanted = list(ids) if ids is not None else sorted(files)
    missing_images = [i for i in wanted if i not in files]
    if missing_images:
        msg = f"No image file in {images} for ids: {', '.join(missing_images[:5])}{' ...' if len(missing_images) > 5 else ''}"
        raise FileNotFoundError(msg)
    table = None
    if landmarks is not None:
        table = _mean_annotation(landmarks, wanted, dimension=dimension, names=names)
    cases = []
    for image_id in wanted:
        image = read_image(files[image_id], spacing=spacing)
        if image.dimension == 3 and min(image.geometry.size) > 1 and dimension == 2:
            msg = (f"{files[image_id].name} is a 3D volume ({' x '.join(map(str, image.geometry.size))} voxels), but 2D "
                   "images were asked for; for volumes ask for 3D (--dimension 3, dimension=3)")
            raise ValueError(msg)
        if table is not None:
            points = table[image_id]
            if units == "pixel":
                geometry = image.as_dimension(dimension).geometry
                points = Landmarks(points.names, geometry.index_to_physical(points.positions), points.descriptions)
        else:
            points = _sidecar_landmarks(files[image_id], dimension)
        if descriptions is not None and len(descriptions) == len(points):
            points.descriptions = list(descriptions)
        _refuse_points_outside(image.as_dimension(dimension), points, image_id, units)
        cases.append(TrainingCase(image=image, landmarks=points, name=image_id))
    return cases


def _mean_annotation(files: str | Path | Sequence[str | Path], ids: Sequence[str], *, dimension: int,
                     names: Sequence[str] | None) -> dict[str, Landmarks]:
    """Image id -> landmarks for ``ids`` from one CSV, or the mean of several (NaN where none has the point)."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    for path in files:
        if str(path).lower().endswith((".fcsv", ".json")):
            msg = (f"{path} is a point file of one image; the landmark table takes one CSV row per image "
                   "('id,x1,y1[,z1],...'). A point file belongs beside its image, named like it (T1w.fcsv next to "
                   "T1w.nii.gz), and is then read without a table")
            raise ValueError(msg)
    headers = [(path, landmark_csv_header(path)) for path in files]
    headed = [(path, header) for path, header in headers if header is not None]
    for path, header in headed[1:]:  # columns are read by position: named ones must agree
        if header[1:] != headed[0][1][1:]:
            msg = f"{path} and {headed[0][0]} name their columns differently; give files with the same column order"
            raise ValueError(msg)
    tables = [read_landmark_csv(path, dimension=dimension, names=names) for path in files]
    mean = {}
    for image_id in ids:
        rows = []
        for path, table in zip(files, tables):
            if image_id not in table:
                msg = f"{path} has no row for image {image_id}"
                raise ValueError(msg)
            rows.append(table[image_id])
        if any(len(row) != len(rows[0]) for row in rows):
            counts = ", ".join(f"{Path(path).name}: {len(row)}" for path, row in zip(files, rows))
            msg = f"The landmark files disagree on the number of landmarks of image {image_id} ({counts})"
            raise ValueError(msg)
        stack = np.stack([row.positions for row in rows])
        present = np.isfinite(stack).all(axis=2)
        total = np.where(present[..., None], stack, 0.0).sum(axis=0)
        count = present.sum(axis=0)[:, None]
        positions = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        mean[image_id] = Landmarks(rows[0].names, positions, rows[0].descriptions)
    return mean


# Points may sit a little outside the pixel grid (on the border, or a structure cut off).
_OUTSIDE_MARGIN = 0.05


def _refuse_points_outside(image: Image, points: Landmarks, image_id: str, units: str) -> None:
    """A landmark far outside its image means wrong units or the wrong image: say which one."""
    index = image.geometry.physical_to_index(points.positions)
    size = np.asarray(image.geometry.size, dtype=float)
    outside = np.isfinite(index).all(axis=1) & (
        (index < -_OUTSIDE_MARGIN * size) | (index > (1 + _OUTSIDE_MARGIN) * size - 1)).any(axis=1)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        hint = ("are the coordinates pixel indices? then give --units pixel" if units == "mm"
                else "are the coordinates millimetres? then leave out --units pixel")
        msg = (f"Image {image_id}: landmark {points.names[row]} at {np.round(points.positions[row], 1).tolist()} mm lies "
               f"outside the image ({int(outside.sum())} of {len(points)} landmarks do); {hint}")
        raise ValueError(msg)


def _sidecar_landmarks(image_path: Path, dimension: int) -> Landmarks:
    stem = output_stem(image_path)
    for suffix in (".mrk.json", ".fcsv", ".json"):
        candidate = image_path.parent / f"{stem}{suffix}"
        if candidate.exists():
            return read_landmarks(candidate, dimension=dimension)
    msg = f"No landmark file for {image_path.name}: expected {stem}.mrk.json or {stem}.fcsv beside it"
    raise FileNotFoundError(msg)
