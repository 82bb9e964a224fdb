"""A model file's description, read without torch: for model lists that must open at once.

A model file is a PyTorch zip archive whose ``data.pkl`` holds a dictionary of plain values and
tensors (see :mod:`.model_file`). Its description is a JSON string in that dictionary. Here the
pickle is read with an unpickler that knows no classes at all: every reference to a torch
function or storage becomes an inert placeholder (tensors come back as ``None``) and any other
class is refused, so reading a header never runs code and never imports torch (which takes
seconds, and may be missing or broken). Loading the weights still goes through
:func:`~SCNLandmarksLib.models.model_file.load_model`.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import ModelFileError

__all__ = [
    "FORMAT_TAG", "FORMAT_VERSION", "MODEL_SUFFIX", "ModelDescription", "check_archive", "check_description",
    "check_format", "read_header",
]

MODEL_SUFFIX = ".scn.pt"
FORMAT_TAG = "scn-landmarks-model"
# The newest format this version reads. A file records the oldest format that describes it
# (3: an error model with squared terms), so that older readers refuse only what they would misread.
FORMAT_VERSION = 3
# The archive's data record is ``<folder>/data.pkl``; a pickle this large is not one of ours.
_MAX_PICKLE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class ModelDescription(Mapping[str, Any]):
    """What a model file says about its model, apart from the weights: the one reader of the JSON.

    Each part the weights need (network, grid, intensity, landmarks, targets, local stage, shape
    and error models) is a field; the torch side turns them into modules (:mod:`.model_file`).
    It is also a read-only mapping of the file's JSON layout (``description["info"]``), the form
    that console users and older scripts know.

    Attributes:
        network: the network settings (``NetworkConfig.to_dict()``).
        grid_size: network input grid, voxels per axis, x, y[, z] order.
        grid_spacing: its mm per voxel, or None (fit the image into the grid).
        intensity: the intensity mapping (``IntensityConfig`` fields).
        landmark_names: one per output channel.
        landmark_definitions: the anatomical definition of each, "" where none was given.
        gamma: target heatmap scale.
        sigma_weight: weight of the sigma penalty in training.
        half_precision: the weights are stored as float16.
        refiner: the local stage's settings (``RefinerConfig.to_dict()``), or None.
        shape_model: the shape model's values, or None.
        error_model: the error model's values, or None.
        info: provenance (training data, measured accuracy, parent model, ...).
    """

    network: dict[str, Any]
    grid_size: tuple[int, ...]
    grid_spacing: tuple[float, ...] | None
    intensity: dict[str, Any]
    landmark_names: tuple[str, ...]
    landmark_definitions: tuple[str, ...]
    gamma: float
    sigma_weight: float
    half_precision: bool = False
    refiner: dict[str, Any] | None = None
    shape_model: dict[str, Any] | None = None
    error_model: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return int(self.network["dimension"])

    @property
    def num_landmarks(self) -> int:
        return len(self.landmark_names)

    @property
    def architecture(self) -> str:
        return str(self.network.get("architecture", "scn"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout written into model files."""
        return copy.deepcopy({
            "network": self.network,
            "grid": {"size": list(self.grid_size), "spacing": None if self.grid_spacing is None else list(self.grid_spacing)},
            "intensity": self.intensity,
            "landmarks": [{"name": n, "description": d} for n, d in zip(self.landmark_names, self.landmark_definitions)],
            "targets": {"gamma": self.gamma, "sigma_weight": self.sigma_weight},
            "half_precision": self.half_precision,
            "refiner": self.refiner,
            "shape_model": self.shape_model,
            "error_model": self.error_model,
            "info": self.info,
        })

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str | Path = "the model file") -> ModelDescription:
        """Read and check the JSON layout.

        Raises:
            ModelFileError: a part is missing or of the wrong kind, named in the message.
        """
        try:
            grid = values["grid"]
            landmarks = values["landmarks"]
            targets = values["targets"]
            network, intensity = dict(values["network"]), dict(values["intensity"])
            description = cls(
                network=network,
                grid_size=tuple(int(s) for s in grid["size"]),
                grid_spacing=None if grid.get("spacing") is None else tuple(float(s) for s in grid["spacing"]),
                intensity=intensity,
                landmark_names=tuple(str(item["name"]) for item in landmarks),
                landmark_definitions=tuple(str(item.get("description", "")) for item in landmarks),
                gamma=float(targets["gamma"]),
                sigma_weight=float(targets["sigma_weight"]),
                half_precision=bool(values.get("half_precision", False)),
                refiner=None if values.get("refiner") is None else dict(values["refiner"]),
                shape_model=None if values.get("shape_model") is None else dict(values["shape_model"]),
                error_model=None if values.get("error_model") is None else dict(values["error_model"]),
                info=dict(values.get("info") or {}),
            )
            description.dimension  # noqa: B018 - checked here, not at first use
            names = [item["name"] for item in landmarks]
            if any(not isinstance(name, str) or not name.strip() for name in names) or len(set(names)) != len(names):
                msg = "landmark names must be distinct and not empty"
                raise ValueError(msg)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            msg = f"{source} has an incomplete or invalid description ({type(error).__name__}: {error})"
            raise ModelFileError(msg) from error
        return description

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _placeholder(*_args: object, **_kwargs: object) -> None:
    return None


