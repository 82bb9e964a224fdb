"""Where model files live, which ones there are, and fetching them safely.

Two folders hold models:

* **bundled**: ``<SCNLandmarks module folder>/Resources/Models``, shipped with the extension,
  described by ``models.json`` in that folder. ``SCN_MODELS_DIR`` overrides the folder
  (an offline site can point it to a shared drive).
* **user**: ``~/.SCNLandmarks/models`` by default, ``SCN_USER_MODELS_DIR`` overrides it.
  Fine-tuned models and models the user loads go here; nothing in it is ever overwritten.

``models.json`` is a list of entries (or ``{"models": [...]}``)::

    [{"name": "Cephalometric 2D", "file": "ceph2d.scn.pt", "sha256": "ab12...",
      "url": "https://.../ceph2d.scn.pt", "default": true, "description": "..."}]

``url`` is optional: a model whose file is not in the folder yet is fetched from it into the
user's folder the first time it is asked for by name (:func:`find_model`; the SHA-256, which
such an entry must give, is checked before the file appears).

Nothing here imports torch at module level, so listing folders works before torch is
installed; reading a model's description (``list_models``) needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..common.atomic import atomic_path
from .model_header import MODEL_SUFFIX
from ..common.progress import Progress, ProgressCallback, estimate_eta
from ..common.user_folders import user_data_folder

__all__ = [
    "CATALOG_FILE",
    "CatalogEntry",
    "ModelEntry",
    "bundled_models_folder",
    "default_model",
    "fetch_catalog_model",
    "fetch_model",
    "file_sha256",
    "find_model",
    "import_model_file",
    "list_models",
    "next_model_version_path",
    "read_catalog",
    "user_models_folder",
    "verify_sha256",
]

log = logging.getLogger(__name__)

CATALOG_FILE = "models.json"
BUNDLED_ENV = "SCN_MODELS_DIR"
USER_ENV = "SCN_USER_MODELS_DIR"
_VERSION_PATTERN = re.compile(r"^(?P<root>.*?)-ft(?P<number>\d{3,})$")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- folders


def bundled_models_folder() -> Path:
    """The folder of models shipped with the extension (``SCN_MODELS_DIR`` overrides it)."""
    override = os.environ.get(BUNDLED_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def user_models_folder(*, create: bool = False) -> Path:
    """The user's own models folder (``SCN_USER_MODELS_DIR`` overrides ``~/.SCNLandmarks/models``).

    Args:
        create: create the folder (and its parents) when it does not exist.
    """
    return user_data_folder("models", environment_variable=USER_ENV, create=create)


def _model_stem(path: Path) -> str:
    name = path.name
    return name[: -len(MODEL_SUFFIX)] if name.endswith(MODEL_SUFFIX) else path.stem


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class CatalogEntry:
    """One entry of ``models.json``.

    Attributes:
        name: name shown to the user.
        file: file name inside the bundled folder.
        sha256: expected SHA-256 of the file (hex), or "" when not given.
        url: where to fetch the file from when it is not present, or "".
        default: True for the model selected when the user has not chosen one.
        description: one line for the user.
    """

    name: str
    file: str
    sha256: str = ""
    url: str = ""
    default: bool = False
    description: str = ""


def read_catalog(folder: str | os.PathLike[str] | None = None) -> list[CatalogEntry]:
    """The entries of ``models.json`` in ``folder`` (default: the bundled folder).

    A missing or empty file means no entries.

    Raises:
        ValueError: the file is not valid JSON or an entry lacks ``name`` or ``file``.
    """
    folder = Path(folder) if folder is not None else bundled_models_folder()
    path = folder / CATALOG_FILE
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        return []
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        msg = f"The model catalog {path} is not valid JSON ({error})"
        raise ValueError(msg) from error
    items = document.get("models", []) if isinstance(document, dict) else document
    if not isinstance(items, list):
        msg = f"The model catalog {path} must hold a list of models"
        raise ValueError(msg)
    entries = []
    for number, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("name") or not item.get("file"):
            msg = f"Entry {number + 1} of the model catalog {path} needs a 'name' and a 'file'"
            raise ValueError(msg)
        file_name = str(item["file"])
        if Path(file_name).name != file_name or file_name in (".", "..") or not file_name.endswith(MODEL_SUFFIX):
            # A catalog must not point outside its folder.
            msg = f"Entry {item['name']!r} of {path}: 'file' must be a plain file name ending in {MODEL_SUFFIX}, got {file_name!r}"
            raise ValueError(msg)
        entries.append(
            CatalogEntry(
                name=str(item["name"]),
                file=file_name,
                sha256=str(item.get("sha256") or "").lower(),
                url=str(item.get("url") or ""),
                default=bool(item.get("default", False)),
                description=str(item.get("description") or ""),
            )
        )
    return entries


# --------------------------------------------------------------------------- listing


@dataclass
class ModelEntry:
    """A model the user can choose.

    Attributes:
        name: name shown to the user (catalog name, or the file name without ``.scn.pt``).
        path: the model file (may not exist yet for a catalog model that has a URL).
        source: ``"bundled"`` or ``"user"``.
        dimension: 2 or 3, None when the file could not be read.
        landmark_count: number of landmarks, None when the file could not be read.
        landmark_names: the landmark names in channel order.
        description: one line about the model (catalog text or training provenance).
        default: True for the catalog's default model.
        url: where a bundled model can be fetched from, or "".
        error: why the file cannot be used, or None when it can.
    """

    name: str
    path: Path
    source: str
    dimension: int | None = None
    landmark_count: int | None = None
    landmark_names: tuple[str, ...] = ()
    description: str = ""
    default: bool = False
    url: str = ""
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        """Short text for a model list: name, dimension and landmark count, or the problem."""
        if self.error is not None:
            return f"{self.name} (unusable: {self.error})"
        if self.dimension is None:
            return f"{self.name} ({self.source})"
        return f"{self.name} ({self.dimension}D, {self.landmark_count} landmarks, {self.source})"


def _describe_file(entry: ModelEntry) -> ModelEntry:
    from .model_header import read_header  # no torch: the list opens at once, torch or not

    try:
        description = read_header(entry.path)
        entry.dimension = description.dimension
        entry.landmark_names = description.landmark_names
        entry.landmark_count = description.num_landmarks
        if not entry.description:
            info = description.info
            training = info.get("training")
            if info.get("description"):
                entry.description = str(info["description"])
            elif isinstance(training, dict):
                mre = training.get("best_validation_mre_mm")
                entry.description = f"trained on {len(training.get('cases', []))} cases, " + (
                    f"{training.get('iterations')} iterations" + (f", validation MRE {mre:.2f} mm" if mre else "")
                )
    except Exception as error:  # noqa: BLE001 - one damaged file must not hide the others
        entry.error = str(error) or type(error).__name__
    return entry


def list_models(
    *,
    user_folder: str | os.PathLike[str] | None = None,
    bundled_folder: str | os.PathLike[str] | None = None,
) -> list[ModelEntry]:
    """All models: catalog (bundled) models first, then other bundled files, then the user's.

    Damaged or foreign files are listed with ``error`` set, never raised, so the user sees
    which file is wrong. A catalog model whose file is absent is listed with an error that
    says it has to be fetched.

    Args:
        user_folder: the user's models folder (default :func:`user_models_folder`).
        bundled_folder: the bundled models folder (default :func:`bundled_models_folder`).
    """
    bundled = Path(bundled_folder) if bundled_folder is not None else bundled_models_folder()
    user = Path(user_folder) if user_folder is not None else user_models_folder()
    entries: list[ModelEntry] = []
    listed: set[Path] = set()
    try:
        catalog = read_catalog(bundled)
    except ValueError as error:
        log.warning("%s", error)
        catalog = []
    for item in catalog:
        path = _catalog_file(item, bundled, user)
        entry = ModelEntry(item.name, path, "bundled", description=item.description, default=item.default, url=item.url)
        listed.add(path.resolve())
        if not path.is_file():
            entry.error = "not downloaded yet" if item.url else "file missing from the extension"
            entries.append(entry)
            continue
        entries.append(_describe_file(entry))
    for source, folder in (("bundled", bundled), ("user", user)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{MODEL_SUFFIX}")):
            if path.name.startswith(".") or path.resolve() in listed:
                continue  # hidden files are unfinished atomic writes
            listed.add(path.resolve())
            entries.append(_describe_file(ModelEntry(_model_stem(path), path, source)))
    return entries


def _catalog_file(item: CatalogEntry, bundled: Path, user: Path) -> Path:
    """Where a catalog model's file is: shipped in the bundled folder, or fetched into the user's.

    A file in the user's folder counts as the fetched model only when its SHA-256 is the
    catalog's: another file of that name (a user's own model) is never taken for it.
    """
    shipped = bundled / item.file
    fetched = user / item.file
    return fetched if item.url and not shipped.is_file() and _fetched_copy(fetched, item.sha256) else shipped


# SHA-256 of files already hashed, by (path, size, modification time): listing the models again
# does not read every fetched model again.
_KNOWN_DIGESTS: dict[tuple[str, int, int], str] = {}


def _fetched_copy(path: Path, sha256: str | None) -> bool:
    """True where ``path`` is a file whose SHA-256 is ``sha256`` (any file where the catalog gives none)."""
    if not path.is_file():
        return False
    if not sha256:
        return True
    status = path.stat()
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if key not in _KNOWN_DIGESTS:
        _KNOWN_DIGESTS[key] = file_sha256(path)
    return _KNOWN_DIGESTS[key] == sha256.strip().lower()


def fetch_catalog_model(
    name: str,
    *,
    user_folder: str | os.PathLike[str] | None = None,
    bundled_folder: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Path:
    """The file of the catalog model ``name``, fetched from its ``url`` into the user's folder first
    when it is not there yet (the bundled folder may be read-only).

    Raises:
        KeyError: no catalog model has that name.
        ValueError: the entry has no ``url`` or no ``sha256`` (an unchecked download is refused),
            or the downloaded bytes do not match it.
        FileExistsError: another file of the model's file name is in the user's folder.
        OSError: the download failed.
    """
    bundled = Path(bundled_folder) if bundled_folder is not None else bundled_models_folder()
    user = Path(user_folder) if user_folder is not None else user_models_folder()
    item = next((entry for entry in read_catalog(bundled) if entry.name == name), None)
    if item is None:
        raise KeyError(name)
    path = _catalog_file(item, bundled, user)
    if path.is_file():
        return path
    if not item.url or not item.sha256:
        msg = f"The model {name!r} is not installed and its catalog entry gives no address and checksum to fetch it from"
        raise ValueError(msg)
    taken = user / item.file
    if taken.exists():
        msg = (f"Your models folder holds another file named {item.file} ({taken}), not the catalog's model {name!r}; "
               "rename or move it, then fetch the model again")
        raise FileExistsError(msg)
    log.info("Fetching the model %r from %s", name, item.url)
    return fetch_model(item.url, user, sha256=item.sha256, file_name=item.file, progress=progress,
                       should_cancel=should_cancel)


def default_model(*, bundled_folder: str | os.PathLike[str] | None = None) -> Path | None:
    """The bundled model marked ``"default": true`` in ``models.json`` when its file is present.

    Falls back to the first catalog model that is present; None when there is none.
    """
    bundled = Path(bundled_folder) if bundled_folder is not None else bundled_models_folder()
    try:
        catalog = read_catalog(bundled)
    except ValueError as error:
        log.warning("%s", error)
        return None
    present = [entry for entry in catalog if (bundled / entry.file).is_file()]
    for entry in present:
        if entry.default:
            return bundled / entry.file
    return bundled / present[0].file if present else None


def find_model(
    name_or_path: str | os.PathLike[str] | None,
    *,
    user_folder: str | os.PathLike[str] | None = None,
    bundled_folder: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Resolve what a user typed to a model file.

    Args:
        name_or_path: an existing file path, a model name as :func:`list_models` shows it
            (catalog name or file stem), or None: the :func:`default_model`, else the first
            usable model of :func:`list_models` (a user who only loaded their own model).
            A catalog model that is not downloaded yet is fetched (:func:`fetch_catalog_model`).
        progress: reports a download.

    Raises:
        FileNotFoundError: nothing matches, with the names that exist.
    """
    if name_or_path is None or str(name_or_path) == "":
        found = default_model(bundled_folder=bundled_folder)
        if found is not None:
            return found
        usable = [e.path for e in list_models(user_folder=user_folder, bundled_folder=bundled_folder) if e.usable]
        if usable:
            return usable[0]
        msg = "No landmark model is installed yet; load a model file first ('Load model file...' in Slicer)"
        raise FileNotFoundError(msg)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    entries = list_models(user_folder=user_folder, bundled_folder=bundled_folder)
    for entry in entries:
        if text in (entry.name, entry.path.name, _model_stem(entry.path)) and entry.path.is_file():
            return entry.path
    for entry in entries:
        if entry.url and text in (entry.name, entry.path.name, _model_stem(entry.path)):
            return fetch_catalog_model(entry.name, user_folder=user_folder, bundled_folder=bundled_folder,
                                       progress=progress)
    names = ", ".join(entry.name for entry in entries if entry.path.is_file()) or "none"
    if path.is_dir():
        msg = f"{text!r} is a folder, not a model file; give a .scn.pt file or a model name; available models: {names}"
    elif path.is_symlink():
        msg = f"{text!r} is a link to a file that does not exist; available models: {names}"
    else:
        msg = f"No model named or found at {text!r}; available models: {names}"
    raise FileNotFoundError(msg)


