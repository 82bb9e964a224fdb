"""A model file's description, read without torch: for model lists that must open at once.

A model file is a PyTorch zip archive whose ``data.pkl`` holds a dictionary of plain values and
tensors (see :mod:`.model_file`). Its description is a JSON string in that dictionary. Here the
pickle is read with an unpickler that knows no classes at all: every reference to a torch
function or storage becomes an inert placeholder (tensors come back as ``None``) and any other
class is refused, so reading a header never runs code and never imports torch (which takes
seconds, and may be missing or broken). Loading the weights still goes through
:func:`~SCNLandmarksLib.model_file.load_model`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

from .errors import ModelFileError

__all__ = ["FORMAT_TAG", "FORMAT_VERSION", "MODEL_SUFFIX", "check_archive", "check_description", "check_format", "read_header"]

MODEL_SUFFIX = ".scn.pt"
FORMAT_TAG = "scn-landmarks-model"
FORMAT_VERSION = 2
# The archive's data record is ``<folder>/data.pkl``; a pickle this large is not one of ours.
_MAX_PICKLE_BYTES = 64 * 1024 * 1024


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


def check_archive(path: Path) -> None:
    """Refuse, with the reason, what cannot be a model file before reading it."""
    if not path.exists():
        msg = f"Model file not found: {path}"
        raise ModelFileError(msg)
    if path.is_dir():
        msg = f"Expected a model file but {path} is a folder"
        raise ModelFileError(msg)
    if not zipfile.is_zipfile(path):
        msg = f"{path} is not an SCNLandmarks model file (it is not a PyTorch archive, or it is truncated)"
        raise ModelFileError(msg)


def check_format(path: Path, payload: object) -> dict[str, object]:
    """The payload, when it is an SCNLandmarks model of a format this version reads."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        msg = f"{path} is a PyTorch file but not an SCNLandmarks model (no '{FORMAT_TAG}' tag)"
        raise ModelFileError(msg)
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        msg = f"{path} was written by a newer SCNLandmarks (format {version}); update SCNLandmarks to use it"
        raise ModelFileError(msg)
    return payload


def _read_record(path: Path) -> dict[str, object]:
    check_archive(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1 or archive.getinfo(names[0]).file_size > _MAX_PICKLE_BYTES:
                msg = f"{path} is a zip archive but not a PyTorch model file"
                raise ModelFileError(msg)
            payload = _HeaderUnpickler(io.BytesIO(archive.read(names[0]))).load()
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


def read_header(path: str | Path) -> dict[str, object]:
    """The JSON description of a model file (landmarks, grid, provenance), without torch.

    Raises:
        ModelFileError: missing, truncated, foreign, newer or damaged file, with the reason.
    """
    payload = _read_record(Path(path))
    return check_description(path, str(payload.get("description", "")), payload.get("description_sha256"))