class _HeaderUnpickler(pickle.Unpickler):
    """Plain containers only; torch's tensor rebuilders and storage types become placeholders."""

    def find_class(self, module: str, name: str) -> object:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _placeholder
        msg = f"the file refers to {module}.{name}, which a model file never contains"
        raise pickle.UnpicklingError(msg)

    def persistent_load(self, pid: object) -> None:  # tensor storages live in other archive records
        return None


def check_archive(path: Path) -> str:
    """Refuse, with the reason, what cannot be a model file before reading it.

    Returns:
        The name of the archive's one pickle entry (``.../data.pkl``).
    """
    if not path.exists():
        msg = f"Model file not found: {path}"
        raise ModelFileError(msg)
    if path.is_dir():
        msg = f"Expected a model file but {path} is a folder"
        raise ModelFileError(msg)
    if not path.is_file():  # a pipe or device would block the reader
        msg = f"Expected a model file but {path} is not a regular file"
        raise ModelFileError(msg)
    if not zipfile.is_zipfile(path):
        msg = f"{path} is not an SCNLandmarks model file (it is not a PyTorch archive, or it is truncated)"
        raise ModelFileError(msg)
    with open(path, "rb") as stream:
        start = stream.read(4)
    if start != b"PK\x03\x04":  # a zip whose first bytes were changed or prefixed: torch would misread it
        msg = f"{path} is damaged: it does not begin as a PyTorch archive does"
        raise ModelFileError(msg)
    return _pickle_entry(path)


def _pickle_entry(path: Path) -> str:
    """The archive's one pickle entry (``.../data.pkl``), checked for count and size."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1 or archive.getinfo(names[0]).file_size > _MAX_PICKLE_BYTES:
                msg = f"{path} is a zip archive but not a PyTorch model file"
                raise ModelFileError(msg)
    except (zipfile.BadZipFile, OSError) as error:
        msg = f"{path} could not be read as a model file: {error}"
        raise ModelFileError(msg) from error
    return names[0]


def check_format(path: Path, payload: object) -> dict[str, object]:
    """The payload, when it is an SCNLandmarks model of a format this version reads."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        msg = f"{path} is a PyTorch file but not an SCNLandmarks model (no '{FORMAT_TAG}' tag)"
        raise ModelFileError(msg)
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        msg = f"{path} is damaged: its format number {version!r} is not one SCNLandmarks ever wrote"
        raise ModelFileError(msg)
    if version > FORMAT_VERSION:
        msg = f"{path} was written by a newer SCNLandmarks (format {version}); update SCNLandmarks to use it"
        raise ModelFileError(msg)
    return payload


def _read_record(path: Path) -> dict[str, object]:
    entry = check_archive(path)
    try:
        with zipfile.ZipFile(path) as archive:
            payload = _HeaderUnpickler(io.BytesIO(archive.read(entry))).load()
    except ModelFileError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        msg = f"{path} could not be read as a model file: {error}"
        raise ModelFileError(msg) from error
    return check_format(path, payload)


def check_description(path: str | Path, text: str, expected: object) -> dict[str, object]:
    """The parsed description, checked against its SHA-256 when the file has one."""
    if expected is not None and expected != hashlib.sha256(text.encode()).hexdigest():
        msg = (f"{path} is damaged: its description (landmark names, settings) does not match the checksum "
               "written when it was saved")
        raise ModelFileError(msg)
    try:
        description = json.loads(text)
    except json.JSONDecodeError as error:
        msg = f"{path} has a damaged description block"
        raise ModelFileError(msg) from error
    if not isinstance(description, dict):
        msg = f"{path} has a damaged description block"
        raise ModelFileError(msg)
    return description


def read_header(path: str | Path) -> ModelDescription:
    """The description of a model file (landmarks, grid, provenance), without torch.

    Raises:
        ModelFileError: missing, truncated, foreign, newer or damaged file, with the reason.
    """
    payload = _read_record(Path(path))
    values = check_description(path, str(payload.get("description", "")), payload.get("description_sha256"))
    return ModelDescription.from_dict(values, source=path)