def next_model_version_path(base_model_path: str | os.PathLike[str], user_folder: str | os.PathLike[str]) -> Path:
    """A new, unused file name for a fine-tuned version of ``base_model_path``.

    ``ceph.scn.pt`` gives ``<user_folder>/ceph-ft001.scn.pt``; fine-tuning ``ceph-ft001``
    again gives ``ceph-ft002`` (the number after the highest existing version of that root),
    so versions sort in the order they were made and none is ever replaced.
    """
    folder = Path(user_folder)
    stem = _model_stem(Path(base_model_path))
    match = _VERSION_PATTERN.match(stem)
    root = match.group("root") if match else stem
    highest = 0
    if folder.is_dir():
        for existing in folder.glob(f"{_glob_escape(root)}-ft*{MODEL_SUFFIX}"):
            found = _VERSION_PATTERN.match(_model_stem(existing))
            if found and found.group("root") == root:
                highest = max(highest, int(found.group("number")))
    number = highest + 1
    candidate = folder / f"{root}-ft{number:03d}{MODEL_SUFFIX}"
    # Taken: a file named with another pattern in between, or a name a running fine-tuning holds.
    while candidate.exists() or candidate.with_name(candidate.name + ".reserved").exists():
        number += 1
        candidate = folder / f"{root}-ft{number:03d}{MODEL_SUFFIX}"
    return candidate


