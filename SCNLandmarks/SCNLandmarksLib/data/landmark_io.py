"""Reading and writing landmark files: Slicer ``.mrk.json`` and ``.fcsv``, challenge CSV.

Inside the engine landmarks are always LPS millimetres (see :mod:`SCNLandmarksLib.imaging.geometry`);
files may be LPS or RAS, as their header says, and are converted on the way in and out.

Slicer conventions followed here (checked against Slicer's own MRML storage nodes):

* ``.mrk.json``: ``coordinateSystem`` is ``"LPS"`` (Slicer's default when writing) or
  ``"RAS"``; a point that was skipped has ``"positionStatus": "missing"`` and
  ``"position": ""``. Slicer keeps unknown JSON fields only until the next save, so the
  detection confidence is stored in the point description as a ``confidence=0.930`` token,
  which survives editing and re-saving in Slicer.
* ``.fcsv``: ``# CoordinateSystem = 0`` (or ``RAS``) means RAS, ``1`` (or ``LPS``) means
  LPS; an optional 15th column holds the position status (3 = missing), as Slicer 5 writes.
* 2D landmarks are written with z = 0 and read back from x and y when ``dimension=2``.
* A missing landmark is never written as (0, 0, 0).

All writers are atomic and refuse to replace an existing file unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..common.atomic import atomic_write_text, check_writable, file_lock
from ..imaging.geometry import lps_to_ras, ras_to_lps
from .landmarks import Landmarks

__all__ = [
    "CHECK_NOTE",
    "LOW_CONFIDENCE_NOTE",
    "MARKUPS_SCHEMA_URL",
    "compose_point_description",
    "landmark_csv_header",
    "mrk_json_text",
    "parse_point_description",
    "read_fcsv",
    "read_landmark_csv",
    "read_landmarks",
    "read_mrk_json",
    "write_detection_summary_csv",
    "write_fcsv",
    "write_landmark_csv",
    "write_landmarks",
    "write_mrk_json",
]

logger = logging.getLogger(__name__)

CoordinateSystem = Literal["LPS", "RAS"]

# Exactly what Slicer 5.8 to the current branch write (vtkMRMLMarkupsJsonStorageNode.cxx): schema
# v1.0.3 (there is no v1.0.4), with "positionStatus": "missing" for missing points, although that
# schema file's enum lists only undefined/preview/defined. Slicer reads its own files back, so
# writing what it writes is what keeps these files loadable.
MARKUPS_SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)

LOW_CONFIDENCE_NOTE = "low confidence: please check"
CHECK_NOTE = "please check"
_EXPECTED_ERROR_PATTERN = re.compile(r"^expected_error_mm=([-+0-9.eE]+|nan)$")
_CORRECTED_TOKEN = "corrected=yes"
_CONFIDENCE_PATTERN = re.compile(r"^confidence=([-+0-9.eE]+|nan)$")

_FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID".split(",")
# Slicer's numeric position status, as written in the column after associatedNodeID.
_FCSV_STATUS_DEFINED = 2
_FCSV_STATUS_MISSING = 3


# --------------------------------------------------------------------------- descriptions


def compose_point_description(
    description: str, confidence: float | None, *, low: bool, corrected: bool, expected_error: float | None = None
) -> str:
    """Landmark description followed by machine-readable tokens, separated by ``"; "``.

    ``low`` marks a point to check: the note says "please check" after its expected error
    (``expected_error_mm=4.2``) when one is known, "low confidence: please check" otherwise.
    """
    parts = [description] if description else []
    if confidence is not None and math.isfinite(confidence):
        parts.append(f"confidence={confidence:.3f}")
    known_error = expected_error is not None and math.isfinite(expected_error)
    if known_error:
        parts.append(f"expected_error_mm={expected_error:.1f}")
    if low:
        parts.append(CHECK_NOTE if known_error else LOW_CONFIDENCE_NOTE)
    if corrected:
        parts.append(_CORRECTED_TOKEN)
    return "; ".join(parts)


def parse_point_description(text: str) -> tuple[str, float, bool]:
    """Split a point description into (landmark description, confidence or NaN, corrected).

    Only trailing tokens are taken off, so a description that itself contains ";" is kept
    exactly as written.
    """
    confidence = math.nan
    corrected = False
    remaining = text
    while remaining:
        head, separator, tail = remaining.rpartition(";")
        token = tail.strip()
        match = _CONFIDENCE_PATTERN.match(token)
        if match and math.isnan(confidence):
            confidence = float(match.group(1))
        elif token == _CORRECTED_TOKEN:
            corrected = True
        elif token not in (LOW_CONFIDENCE_NOTE, CHECK_NOTE) and not _EXPECTED_ERROR_PATTERN.match(token):
            break
        remaining = head if separator else ""
    return remaining, confidence, corrected


def _landmarks_from_rows(
    path: Path,
    names: list[str],
    positions: np.ndarray,
    raw_descriptions: list[str],
    dimension: int | None,
) -> Landmarks:
    if dimension not in (None, 2, 3):
        msg = f"dimension must be 2, 3 or None, got {dimension!r}"
        raise ValueError(msg)
    parsed = [parse_point_description(text) for text in raw_descriptions]
    descriptions = [p[0] for p in parsed]
    confidences = np.array([p[1] for p in parsed], dtype=float)
    corrected = np.array([p[2] for p in parsed], dtype=bool)
    if dimension == 2:
        positions = positions[:, :2]
    try:
        return Landmarks(
            names=names,
            positions=positions.reshape(len(names), 2 if dimension == 2 else 3),
            descriptions=descriptions,
            confidences=confidences if np.isfinite(confidences).any() else None,
            corrected=corrected if corrected.any() else None,
        )
    except ValueError as error:
        msg = f"Cannot use the landmarks in {path}: {error}"
        raise ValueError(msg) from error


def _to_frame(landmarks: Landmarks, coordinate_system: str) -> np.ndarray:
    """``(N, 3)`` positions in the file frame; 2D landmarks get z = 0."""
    if coordinate_system not in ("LPS", "RAS"):
        msg = f'coordinate_system must be "LPS" or "RAS", got {coordinate_system!r}'
        raise ValueError(msg)
    positions = np.zeros((len(landmarks), 3))
    positions[:, : landmarks.dimension] = landmarks.positions
    positions[landmarks.missing] = np.nan
    return lps_to_ras(positions) if coordinate_system == "RAS" else positions


def _point_flags(
    landmarks: Landmarks, low_confidence_threshold: float | None
) -> tuple[list[float | None], list[bool], list[bool], list[float | None]]:
    """Confidence, to-check flag, corrected flag and expected error of each point.

    A point is to be checked as the detector decided (``landmarks.check``); landmarks without
    that decision fall back to ``confidence < low_confidence_threshold``.
    """
    count = len(landmarks)
    confidences: list[float | None] = (
        [float(c) if math.isfinite(c) else None for c in landmarks.confidences]
        if landmarks.confidences is not None
        else [None] * count
    )
    low = [bool(c) for c in landmarks.to_check(low_confidence_threshold)]
    corrected = [bool(c) for c in landmarks.corrected] if landmarks.corrected is not None else [False] * count
    expected: list[float | None] = (
        [float(e) if math.isfinite(e) else None for e in landmarks.expected_errors]
        if landmarks.expected_errors is not None
        else [None] * count
    )
    return confidences, low, corrected, expected


# --------------------------------------------------------------------------- .mrk.json


def _load_json(path: Path) -> Any:
    if not path.is_file():
        msg = f"Landmark file not found: {path}"
        raise FileNotFoundError(msg)
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{path} is not a valid JSON file ({error})"
        raise ValueError(msg) from error


def _choose_point_list(path: Path, document: Any) -> dict[str, Any]:
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        msg = f"{path} is not a Slicer markups file: it has no 'markups' list"
        raise ValueError(msg)
    point_lists = [m for m in markups if isinstance(m, dict) and m.get("type", "Fiducial") == "Fiducial"]
    if not point_lists:
        kinds = sorted({str(m.get("type")) for m in markups if isinstance(m, dict)})
        found = f"only {', '.join(kinds)} markups" if kinds else "no markups"
        msg = f"{path} holds {found}; landmarks must be a point list (Slicer markups type 'Fiducial')"
        raise ValueError(msg)
    if len(point_lists) > 1:
        logger.warning("%s holds %d point lists; reading the first one", path, len(point_lists))
    return point_lists[0]


def _units_scale(path: Path, units: Any) -> float:
    if isinstance(units, list) and units:
        units = units[0]
    if units in (None, "mm"):
        return 1.0
    if units == "um":
        return 1e-3
    msg = f"{path} uses coordinate units {units!r}; only millimetres (mm) and micrometres (um) are supported"
    raise ValueError(msg)


def read_mrk_json(path: str | os.PathLike[str], *, dimension: int | None = None) -> Landmarks:
    """Read the first point list of a Slicer markups JSON file (``.mrk.json``).

    Args:
        path: the file.
        dimension: 2 to keep only x and y (landmarks of a 2D image, stored with z = 0);
            3 or None for 3D landmarks.

    Returns:
        Landmarks in LPS mm; labels become names; points that are missing, undefined or
        still being placed are NaN. Descriptions lose their ``confidence=...`` and
        ``corrected=yes`` tokens, which fill ``confidences`` and ``corrected``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a markups file, no point list, unknown coordinate
            system or units, malformed positions, repeated labels.
    """
    path = Path(path).expanduser()
    markup = _choose_point_list(path, _load_json(path))
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    if system not in ("LPS", "RAS"):
        msg = f'{path} uses the coordinate system {system!r}; only "LPS" and "RAS" are supported'
        raise ValueError(msg)
    scale = _units_scale(path, markup.get("coordinateUnits"))
    points = markup.get("controlPoints", [])
    if not isinstance(points, list):
        msg = f"{path}: 'controlPoints' must be a list"
        raise ValueError(msg)

    names: list[str] = []
    descriptions: list[str] = []
    positions = np.full((len(points), 3), np.nan)
    for row, point in enumerate(points):
        label = str(point.get("label") or "").strip() or f"L{row + 1}"
        names.append(label)
        descriptions.append(str(point.get("description") or ""))
        status = str(point.get("positionStatus", "defined"))
        position = point.get("position")
        # "missing" (skipped), "undefined" (not placed) and "preview" (being placed) all
        # mean that nobody has confirmed a position for this landmark.
        if status != "defined" or position in (None, "", []):
            continue
        if not isinstance(position, list) or len(position) != 3:
            msg = f"{path}: point {label!r} has position {position!r}; expected 3 numbers"
            raise ValueError(msg)
        try:
            positions[row] = [float(v) * scale for v in position]
        except (TypeError, ValueError) as error:
            msg = f"{path}: point {label!r} has a position that is not numeric: {position!r}"
            raise ValueError(msg) from error
    if system == "RAS":
        positions = ras_to_lps(positions)
    return _landmarks_from_rows(path, names, positions, descriptions, dimension)


def _default_node_name(path: Path) -> str:
    name = path.name
    for suffix in (".mrk.json", ".json", ".fcsv"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def mrk_json_text(
    landmarks: Landmarks,
    *,
    coordinate_system: CoordinateSystem = "LPS",
    node_name: str = "Landmarks",
    locked: bool = False,
    fixed_number_of_points: bool = True,
    low_confidence_threshold: float | None = None,
) -> str:
    """The ``.mrk.json`` document for ``landmarks`` as text; see :func:`write_mrk_json`."""
    positions = _to_frame(landmarks, coordinate_system)
    confidences, low, corrected, expected = _point_flags(landmarks, low_confidence_threshold)
    # Slicer writes the orientation of a point in the file frame; identity in RAS.
    orientation = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0] if coordinate_system == "LPS" else [
        1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0,
    ]  # fmt: skip
    control_points = []
    for row, name in enumerate(landmarks.names):
        missing = bool(landmarks.missing[row])
        control_points.append(
            {
                "id": str(row + 1),
                "label": name,
                "description": compose_point_description(
                    landmarks.descriptions[row], confidences[row], low=low[row], corrected=corrected[row],
                    expected_error=expected[row],
                ),
                "associatedNodeID": "",
                "position": "" if missing else [float(v) for v in positions[row]],
                "orientation": orientation,
                # Unselected points are drawn in the list's second colour, which makes the
                # points that need checking stand out in the views.
                "selected": not low[row],
                "locked": bool(locked and not low[row]),
                "visibility": True,
                "positionStatus": "missing" if missing else "defined",
            }
        )
    document = {
        "@schema": MARKUPS_SCHEMA_URL,
        "markups": [
            {
                "type": "Fiducial",
                "name": node_name,
                "coordinateSystem": coordinate_system,
                "coordinateUnits": "mm",
                "locked": bool(locked),
                "fixedNumberOfControlPoints": bool(fixed_number_of_points),
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(control_points),
                "controlPoints": control_points,
                "measurements": [],
            }
        ],
    }
    return json.dumps(document, indent=4) + "\n"


def write_mrk_json(
    landmarks: Landmarks,
    path: str | os.PathLike[str],
    *,
    coordinate_system: CoordinateSystem = "LPS",
    node_name: str | None = None,
    locked: bool = False,
    fixed_number_of_points: bool = True,
    low_confidence_threshold: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write landmarks as a Slicer markups point list (``.mrk.json``) that Slicer loads as is.

    Args:
        landmarks: LPS mm; 2D landmarks are written with z = 0.
        path: destination file, normally ending in ``.mrk.json``.
        coordinate_system: frame of the positions in the file, ``"LPS"`` (Slicer's
            default) or ``"RAS"``; Slicer reads both.
        node_name: name of the point list in Slicer; default: the file name without extension.
        locked: lock the list and its points against moving in Slicer (low-confidence points
            stay unlocked so they can be corrected).
        fixed_number_of_points: forbid adding or deleting points in Slicer, so the landmark
            set stays complete; points can still be moved or marked missing.
        low_confidence_threshold: points whose confidence is below it get the note
            "low confidence: please check", are unselected (drawn in the other colour)
            and unlocked.
        overwrite: replace an existing file.

    Each point's description is the landmark description followed by
    ``confidence=0.930`` when a confidence is known and ``corrected=yes`` for corrected points.
    Missing landmarks get ``"positionStatus": "missing"`` and no position.

    Returns:
        The written path.
    """
    path = check_writable(path, overwrite=overwrite)
    text = mrk_json_text(
        landmarks,
        coordinate_system=coordinate_system,
        node_name=node_name if node_name is not None else _default_node_name(path),
        locked=locked,
        fixed_number_of_points=fixed_number_of_points,
        low_confidence_threshold=low_confidence_threshold,
    )
    return atomic_write_text(path, text, overwrite=overwrite)


