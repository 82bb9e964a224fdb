"""Atomic file writes: a file is either the complete new version or not there at all.

A write goes to a hidden temporary file in the destination folder and is renamed over the
destination only once it is complete, so a crash, a full disk or an exception half-way never
leaves a truncated landmark file or model next to the user's data. The rename is atomic
because source and destination are on the same file system.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable", "file_lock", "make_output_folder"]


def make_output_folder(folder: str | os.PathLike[str]) -> Path:
    """Create the folder that receives a run's results (with its parents), before any work is done.

    Raises:
        NotADirectoryError: ``folder``, or a folder above it, is an existing file.
        PermissionError: it cannot be created, or it is read-only for this user.
    """
    folder = Path(folder).expanduser()
    blocking = next((part for part in (folder, *folder.parents) if part.exists() and not part.is_dir()), None)
    if blocking is not None:
        msg = f"The output must be a folder, but {blocking} is a file; choose a folder"
        raise NotADirectoryError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except PermissionError as error:
        msg = f"Cannot create the output folder {folder}: no permission to write in {error.filename or 'its parent'}"
        raise PermissionError(msg) from error
    if not os.access(folder, os.W_OK):
        msg = f"The output folder {folder} is read-only (no permission to write there)"
        raise PermissionError(msg)
    return folder


def check_writable(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Check that ``path`` may be written, before any work is done.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: the destination folder does not exist.
        IsADirectoryError: ``path`` is an existing folder.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        PermissionError: the folder is read-only for this user.
    """
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        msg = f"Cannot write {path.name}: the folder {path.parent} does not exist"
        raise FileNotFoundError(msg)
    if path.is_dir():
        msg = f"Cannot write to {path}: it is a folder, not a file name"
        raise IsADirectoryError(msg)
    if not os.access(path.parent, os.W_OK):
        msg = f"Cannot write {path.name}: the folder {path.parent} is read-only (no permission to write there)"
        raise PermissionError(msg)
    if path.exists() and not overwrite:
        msg = f"{path} already exists; choose another name or allow overwriting (command line: --overwrite; Python: overwrite=True)"
        raise FileExistsError(msg)
    return path


# Longest file name most file systems take, in bytes.
_NAME_MAX = 255


def _temporary_name(path: Path) -> Path:
    # The original name stays at the end so that the extension (".nrrd", ".nii.gz", ".mrk.json")
    # still tells SimpleITK or matplotlib which format to write; a name near the file system's
    # limit keeps only its end, so the temporary name is not too long where the final one fits.
    tag = f".tmp-{uuid.uuid4().hex[:12]}-"
    name = path.name
    if len((tag + name).encode("utf-8")) > _NAME_MAX:
        name = name[-32:]
    return path.with_name(tag + name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Give a temporary path to write to; it replaces ``path`` when the block succeeds.

    Example::

        with atomic_path("model.pt", overwrite=True) as temporary:
            torch.save(state, temporary)

    If the block raises, the temporary file is removed and ``path`` is left untouched.

    Raises:
        FileNotFoundError, IsADirectoryError, FileExistsError: see :func:`check_writable`;
            also FileNotFoundError when the block finished without creating the file.
    """
    destination = check_writable(path, overwrite=overwrite)
    temporary = _temporary_name(destination)
    try:
        yield temporary
        if not temporary.exists():
            msg = f"Nothing was written for {destination}"
            raise FileNotFoundError(msg)
        if overwrite:
            os.replace(temporary, destination)
        else:
            _move_unless_taken(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _move_unless_taken(temporary: Path, destination: Path) -> None:
    """Give ``temporary`` the name ``destination`` unless that name exists, in one step.

    Another program may create the file while ours is written, and "check, then rename" would
    replace it. A hard link (POSIX) or a rename (Windows) fails instead where the name is taken.
    """
    taken = f"{destination} was created by someone else while it was being written; not replacing it"
    try:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            os.rename(temporary, destination)
            return
        os.link(temporary, destination)
    except FileExistsError:
        raise FileExistsError(taken) from None
    except OSError:
        # A file system without hard links (some network shares): check, then rename.
        if destination.exists():
            raise FileExistsError(taken) from None
        os.replace(temporary, destination)
        return
    temporary.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`). Returns the path."""
    with atomic_path(path, overwrite=overwrite) as temporary:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path).expanduser()


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, overwrite: bool = False, encoding: str = "utf-8"
) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`). Returns the path.

    Line endings are written as given (``"\\n"``), on every platform.
    """
    return atomic_write_bytes(path, text.encode(encoding), overwrite=overwrite)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock tied to ``path`` (a hidden ``.<name>.lock`` beside it) for a read-modify-write.

    Two processes that update the same file under this lock never lose each other's changes.
    The lock file is left in place: removing it would race with a process waiting for it.
    """
    path = Path(path).expanduser()
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a+b") as handle:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
