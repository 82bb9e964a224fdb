"""Training cases on disk: the folder the Slicer module collects and the worker trains from.

Layout (one sub-folder per case; the folder name is the case name)::

    <cases folder>/
        patient01/
            image.nrrd          the image, float32, full geometry (LPS)
            landmarks.mrk.json  Slicer point list, LPS; missing points have positionStatus "missing"
            case.json           dimension, landmark names that a person corrected, provenance

Which points were corrected is kept twice on purpose: as a ``corrected=yes`` token in the
point description of ``landmarks.mrk.json`` (so it survives opening and re-saving the file in
Slicer) and as a name list in ``case.json`` (the authoritative copy, read first).

A case is written into a hidden temporary folder and renamed into place when complete, so
a crash never leaves a half-written case that training would pick up. Hidden folders
(starting with ".") are ignored when listing.

The default folder is ``~/.SCNLandmarks/cases``; ``SCN_CASES_DIR`` overrides it.
SimpleITK is imported only by the functions that read or write images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.atomic import atomic_write_text
from .landmarks import Landmarks
from ..common.user_folders import user_data_folder

if TYPE_CHECKING:
    from ..imaging.image import Image
    from .training_case import TrainingCase

__all__ = [
    "CASE_FILE",
    "IMAGE_FILE",
    "LANDMARKS_FILE",
    "CaseInfo",
    "default_cases_folder",
    "image_fingerprint",
    "list_cases",
    "read_case",
    "read_case_info",
    "read_training_cases",
    "remove_case",
    "safe_case_name",
    "unique_case_name",
    "write_case",
]

log = logging.getLogger(__name__)

IMAGE_FILE = "image.nrrd"
LANDMARKS_FILE = "landmarks.mrk.json"
CASE_FILE = "case.json"
CASES_ENV = "SCN_CASES_DIR"
_FORMAT = "scn-landmarks-case"
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def default_cases_folder(*, create: bool = False) -> Path:
    """``SCN_CASES_DIR`` or ``~/.SCNLandmarks/cases``; created when ``create`` is True."""
    return user_data_folder("cases", environment_variable=CASES_ENV, create=create)


def safe_case_name(name: str) -> str:
    """``name`` usable as a folder name on every system (other characters become ``_``)."""
    cleaned = _UNSAFE.sub("_", str(name)).strip(" .")
    return cleaned[:100] or "case"


def unique_case_name(folder: str | os.PathLike[str], name: str) -> str:
    """``safe_case_name(name)``, with ``-2``, ``-3``... appended while that folder exists."""
    folder = Path(folder)
    base = safe_case_name(name)
    candidate, number = base, 1
    while (folder / candidate).exists():
        number += 1
        candidate = f"{base}-{number}"
    return candidate


@dataclass
class CaseInfo:
    """What the case list shows about one stored case (read without loading the image).

    Attributes:
        name: case name (= folder name).
        folder: the case folder.
        dimension: 2 or 3.
        landmark_names: landmark names in file order.
        num_defined: landmarks with a position.
        num_missing: landmarks marked missing (excluded from training).
        corrected_names: landmarks a person moved after detection.
        created: ISO time the case was stored.
        metadata: provenance (source volume name, model, ...), free form.
        image_sha256: :func:`image_fingerprint` of its image ("" for cases stored before it was kept).
        replaced: the cases of the same image this one replaced when it was written.
        error: why the case cannot be read, or None.
    """

    name: str
    folder: Path
    dimension: int = 0
    landmark_names: list[str] = field(default_factory=list)
    num_defined: int = 0
    num_missing: int = 0
    corrected_names: list[str] = field(default_factory=list)
    created: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    image_sha256: str = ""
    replaced: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def num_corrected(self) -> int:
        return len(self.corrected_names)

    @property
    def image_path(self) -> Path:
        return self.folder / IMAGE_FILE

    @property
    def landmarks_path(self) -> Path:
        return self.folder / LANDMARKS_FILE

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["folder"] = str(self.folder)
        values["num_corrected"] = self.num_corrected
        return values


def image_fingerprint(image: Image) -> str:
    """SHA-256 of an image's pixels (as float32) and geometry: equal for the same image stored twice."""
    geometry = image.geometry
    digest = hashlib.sha256()
    digest.update(json.dumps([list(geometry.size), [round(float(v), 6) for v in (*geometry.spacing, *geometry.origin,
                                                                              *geometry.direction)]]).encode())
    digest.update(np.ascontiguousarray(image.array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def write_case(
    folder: str | os.PathLike[str],
    name: str,
    image: Image,
    landmarks: Landmarks,
    *,
    metadata: dict[str, Any] | None = None,
    unique: bool = True,
    replace_same_image: bool = False,
) -> CaseInfo:
    """Store one training case atomically.

    Args:
        folder: the cases folder (created when missing).
        name: case name; made safe for file systems; with ``unique`` a clash gets a
            ``-2``, ``-3``... suffix, without it a clash is an error.
        image: the image (2D or 3D), LPS geometry.
        landmarks: LPS mm, same dimension as ``image``; NaN rows are missing landmarks;
            ``landmarks.corrected`` marks the points a person moved.
        metadata: provenance stored in ``case.json`` (e.g. source volume, model).
        replace_same_image: the same image stored twice would be trained on and held out at once
            when fine-tuning checks itself on the folds, so a stored case of the same image
            (:func:`image_fingerprint`) is replaced by this one (which takes its name), but only
            where this one continues it: the same landmarks, and every point corrected there
            corrected here too. Otherwise nothing is written (a newer detection must not wipe out
            a person's corrections).

    Returns:
        The stored case's info.

    Raises:
        ValueError: image and landmarks disagree in dimension, or no landmark is placed.
        FileExistsError: ``unique`` is False and the case exists, or ``replace_same_image`` finds
            a case of this image that this one does not continue (the message says which).
    """
    from ..imaging.image_io import write_image  # SimpleITK
    from .landmark_io import write_mrk_json

    if landmarks.dimension != image.dimension:
        msg = f"The image is {image.dimension}D but its landmarks are {landmarks.dimension}D"
        raise ValueError(msg)
    if landmarks.missing.all():
        msg = "Every landmark of this case is missing; place at least one before adding it as a training case"
        raise ValueError(msg)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = image_fingerprint(image)
    same_image = [info for info in list_cases(folder) if info.image_sha256 == fingerprint] if replace_same_image else []
    corrected = landmarks.corrected if landmarks.corrected is not None else np.zeros(len(landmarks), bool)
    corrected_here = {n for n, c, m in zip(landmarks.names, corrected, landmarks.missing) if c and not m}
    for old in same_image:
        lost = sorted(set(old.corrected_names) - corrected_here)
        if old.landmark_names != list(landmarks.names) or lost:
            why = (f"its corrections of {', '.join(lost)} are not in this point list" if lost
                   else "it has other landmarks")
            msg = (f"This image is stored already as the training case {old.name!r}, and {why}: it is kept. To "
                   f"replace it, remove the case {old.name!r} first")
            raise FileExistsError(msg)
    case_name = unique_case_name(folder, name) if unique else safe_case_name(name)
    final = folder / case_name
    if final.exists():
        msg = f"A training case named {case_name!r} already exists in {folder}"
        raise FileExistsError(msg)
    corrected_names = [n for n, c, m in zip(landmarks.names, corrected, landmarks.missing) if c and not m]
    document = {
        "format": _FORMAT,
        "format_version": 1,
        "name": case_name,
        "dimension": image.dimension,
        "landmarks": list(landmarks.names),
        "corrected": corrected_names,
        "missing": [n for n, m in zip(landmarks.names, landmarks.missing) if m],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "image_sha256": fingerprint,
        "metadata": dict(metadata or {}),
    }
    temporary = folder / f".tmp-{uuid.uuid4().hex}-{case_name}"
    temporary.mkdir()
    try:
        write_image(image, temporary / IMAGE_FILE)
        write_mrk_json(landmarks, temporary / LANDMARKS_FILE, node_name=case_name)
        atomic_write_text(temporary / CASE_FILE, json.dumps(document, indent=2) + "\n")
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    # Only now that the new case is complete do the earlier ones of the same image go.
    for old in same_image:
        try:
            remove_case(folder, old.name)
        except OSError as error:  # the new case is stored; the old one stays beside it, said so
            log.warning("The earlier case %s of this image could not be removed: %s", old.name, error)
    if same_image and not (folder / same_image[0].name).exists():
        os.rename(final, folder / same_image[0].name)
        final = folder / same_image[0].name
        document["name"] = final.name
        atomic_write_text(final / CASE_FILE, json.dumps(document, indent=2) + "\n", overwrite=True)
    info = read_case_info(final)
    info.replaced = [old.name for old in same_image]
    return info


def _read_document(case_folder: Path) -> dict[str, Any]:
    path = case_folder / CASE_FILE
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        msg = f"{path} is damaged ({error})"
        raise ValueError(msg) from error
    return document if isinstance(document, dict) else {}


def _read_landmarks(case_folder: Path, document: dict[str, Any]) -> Landmarks:
    from .landmark_io import read_mrk_json

    path = case_folder / LANDMARKS_FILE
    if not path.is_file():
        msg = f"The training case {case_folder.name} has no {LANDMARKS_FILE}"
        raise FileNotFoundError(msg)
    dimension = document.get("dimension")
    landmarks = read_mrk_json(path, dimension=int(dimension) if dimension in (2, 3) else None)
    if "corrected" in document:
        corrected_names = set(document.get("corrected") or [])
        landmarks.corrected = np.array([n in corrected_names for n in landmarks.names], dtype=bool)
    return landmarks


def read_case_info(case_folder: str | os.PathLike[str]) -> CaseInfo:
    """Info about a stored case; a damaged case comes back with ``error`` set, not raised."""
    case_folder = Path(case_folder)
    info = CaseInfo(name=case_folder.name, folder=case_folder)
    try:
        document = _read_document(case_folder)
        landmarks = _read_landmarks(case_folder, document)
        if not (case_folder / IMAGE_FILE).is_file():
            msg = f"The training case {case_folder.name} has no {IMAGE_FILE}"
            raise FileNotFoundError(msg)
    except (OSError, ValueError) as error:
        info.error = str(error)
        return info
    corrected = landmarks.corrected if landmarks.corrected is not None else np.zeros(len(landmarks), bool)
    info.dimension = int(document.get("dimension") or landmarks.dimension)
    info.landmark_names = list(landmarks.names)
    info.num_missing = int(landmarks.missing.sum())
    info.num_defined = len(landmarks) - info.num_missing
    info.corrected_names = [n for n, c, m in zip(landmarks.names, corrected, landmarks.missing) if c and not m]
    info.created = str(document.get("created", ""))
    info.metadata = dict(document.get("metadata") or {})
    info.image_sha256 = str(document.get("image_sha256", ""))
    return info


def list_cases(folder: str | os.PathLike[str] | None = None) -> list[CaseInfo]:
    """All cases in ``folder`` (default :func:`default_cases_folder`), sorted by name."""
    folder = Path(folder).expanduser() if folder is not None else default_cases_folder()
    if not folder.is_dir():
        return []
    return [
        read_case_info(path)
        for path in sorted(folder.iterdir(), key=lambda p: p.name.lower())
        if path.is_dir() and not path.name.startswith(".")
    ]


def read_case(case_folder: str | os.PathLike[str]) -> tuple[Image, Landmarks]:
    """Load a stored case: the image (LPS geometry) and its landmarks (LPS mm, NaN = missing).

    Raises:
        FileNotFoundError, ValueError: missing or damaged files, naming the case.
    """
    from ..imaging.image_io import read_image  # SimpleITK

    case_folder = Path(case_folder)
    document = _read_document(case_folder)
    landmarks = _read_landmarks(case_folder, document)
    image = read_image(case_folder / IMAGE_FILE)
    if image.dimension != landmarks.dimension:
        image = image.as_dimension(landmarks.dimension)
    return image, landmarks


def read_training_cases(
    folder: str | os.PathLike[str] | None = None, names: Sequence[str] | None = None
) -> list[TrainingCase]:
    """Stored cases as :class:`~SCNLandmarksLib.data.training_case.TrainingCase` objects.

    Args:
        folder: the cases folder (default :func:`default_cases_folder`).
        names: only these cases (all when None).

    Raises:
        ValueError: no cases, an unknown name, or a damaged case (named in the message).
    """
    from .training_case import TrainingCase

    folder = Path(folder).expanduser() if folder is not None else default_cases_folder()
    available = {info.name: info for info in list_cases(folder)}
    wanted = list(names) if names is not None else sorted(available, key=str.lower)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        msg = f"No training case named {', '.join(unknown)} in {folder}"
        raise ValueError(msg)
    if not wanted:
        msg = f"There are no training cases in {folder}; add some corrected cases first"
        raise ValueError(msg)
    result = []
    for name in wanted:
        info = available[name]
        if info.error is not None:
            msg = f"The training case {name} cannot be used: {info.error}"
            raise ValueError(msg)
        image, landmarks = read_case(info.folder)
        result.append(TrainingCase(image=image, landmarks=landmarks, name=name))
    return result


def remove_case(folder: str | os.PathLike[str], name: str) -> None:
    """Delete one stored case.

    Raises:
        FileNotFoundError: there is no case of that name.
    """
    case_folder = Path(folder).expanduser() / name
    if name != Path(name).name or name.startswith(".") or not case_folder.is_dir():
        msg = f"No training case named {name!r} in {folder}"
        raise FileNotFoundError(msg)
    # Renamed first so that a half-deleted case is hidden from listing and training at once.
    trash = case_folder.with_name(f".deleting-{uuid.uuid4().hex}-{name}")
    os.rename(case_folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