# --------------------------------------------------------------------------- .fcsv


def _fcsv_coordinate_system(path: Path, value: str) -> str:
    value = value.strip().upper()
    if value in ("0", "RAS"):
        return "RAS"
    if value in ("1", "LPS"):
        return "LPS"
    msg = f"{path} uses the coordinate system {value!r}; only RAS (0) and LPS (1) are supported"
    raise ValueError(msg)


def read_fcsv(path: str | os.PathLike[str], *, dimension: int | None = None) -> Landmarks:
    """Read a Slicer fiducial CSV file (``.fcsv``, version 4.6 and later).

    Args:
        path: the file.
        dimension: 2 to keep only x and y; 3 or None for 3D landmarks.

    Returns:
        Landmarks in LPS mm; column ``label`` gives the names, ``desc`` the descriptions.
        Points with NaN coordinates or a missing/undefined position status are NaN.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown coordinate system, non-numeric coordinates, repeated labels.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Landmark file not found: {path}"
        raise FileNotFoundError(msg)
    text = path.read_text(encoding="utf-8-sig")
    system = "RAS"  # Slicer's assumption when the header does not say
    columns = list(_FCSV_COLUMNS)
    data_lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                system = _fcsv_coordinate_system(path, value)
            elif key.strip().lower() == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            data_lines.append(line)
    index = {name: i for i, name in enumerate(columns)}
    for required in ("x", "y", "z"):
        if required not in index:
            msg = f"{path}: the columns line has no {required!r} column"
            raise ValueError(msg)
    # Slicer 5 appends the position status after the named columns without naming it.
    status_column = index.get("positionStatus", len(columns))

    names: list[str] = []
    descriptions: list[str] = []
    positions = np.full((len(data_lines), 3), np.nan)
    for row, fields in enumerate(csv.reader(data_lines)):
        values = {name: fields[i] if i < len(fields) else "" for name, i in index.items()}
        label = values.get("label", "").strip() or f"L{row + 1}"
        names.append(label)
        descriptions.append(values.get("desc", ""))
        status = fields[status_column].strip() if status_column < len(fields) else ""
        if status not in ("", str(_FCSV_STATUS_DEFINED)):
            continue
        try:
            positions[row] = [float(values[axis]) for axis in ("x", "y", "z")]
        except ValueError as error:
            msg = f"{path}, line of point {label!r}: coordinates are not numbers ({error})"
            raise ValueError(msg) from error
    if system == "RAS":
        positions = ras_to_lps(positions)
    return _landmarks_from_rows(path, names, positions, descriptions, dimension)


def _csv_line(values: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _number(value: float) -> str:
    """Shortest text that reads back as the same float; empty for NaN."""
    return repr(float(value)) if math.isfinite(value) else ""


def write_fcsv(
    landmarks: Landmarks,
    path: str | os.PathLike[str],
    *,
    coordinate_system: CoordinateSystem = "LPS",
    locked: bool = False,
    low_confidence_threshold: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write landmarks as a Slicer fiducial CSV file (``.fcsv``, version 4.6 layout).

    The coordinate system is written as a number (0 = RAS, 1 = LPS), which every Slicer
    version reads correctly. Missing points get NaN coordinates and position status 3
    (missing) in the column after ``associatedNodeID``, as Slicer 5 writes them.
    Descriptions carry ``confidence=...`` tokens as in :func:`write_mrk_json`.

    Returns:
        The written path.
    """
    path = check_writable(path, overwrite=overwrite)
    positions = _to_frame(landmarks, coordinate_system)
    confidences, low, corrected, expected = _point_flags(landmarks, low_confidence_threshold)
    lines = [
        "# Markups fiducial file version = 4.6\n",
        f"# CoordinateSystem = {0 if coordinate_system == 'RAS' else 1}\n",
        f"# columns = {','.join(_FCSV_COLUMNS)}\n",
    ]
    for row, name in enumerate(landmarks.names):
        missing = bool(landmarks.missing[row])
        coordinates = ["NaN"] * 3 if missing else [_number(v) for v in positions[row]]
        description = compose_point_description(
            landmarks.descriptions[row], confidences[row], low=low[row], corrected=corrected[row],
                    expected_error=expected[row],
        )
        lines.append(
            _csv_line(
                [
                    str(row + 1),
                    *coordinates,
                    "0", "0", "0", "1",  # orientation as angle and axis (ow, ox, oy, oz): none
                    "1",
                    "0" if low[row] else "1",
                    "1" if locked and not low[row] else "0",
                    name,
                    description,
                    "",
                    str(_FCSV_STATUS_MISSING if missing else _FCSV_STATUS_DEFINED),
                ]
            )
        )  # fmt: skip
    return atomic_write_text(path, "".join(lines), overwrite=overwrite)