def _glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped, so a model called ``a[1]`` matches itself only."""
    return re.sub(r"([*?\[])", r"[\1]", text)


# --------------------------------------------------------------------------- checksums


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file as lowercase hex, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    """Check a file against its expected SHA-256.

    Raises:
        ValueError: the file's checksum differs (damaged or different download).
    """
    actual = file_sha256(path)
    if actual.lower() != expected.strip().lower():
        msg = (
            f"{Path(path).name} is not the expected file: its SHA-256 is {actual}, expected {expected.strip().lower()}. "
            "The download is damaged or the file was replaced."
        )
        raise ValueError(msg)


# --------------------------------------------------------------------------- fetching


def _source_name(url_or_path: str) -> str:
    parsed = urllib.parse.urlparse(url_or_path)
    if parsed.scheme in ("http", "https", "file"):
        return Path(urllib.parse.unquote(parsed.path)).name
    return Path(url_or_path).name


def _open_source(url_or_path: str, timeout_s: float):  # noqa: ANN202 - a binary stream
    """An open binary stream and its size in bytes (0 when unknown)."""
    parsed = urllib.parse.urlparse(url_or_path)
    # One-letter "schemes" are Windows drive letters (C:\\...), i.e. local paths.
    if parsed.scheme in ("http", "https", "file"):
        try:
            response = urllib.request.urlopen(url_or_path, timeout=timeout_s)  # noqa: S310 - schemes checked above
        except OSError as error:
            msg = f"Could not download {url_or_path}: {getattr(error, 'reason', error)}"
            raise OSError(msg) from error
        length = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        return response, int(length) if length and str(length).isdigit() else 0
    if parsed.scheme and len(parsed.scheme) > 1:
        msg = f"Cannot fetch {url_or_path}: only http, https and file addresses or local paths are supported"
        raise ValueError(msg)
    path = Path(url_or_path).expanduser()
    if not path.is_file():
        msg = f"Model file not found: {path}"
        raise FileNotFoundError(msg)
    return open(path, "rb"), path.stat().st_size


def fetch_model(
    url_or_path: str | os.PathLike[str],
    destination_folder: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    progress: ProgressCallback | None = None,
    file_name: str | None = None,
    overwrite: bool = False,
    should_cancel: Callable[[], bool] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Copy a model file from an http(s)/file URL or a local path into ``destination_folder``.

    The bytes go to a hidden temporary file in the destination folder, are checked against
    ``sha256`` when given, and only then renamed to their final name, so a broken or
    interrupted download never leaves a file that looks like a model.

    Args:
        url_or_path: ``https://...``, ``http://...``, ``file://...`` or a local path.
        destination_folder: created when missing.
        sha256: expected SHA-256 (hex). When the destination file already exists and has
            this checksum, it is returned without downloading again.
        progress: called with ``Progress("download", bytes_done, bytes_total, ...)``.
        file_name: name of the file written (default: the last part of the URL/path).
        overwrite: replace an existing destination file whose checksum is not ``sha256``.
        should_cancel: polled between chunks; True stops and removes the partial file.
        timeout_s: network timeout per read, seconds.

    Returns:
        The path of the model file in ``destination_folder``.

    Raises:
        ValueError: checksum mismatch or unsupported address.
        FileExistsError: a different file of that name exists and ``overwrite`` is False.
        OSError: the download failed.
        InterruptedError: ``should_cancel`` returned True.
    """
    source = str(url_or_path)
    name = file_name or _source_name(source)
    if not name:
        msg = f"Cannot tell a file name from {source}; give file_name"
        raise ValueError(msg)
    folder = Path(destination_folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    destination = folder / name
    if destination.exists():
        if sha256 and file_sha256(destination) == sha256.strip().lower():
            return destination
        if not overwrite:
            msg = f"{destination} already exists; remove it or allow overwriting"
            raise FileExistsError(msg)
    started = time.monotonic()
    stream, total = _open_source(source, timeout_s)
    digest = hashlib.sha256()
    done = 0
    with atomic_path(destination, overwrite=overwrite) as temporary, stream, open(temporary, "wb") as output:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            if should_cancel is not None and should_cancel():
                msg = f"Download of {name} cancelled"
                raise InterruptedError(msg)
            output.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                elapsed = time.monotonic() - started
                progress(Progress("download", done, total or done, elapsed, estimate_eta(done, total, elapsed) if total else None,
                                  message=name))
        output.flush()
        os.fsync(output.fileno())
        if total and done != total:
            msg = f"Download of {name} stopped early ({done} of {total} bytes)"
            raise OSError(msg)
        if sha256 and digest.hexdigest() != sha256.strip().lower():
            msg = (
                f"The downloaded {name} is damaged or not the expected file: SHA-256 {digest.hexdigest()}, "
                f"expected {sha256.strip().lower()}. Nothing was installed; try again."
            )
            raise ValueError(msg)
    return destination


def import_model_file(
    path: str | os.PathLike[str],
    user_folder: str | os.PathLike[str] | None = None,
) -> Path:
    """Check a model file and copy it into the user's models folder.

    The file is validated (it must load as an SCNLandmarks model, weights checksum
    included) before it is copied; a file already in the user folder is returned as is;
    a name clash with a different file gets a ``-1``, ``-2``... suffix instead of replacing.

    Raises:
        ModelFileError: the file is not a usable model (with the reason).
    """
    from .model_file import load_model  # torch is needed here

    source = Path(path).expanduser()
    load_model(source, device="cpu")  # full check: format, description, weights checksum
    folder = Path(user_folder) if user_folder is not None else user_models_folder()
    folder.mkdir(parents=True, exist_ok=True)
    if source.resolve().parent == folder.resolve():
        return source
    stem = _model_stem(source)
    candidate = folder / f"{stem}{MODEL_SUFFIX}"
    number = 0
    digest = file_sha256(source)
    while candidate.exists():
        if file_sha256(candidate) == digest:
            return candidate  # the same model was loaded before
        number += 1
        candidate = folder / f"{stem}-{number}{MODEL_SUFFIX}"
    return fetch_model(source, folder, sha256=digest, file_name=candidate.name)