# --------------------------------------------------------------------------- challenge CSV


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _table_rows(path: Path) -> list[list[str]]:
    """The non-empty rows of a landmark table, refusing a file that would be misread.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8 text, or cells separated by ';' or tabs.
    """
    if not path.is_file():
        msg = f"Landmark file not found: {path}"
        raise FileNotFoundError(msg)
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            rows = [r for r in csv.reader(stream) if r and any(cell.strip() for cell in r)]
    except UnicodeDecodeError as error:
        msg = f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8 (CSV UTF-8 in Excel)"
        raise ValueError(msg) from error
    if any(";" in cell or "\t" in cell for row in rows for cell in row):
        # European spreadsheets save with ";" (and decimal commas): read as commas, it would be misread.
        msg = f"{path} separates its cells with ';' or tabs; the table takes commas and decimal points (id,x1,y1,...)"
        raise ValueError(msg)
    return rows


def _names_columns(row: Sequence[str]) -> bool:
    """Whether a table's first row is a header: a coordinate cell that is not a number."""
    return not all(_is_number(cell) or not cell.strip() for cell in row[1:])


def landmark_csv_header(path: str | os.PathLike[str]) -> list[str] | None:
    """The column names of a landmark table (see :func:`read_landmark_csv`), or None where its
    first row is data.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_landmark_csv`.
    """
    rows = _table_rows(Path(path).expanduser())
    return [cell.strip() for cell in rows[0]] if rows and _names_columns(rows[0]) else None


def read_landmark_csv(
    path: str | os.PathLike[str],
    *,
    dimension: int,
    names: Sequence[str] | None = None,
) -> dict[str, Landmarks]:
    """Read a challenge-style CSV: one row per image, ``id,x1,y1[,z1],x2,y2,...``.

    A header row (first row with non-numeric coordinates) is skipped. NaN or empty cells
    mark a missing landmark. The coordinates are returned as they are written: LPS mm, or
    pixel indices that ``dataset.load_cases(units="pixel")`` maps through each image's geometry.

    Args:
        path: the file.
        dimension: 2 or 3 coordinates per landmark.
        names: landmark names; default ``L1..LN``.

    Returns:
        Landmarks per image id, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: rows of different lengths, non-numeric cells, repeated ids, wrong ``names``.
    """
    path = Path(path).expanduser()
    if dimension not in (2, 3):
        msg = f"dimension must be 2 or 3, got {dimension!r}"
        raise ValueError(msg)
    rows = _table_rows(path)
    if rows and _names_columns(rows[0]):
        rows = rows[1:]

    result: dict[str, Landmarks] = {}
    count: int | None = None
    for line_number, row in enumerate(rows, start=1):
        image_id = row[0].strip()
        cells = [c.strip() for c in row[1:]]
        while len(cells) % dimension and cells and not cells[-1]:
            cells.pop()  # a trailing comma is not a coordinate
        if len(cells) % dimension:
            msg = f"{path}, row {image_id!r}: {len(cells)} coordinates is not a multiple of {dimension}"
            raise ValueError(msg)
        if count is None:
            count = len(cells) // dimension
            if names is not None and len(names) != count:
                msg = f"{path} has {count} landmarks per row but {len(names)} names were given"
                raise ValueError(msg)
        elif len(cells) // dimension != count:
            msg = (
                f"{path}, row {image_id!r}: {len(cells) // dimension} landmarks, "
                f"but earlier rows have {count}"
            )
            raise ValueError(msg)
        if image_id in result:
            msg = f"{path}: the image id {image_id!r} appears twice (row {line_number})"
            raise ValueError(msg)
        try:
            values = np.array([float(c) if c else np.nan for c in cells], dtype=float)
        except ValueError as error:
            msg = f"{path}, row {image_id!r}: a coordinate is not a number ({error})"
            raise ValueError(msg) from error
        positions = values.reshape(count, dimension)
        result[image_id] = Landmarks.from_positions(positions, names=names)
    return result


def write_landmark_csv(
    rows: Mapping[str, Landmarks], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a challenge-style CSV (no header): ``id,x1,y1[,z1],...`` in LPS mm.

    Missing landmarks are empty cells. All landmark sets must have the same names in the
    same order (that order is the column order).
    """
    path = check_writable(path, overwrite=overwrite)
    lines = []
    reference: Landmarks | None = None
    for image_id, landmarks in rows.items():
        if reference is None:
            reference = landmarks
        elif landmarks.names != reference.names or landmarks.dimension != reference.dimension:
            msg = (
                f"Cannot write {path.name}: image {image_id!r} has different landmarks "
                "(names or dimension) from the first image; every row must have the same columns"
            )
            raise ValueError(msg)
        lines.append(_csv_line([str(image_id), *(_number(v) for v in landmarks.positions.reshape(-1))]))
    return atomic_write_text(path, "".join(lines), overwrite=overwrite)


def write_detection_summary_csv(
    results: Sequence[tuple[str, Landmarks]], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write detection results in long format, one row per image and landmark.

    Columns: ``image,landmark,x_lps,y_lps,z_lps,x_ras,y_ras,z_ras,confidence,expected_error_mm,check,missing``;
    coordinates in mm, z empty for 2D, coordinates empty for missing landmarks,
    ``expected_error_mm`` empty where the model gives none; ``check`` (the detector asks a
    person to check the point) and ``missing`` are ``true`` or ``false``.
    """
    path = check_writable(path, overwrite=overwrite)
    lines = [_csv_line(SUMMARY_HEADER)] + _summary_rows(results)
    return atomic_write_text(path, "".join(lines), overwrite=overwrite)


SUMMARY_HEADER = "image,landmark,x_lps,y_lps,z_lps,x_ras,y_ras,z_ras,confidence,expected_error_mm,check,missing".split(",")
# Written before expected errors existed; merged into the current columns.
_SUMMARY_HEADER_V1 = "image,landmark,x_lps,y_lps,z_lps,x_ras,y_ras,z_ras,confidence,missing".split(",")


def merge_detection_summary_csv(results: Sequence[tuple[str, Landmarks]], path: str | os.PathLike[str]) -> Path:
    """Add detection results to a summary CSV (see :func:`write_detection_summary_csv`), keeping every earlier row.

    Rows of an image that ``results`` holds again are replaced by the new ones; all other rows
    stay, in their order. Runs into the same folder at the same time are serialised by a file
    lock, so neither loses the other's rows; the file is replaced atomically.

    Raises:
        ValueError: the existing file is not a detection summary (it is left as it is).
    """
    path = check_writable(path, overwrite=True)
    new_images = {str(image_id) for image_id, _ in results}
    with file_lock(path):
        kept: list[str] = []
        if path.exists():
            text = path.read_text(encoding="utf-8")
            rows = list(csv.reader(io.StringIO(text)))
            if not rows or rows[0] not in (SUMMARY_HEADER, _SUMMARY_HEADER_V1):
                msg = f"{path} exists but is not a landmarks summary written by SCNLandmarks; move it away or choose another folder"
                raise ValueError(msg)
            upgrade = rows[0] == _SUMMARY_HEADER_V1
            kept = [_csv_line([*row[:9], "", "", row[9]] if upgrade and len(row) == 10 else row)
                    for row in rows[1:] if row and row[0] not in new_images]
        lines = [_csv_line(SUMMARY_HEADER), *kept, *_summary_rows(results)]
        return atomic_write_text(path, "".join(lines), overwrite=True)


def _summary_rows(results: Sequence[tuple[str, Landmarks]]) -> list[str]:
    lines = []
    for image_id, landmarks in results:
        lps = np.full((len(landmarks), 3), np.nan)
        lps[:, : landmarks.dimension] = landmarks.positions
        ras = lps_to_ras(lps)
        for row, name in enumerate(landmarks.names):
            confidence = landmarks.confidences[row] if landmarks.confidences is not None else math.nan
            expected = landmarks.expected_errors[row] if landmarks.expected_errors is not None else math.nan
            check = bool(landmarks.check[row]) if landmarks.check is not None else False
            lines.append(
                _csv_line(
                    [
                        str(image_id),
                        name,
                        *(_number(v) for v in lps[row]),
                        *(_number(v) for v in ras[row]),
                        _number(confidence),
                        _number(round(expected, 2) if math.isfinite(expected) else expected),
                        "true" if check else "false",
                        "true" if landmarks.missing[row] else "false",
                    ]
                )
            )
    return lines


# --------------------------------------------------------------------------- dispatch


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".json"):
        return "json"
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith(".csv"):
        msg = (
            f"{path.name} is a CSV table with one row per image; read it with read_landmark_csv, "
            "giving the dimension and units"
        )
        raise ValueError(msg)
    msg = f"Unknown landmark file type: {path.name}; use .mrk.json (Slicer markups) or .fcsv"
    raise ValueError(msg)


def read_landmarks(path: str | os.PathLike[str], *, dimension: int | None = None) -> Landmarks:
    """Read a landmark file by extension: ``.mrk.json``/``.json`` or ``.fcsv``.

    ``dimension=2`` keeps x and y only (landmarks of a 2D image).
    """
    path = Path(path).expanduser()
    if _kind(path) == "json":
        return read_mrk_json(path, dimension=dimension)
    return read_fcsv(path, dimension=dimension)


def write_landmarks(
    landmarks: Landmarks,
    path: str | os.PathLike[str],
    *,
    coordinate_system: CoordinateSystem = "LPS",
    low_confidence_threshold: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a landmark file by extension: ``.mrk.json``/``.json`` or ``.fcsv``."""
    path = Path(path).expanduser()
    if _kind(path) == "json":
        return write_mrk_json(
            landmarks,
            path,
            coordinate_system=coordinate_system,
            low_confidence_threshold=low_confidence_threshold,
            overwrite=overwrite,
        )
    return write_fcsv(
        landmarks,
        path,
        coordinate_system=coordinate_system,
        low_confidence_threshold=low_confidence_threshold,
        overwrite=overwrite,
    )
